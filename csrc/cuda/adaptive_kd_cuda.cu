// CUDA kernel of alphadiv::adaptive_kd: the kernel, its launch plan and the op's host wrapper are in
// adaptive_kd_cuda.cuh (shared with the CPU emulation test); this file launches it on the current
// device and stream and registers it for the CUDA dispatch key.
#include <torch/library.h>

#include "adaptive_kd_cuda.cuh"
#include "stream_launch.cuh"

namespace alphadiv {
namespace {

std::tuple<at::Tensor, at::Tensor> adaptive_kd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& mask, double alpha_min,
                                                    double alpha_max, double clip, double temperature,
                                                    int64_t reduction, bool surrogate, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return cuda_kd::adaptive_kd_rows(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction,
                                   surrogate, compute_grad, cuda_kd::max_dynamic_shared_bytes(student.device().index()),
                                   cuda_kd::stream_launcher(c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(alphadiv, CUDA, m) { m.impl("adaptive_kd", &adaptive_kd_cuda); }

}  // namespace alphadiv
