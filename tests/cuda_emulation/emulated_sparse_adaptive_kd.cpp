// The CUDA kernel of alphadiv::sparse_adaptive_kd (csrc/cuda/sparse_adaptive_kd_cuda.cuh), compiled for the
// CPU with CUDA's thread model emulated (cuda_on_cpu.h), as a Python function over CPU tensors.
#include <torch/extension.h>

#include "cuda_on_cpu.h"

#include "../../csrc/cuda/sparse_adaptive_kd_cuda.cuh"

std::tuple<at::Tensor, at::Tensor> emulated_sparse_adaptive_kd(const at::Tensor& student, const at::Tensor& indices,
                                                               const at::Tensor& logprobs,
                                                               const std::optional<at::Tensor>& mask, double alpha_min,
                                                               double alpha_max, double clip, double temperature,
                                                               int64_t reduction, bool surrogate, bool compute_grad,
                                                               int64_t max_shared_bytes) {
  TORCH_CHECK(student.device().is_cpu(), "the emulated CUDA kernel reads CPU tensors");
  const auto launch = [](auto kernel, int64_t blocks, int threads, int64_t shared_bytes, const auto&... args) {
    cuda_emulation::launch(kernel, blocks, threads, shared_bytes, args...);
  };
  return alphadiv::cuda_kd::sparse_adaptive_kd_rows(student, indices, logprobs, mask, alpha_min, alpha_max, clip,
                                                    temperature, reduction, surrogate, compute_grad, max_shared_bytes,
                                                    launch);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_adaptive_kd", &emulated_sparse_adaptive_kd, "alphadiv::sparse_adaptive_kd's CUDA kernel, on the CPU");
}
