// CUDA kernel of alphadiv::adaptive_kd: the kernel, its launch plan and the op's host wrapper are in
// adaptive_kd_cuda.cuh (shared with the CPU emulation test); this file launches it on the current
// device and stream and registers it for the CUDA dispatch key.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adaptive_kd_cuda.cuh"

namespace alphadiv {
namespace {

std::tuple<at::Tensor, at::Tensor> adaptive_kd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& mask, double alpha_min,
                                                    double alpha_max, double clip, double temperature,
                                                    int64_t reduction, bool surrogate, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Shared memory a block may opt in to (H100: 227 KB), less a margin for the kernel's static shared
  // memory (reductions) and the driver's reserve.
  int optin_shared_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        student.device().index()));
  const int64_t max_shared_bytes = int64_t(optin_shared_bytes) - 2048;
  const auto launch = [stream](auto kernel, int64_t blocks, int threads, int64_t shared_bytes, const auto&... args) {
    if (shared_bytes > 48 * 1024) {  // beyond the default limit a kernel must opt in
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    kernel<<<static_cast<unsigned int>(blocks), threads, static_cast<size_t>(shared_bytes), stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  return cuda_kd::adaptive_kd_rows(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction,
                                   surrogate, compute_grad, max_shared_bytes, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(alphadiv, CUDA, m) { m.impl("adaptive_kd", &adaptive_kd_cuda); }

}  // namespace alphadiv
