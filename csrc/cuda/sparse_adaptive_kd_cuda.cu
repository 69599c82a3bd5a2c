// CUDA kernel of alphadiv::sparse_adaptive_kd (sparse_adaptive_kd_cuda.cuh, shared with the CPU emulation
// test), launched on the current device and stream and registered for the CUDA dispatch key.
#include <torch/library.h>

#include "sparse_adaptive_kd_cuda.cuh"
#include "stream_launch.cuh"

namespace alphadiv {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_adaptive_kd_cuda(const at::Tensor& student, const at::Tensor& indices,
                                                           const at::Tensor& logprobs,
                                                           const std::optional<at::Tensor>& mask, double alpha_min,
                                                           double alpha_max, double clip, double temperature,
                                                           int64_t reduction, bool surrogate, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return cuda_kd::sparse_adaptive_kd_rows(student, indices, logprobs, mask, alpha_min, alpha_max, clip, temperature,
                                          reduction, surrogate, compute_grad,
                                          cuda_kd::max_dynamic_shared_bytes(student.device().index()),
                                          cuda_kd::stream_launcher(c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(alphadiv, CUDA, m) { m.impl("sparse_adaptive_kd", &sparse_adaptive_kd_cuda); }

}  // namespace alphadiv
