// Fused adaptive alpha-divergence KD on CUDA: a warp per row for C <= 1024, a block per row above.
//
// Each row group sweeps its row four times (math in ../adaptive_kd_math.h), with xs = s/T - max,
// xt = t/T - max, accumulating in fp32 (fp64 for fp64 inputs) and reducing with warp shuffles
// (and shared memory across the warps of a block):
//   1. the row maxima;
//   2. Z_s = sum exp(xs), Z_t = sum exp(xt) and sum exp(xt)(xt - xs), whence forward KL
//      = (1/Z_t) sum exp(xt)(xt - xs) + log(Z_s / Z_t);
//   3. for each alpha that is not forward KL, its statistic (R or B);
//   4. the chosen branch's gradient, scaled for the reduction and written once in the student's
//      dtype, and the surrogate when asked for.
// Offsets are int64 (C up to 262144, N*C beyond 2^31). The reduction scale lives on the device
// (a masked mean divides by the count of valid rows), so nothing synchronises with the host and
// the op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../adaptive_kd_checks.h"
#include "../adaptive_kd_math.h"

namespace alphadiv {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpRowsThreads = 256;  // block size when a warp handles a row
constexpr int kBlockRowThreads = 512;  // block size when a block handles a row
constexpr int64_t kWarpRowMaxCols = 1024;

// ---------------------------------------------------------------------------------------------
// Device math

template <typename acc_t>
__device__ __forceinline__ acc_t device_exp(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return expf(x); else return exp(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t device_log(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return logf(x); else return log(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t device_expm1(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return expm1f(x); else return expm1(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t max_propagating_nan(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// Sum (or NaN-propagating max) over the kGroup threads of a row group; every thread gets the result.
template <int kGroup, bool kMax, typename acc_t>
__device__ __forceinline__ acc_t group_reduce(acc_t value, acc_t* shared) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = kMax ? max_propagating_nan(value, other) : value + other;
  }
  if constexpr (kGroup > kWarp) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    __syncthreads();  // the previous reduction's readers are done with `shared`
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    const acc_t neutral = kMax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
    value = lane < kGroup / kWarp ? shared[lane] : neutral;
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      const acc_t other = __shfl_xor_sync(0xffffffffu, value, offset);
      value = kMax ? max_propagating_nan(value, other) : value + other;
    }
  }
  return value;
}

template <typename acc_t>
struct Params {
  int64_t rows, cols, s_row_stride, s_col_stride, t_row_stride, t_col_stride;
  acc_t inv_temperature, temperature, t_squared, alpha_lo, alpha_hi, clip, log_clip;
  Branch branch_lo, branch_hi;
  bool same_alpha, surrogate;
};

// c - 1 (General, NegOne) or log c (ReverseKL) at one element.
template <typename acc_t>
__device__ __forceinline__ acc_t clipped_weight(Branch branch, acc_t xs, acc_t xt, acc_t es, acc_t et, acc_t alpha,
                                                acc_t log_ratio, acc_t zt_over_zs, const Params<acc_t>& p) {
  if (branch == Branch::NegOne) {
    const acc_t ratio = es / et * zt_over_zs;  // q / p; inf where p == 0
    return (ratio < p.clip ? ratio : p.clip) - acc_t(1);
  }
  const acc_t log_w = (xt - xs) + log_ratio;
  if (branch == Branch::ReverseKL) return log_w < p.log_clip ? log_w : p.log_clip;
  const acc_t scaled = log_w * alpha;
  return device_expm1(scaled < p.log_clip ? scaled : p.log_clip);
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load(const scalar_t* row, int64_t col, int64_t stride) {
  return static_cast<acc_t>(row[col * stride]);
}

// ---------------------------------------------------------------------------------------------
// Kernel

template <int kGroup, typename acc_t, typename student_t, typename teacher_t>
__global__ void adaptive_kd_kernel(Params<acc_t> p, const student_t* __restrict__ student,
                                   const teacher_t* __restrict__ teacher, student_t* __restrict__ grad,
                                   acc_t* __restrict__ row_values, const bool* __restrict__ mask,
                                   const acc_t* __restrict__ grad_scale) {
  __shared__ acc_t shared[kWarp];
  constexpr int kBlock = kGroup > kWarp ? kGroup : kWarpRowsThreads;
  const int lane = threadIdx.x % kGroup;
  const int64_t row = int64_t(blockIdx.x) * (kBlock / kGroup) + threadIdx.x / kGroup;
  if (row >= p.rows) return;  // a whole group at once (block-per-row: the whole block)
  const int64_t cols = p.cols;
  student_t* grad_row = grad ? grad + row * cols : nullptr;
  if (mask && !mask[row]) {
    if (lane == 0) row_values[row] = acc_t(0);
    if (grad_row) {
      for (int64_t c = lane; c < cols; c += kGroup) grad_row[c] = static_cast<student_t>(0.0f);
    }
    return;
  }
  const student_t* s = student + row * p.s_row_stride;
  const teacher_t* t = teacher + row * p.t_row_stride;
  const acc_t inv_t = p.inv_temperature;

  // 1. maxima
  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
  for (int64_t c = lane; c < cols; c += kGroup) {
    max_s = max_propagating_nan(max_s, load<acc_t>(s, c, p.s_col_stride) * inv_t);
    max_t = max_propagating_nan(max_t, load<acc_t>(t, c, p.t_col_stride) * inv_t);
  }
  max_s = group_reduce<kGroup, true>(max_s, shared);
  max_t = group_reduce<kGroup, true>(max_t, shared);

  // 2. normalisers and the forward-KL sum
  acc_t zs = 0, zt = 0, kl = 0;
  for (int64_t c = lane; c < cols; c += kGroup) {
    const acc_t xs = load<acc_t>(s, c, p.s_col_stride) * inv_t - max_s;
    const acc_t xt = load<acc_t>(t, c, p.t_col_stride) * inv_t - max_t;
    const acc_t es = device_exp(xs), et = device_exp(xt);
    zs += es;
    zt += et;
    kl += et == acc_t(0) ? acc_t(0) : et * (xt - xs);
  }
  zs = group_reduce<kGroup, false>(zs, shared);
  zt = group_reduce<kGroup, false>(zt, shared);
  kl = group_reduce<kGroup, false>(kl, shared);
  const acc_t log_zs = device_log(zs);
  const acc_t log_ratio = device_log(zs / zt);  // not log zs - log zt: both ~log C, their rounding would dominate
  const acc_t zt_over_zs = zt / zs;
  const acc_t forward_kl = kl / zt + log_ratio;

  // 3. statistics of the alpha branches
  const auto statistic = [&](Branch branch, acc_t alpha) -> acc_t {
    if (branch == Branch::ForwardKL) return forward_kl;
    acc_t sum = 0;
    for (int64_t c = lane; c < cols; c += kGroup) {
      const acc_t xs = load<acc_t>(s, c, p.s_col_stride) * inv_t - max_s;
      const acc_t xt = load<acc_t>(t, c, p.t_col_stride) * inv_t - max_t;
      const acc_t es = device_exp(xs), et = device_exp(xt);
      const acc_t w = clipped_weight(branch, xs, xt, es, et, alpha, log_ratio, zt_over_zs, p);
      sum += es == acc_t(0) ? acc_t(0) : es * w;
    }
    return group_reduce<kGroup, false>(sum, shared) / zs;
  };
  const acc_t stat_lo = statistic(p.branch_lo, p.alpha_lo);
  const acc_t stat_hi = p.same_alpha ? stat_lo : statistic(p.branch_hi, p.alpha_hi);
  const acc_t d_lo = branch_divergence(p.branch_lo, p.alpha_lo, stat_lo);
  const acc_t d_hi = branch_divergence(p.branch_hi, p.alpha_hi, stat_hi);
  const bool use_lo = d_lo > d_hi;  // strict, as in AlphaNet; NaN selects alpha_max
  const Branch branch = use_lo ? p.branch_lo : p.branch_hi;
  const acc_t alpha = use_lo ? p.alpha_lo : p.alpha_hi;
  const acc_t stat = use_lo ? stat_lo : stat_hi;
  acc_t value = use_lo ? d_lo : d_hi;

  // 4. gradient of the chosen branch, and the surrogate
  if (grad_row || p.surrogate) {
    const acc_t scale = grad_scale[0] * p.temperature;  // the reduction's row weight, times T
    acc_t surrogate = 0;
    for (int64_t c = lane; c < cols; c += kGroup) {
      const acc_t xs = load<acc_t>(s, c, p.s_col_stride) * inv_t - max_s;
      const acc_t xt = load<acc_t>(t, c, p.t_col_stride) * inv_t - max_t;
      const acc_t es = device_exp(xs), et = device_exp(xt);
      const acc_t q = es / zs, pr = et / zt;
      acc_t g, q_rho, seen;
      if (branch == Branch::ForwardKL) {
        g = q - pr;
        q_rho = pr;
        seen = pr;
      } else {
        const acc_t w = clipped_weight(branch, xs, xt, es, et, alpha, log_ratio, zt_over_zs, p);
        seen = q;
        if (branch == Branch::ReverseKL) {
          g = q * (stat - w);
          q_rho = q * (w - acc_t(1));
        } else {
          g = q * (stat - w) / alpha;
          q_rho = q * ((w + acc_t(1)) / alpha + acc_t(1) / (alpha * (alpha - acc_t(1))));
        }
        if (q == acc_t(0)) g = acc_t(0);
      }
      if (grad_row) grad_row[c] = static_cast<student_t>(g * scale);
      if (seen != acc_t(0)) surrogate -= q_rho * (xs - log_zs);
    }
    if (p.surrogate) value = group_reduce<kGroup, false>(surrogate, shared);
  }
  if (lane == 0) row_values[row] = value * p.t_squared;
}

// ---------------------------------------------------------------------------------------------
// Launcher

template <typename acc_t, typename student_t, typename teacher_t>
void launch(const Params<acc_t>& params, const at::Tensor& student, const at::Tensor& teacher, at::Tensor* grad,
            at::Tensor& row_values, const bool* mask, const at::Tensor& grad_scale) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const student_t* s = student.const_data_ptr<student_t>();
  const teacher_t* t = teacher.const_data_ptr<teacher_t>();
  student_t* g = grad ? grad->mutable_data_ptr<student_t>() : nullptr;
  acc_t* values = row_values.mutable_data_ptr<acc_t>();
  const acc_t* scale = grad_scale.const_data_ptr<acc_t>();
  if (params.cols <= kWarpRowMaxCols) {
    constexpr int kRowsPerBlock = kWarpRowsThreads / kWarp;
    const int64_t blocks = (params.rows + kRowsPerBlock - 1) / kRowsPerBlock;
    adaptive_kd_kernel<kWarp, acc_t><<<blocks, kWarpRowsThreads, 0, stream>>>(params, s, t, g, values, mask, scale);
  } else {
    adaptive_kd_kernel<kBlockRowThreads, acc_t><<<params.rows, kBlockRowThreads, 0, stream>>>(params, s, t, g, values,
                                                                                             mask, scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> adaptive_kd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& mask, double alpha_min,
                                                    double alpha_max, double clip, double temperature,
                                                    int64_t reduction, bool surrogate, bool compute_grad) {
  check_arguments(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), cols = student.size(1);
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 rows, got ", rows);
  const at::ScalarType value_dtype = c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
  const at::ScalarType acc_dtype = value_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = student.options().dtype(acc_dtype);

  at::Tensor mask_contiguous = mask.has_value() ? mask->contiguous() : at::Tensor();
  at::Tensor count = mask.has_value() ? mask_contiguous.sum().to(acc_dtype) : at::full({}, double(rows), acc_options);
  // Row weight of the gradient: 1 / valid rows for the mean (a mean over no rows is 0), else 1.
  at::Tensor grad_scale = reduction == kReductionMean ? count.clamp_min(1).reciprocal().reshape({1})
                                                      : at::ones({1}, acc_options);
  at::Tensor row_values = at::empty({rows}, acc_options);
  at::Tensor grad = compute_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());

  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "adaptive_kd_cuda_student", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "adaptive_kd_cuda_teacher",
                                      [&] {
        using teacher_t = scalar_t;
        const auto run = [&](auto acc) {
          using acc_t = decltype(acc);
          const Params<acc_t> params{rows, cols, student.stride(0), student.stride(1), teacher.stride(0),
                                     teacher.stride(1), acc_t(1.0 / temperature), acc_t(temperature),
                                     acc_t(temperature * temperature), acc_t(alpha_min), acc_t(alpha_max), acc_t(clip),
                                     acc_t(std::log(clip)), classify_alpha(alpha_min), classify_alpha(alpha_max),
                                     alpha_min == alpha_max, surrogate};
          launch<acc_t, student_t, teacher_t>(params, student, teacher, compute_grad ? &grad : nullptr, row_values,
                                              mask.has_value() ? mask_contiguous.const_data_ptr<bool>() : nullptr,
                                              grad_scale);
        };
        if (acc_dtype == at::kDouble) run(double{}); else run(float{});
      });
    });
  }
  if (reduction == kReductionNone) return {row_values.to(value_dtype), grad};
  at::Tensor total = row_values.sum();
  if (reduction == kReductionMean) total = total * grad_scale.reshape({});
  return {total.to(value_dtype), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphadiv, CUDA, m) { m.impl("adaptive_kd", &adaptive_kd_cuda); }

}  // namespace alphadiv
