// How the CUDA ops launch their kernels: on the current device and stream, with the dynamic shared
// memory a block may opt in to (H100: 227 KB, less a margin for static shared memory and the driver).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace alphadiv {
namespace cuda_kd {

inline int64_t max_dynamic_shared_bytes(int device) {
  int optin_shared_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return int64_t(optin_shared_bytes) - 2048;
}

// launch(kernel, blocks, threads, shared_bytes, args...) on `stream`.
inline auto stream_launcher(cudaStream_t stream) {
  return [stream](auto kernel, int64_t blocks, int threads, int64_t shared_bytes, const auto&... args) {
    if (shared_bytes > 48 * 1024) {  // beyond the default limit a kernel must opt in
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    kernel<<<static_cast<unsigned int>(blocks), threads, static_cast<size_t>(shared_bytes), stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
}

}  // namespace cuda_kd
}  // namespace alphadiv
