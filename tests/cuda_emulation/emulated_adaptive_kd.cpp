// The CUDA kernel of alphadiv::adaptive_kd (csrc/cuda/adaptive_kd_cuda.cuh), compiled for the CPU with
// CUDA's thread model emulated (cuda_on_cpu.h), as a Python function over CPU tensors.
#include <torch/extension.h>

#include "cuda_on_cpu.h"

#include "../../csrc/cuda/adaptive_kd_cuda.cuh"

std::tuple<at::Tensor, at::Tensor> emulated_adaptive_kd(const at::Tensor& student, const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& mask, double alpha_min,
                                                        double alpha_max, double clip, double temperature,
                                                        int64_t reduction, bool surrogate, bool compute_grad,
                                                        int64_t max_shared_bytes) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "the emulated CUDA kernel reads CPU tensors");
  const auto launch = [](auto kernel, int64_t blocks, int threads, int64_t shared_bytes, const auto&... args) {
    cuda_emulation::launch(kernel, blocks, threads, shared_bytes, args...);
  };
  return alphadiv::cuda_kd::adaptive_kd_rows(student, teacher, mask, alpha_min, alpha_max, clip, temperature,
                                             reduction, surrogate, compute_grad, max_shared_bytes, launch);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adaptive_kd", &emulated_adaptive_kd, "alphadiv::adaptive_kd's CUDA kernel, run on the CPU");
}
