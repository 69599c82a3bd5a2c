// Adaptive alpha-divergence KD from a sparse teacher (top-k log-probabilities) on CUDA: the kernel and
// the host wrapper. Compiled by nvcc into the CUDA extension (sparse_adaptive_kd_cuda.cu launches it) and,
// for the tests, on the CPU with CUDA's thread model emulated (tests/cuda_emulation).
//
// Layout: a block of 256 threads per row, any strides, one element per thread per step. The k teacher
// classes are marked in a bitmap of ceil(C / 32) words in dynamic shared memory (atomicOr; a bit found
// already set is a duplicate). Math (../sparse_adaptive_kd_math.h), with x = s / T:
//   1. mark the k classes; check them (index in [0, C), distinct, log-probability <= 0 and not NaN): a bad
//      row gets NaN value and gradient, nothing synchronises with the host;
//   2. one sweep over the row: the tail's (unmarked classes') max and sum of exp, online per thread
//      (z <- z exp(m_old - m_new) + exp(x - m_new)), and whether a logit is NaN or +inf;
//   3. the k + 1 bins in double, each thread taking every 256th class (gathered again in each pass, k is
//      small next to C): Z, log q, the teacher's tail 1 - sum p, both alphas' statistics, the selection;
//   4. the gradient: G_tail exp(x - m_tail) / Z_tail at the unmarked columns, G_b at the k classes
//      (disjoint stores). Row values and gradients carry the reduction's row weight (on the device for a
//      masked mean), so a reduced loss is one sum and the op can be captured in a CUDA graph.
#pragma once

#include "adaptive_kd_cuda.cuh"
#include "../sparse_adaptive_kd_math.h"

namespace alphadiv {
namespace cuda_kd {

constexpr int kSparseThreads = 256;

template <typename acc_t>
struct SparseParams {
  int64_t rows, cols, k, s_row_stride, s_col_stride, i_row_stride, i_col_stride, l_row_stride, l_col_stride;
  acc_t inv_temperature, temperature, t_squared, row_weight;
  double alpha_lo, alpha_hi, log_clip;
  Branch branch_lo, branch_hi;
  bool same_alpha, surrogate;
};

struct SparsePointers {
  const void *student, *indices, *logprobs;
  void *grad, *row_values;
  const bool* mask;
  const void* device_row_weight;
};

template <typename T>
__device__ __forceinline__ T infinity() {
  return std::numeric_limits<T>::infinity();
}

template <typename student_t, typename acc_t>
__device__ __forceinline__ void fill_row(student_t* grad_row, int64_t cols, acc_t value) {
  if (!grad_row) return;
  for (int64_t j = threadIdx.x; j < cols; j += kSparseThreads) grad_row[j] = static_cast<student_t>(value);
}

template <typename acc_t, typename student_t, typename index_t, typename logprob_t>
__global__ void __launch_bounds__(kSparseThreads)
sparse_adaptive_kd_kernel(SparseParams<acc_t> p, const student_t* __restrict__ student,
                          const index_t* __restrict__ indices, const logprob_t* __restrict__ logprobs,
                          student_t* __restrict__ grad, acc_t* __restrict__ row_values, const bool* __restrict__ mask,
                          const acc_t* __restrict__ device_row_weight) {
  __shared__ double shared[kWarp * 4];
  unsigned int* bitmap = reinterpret_cast<unsigned int*>(dynamic_shared_memory());
  const int64_t row = blockIdx.x, words = (p.cols + 31) / 32;
  const student_t* s = student + row * p.s_row_stride;
  const index_t* idx = indices + row * p.i_row_stride;
  const logprob_t* lp_row = logprobs + row * p.l_row_stride;
  student_t* grad_row = grad ? grad + row * p.cols : nullptr;
  const auto class_of = [&](int64_t b) { return static_cast<int64_t>(idx[b * p.i_col_stride]); };
  const auto logprob_of = [&](int64_t b) { return static_cast<double>(lp_row[b * p.l_col_stride]); };
  const auto logit_of = [&](int64_t j) { return static_cast<acc_t>(s[j * p.s_col_stride]) * p.inv_temperature; };
  const auto is_marked = [&](int64_t j) { return (bitmap[j / 32] >> (j % 32)) & 1u; };

  // 1. mark and check the k classes
  for (int64_t w = threadIdx.x; w < words; w += kSparseThreads) bitmap[w] = 0u;
  __syncthreads();
  double flags[2] = {0.0, -infinity<double>()};  // {bad, max lp}
  for (int64_t b = threadIdx.x; b < p.k; b += kSparseThreads) {
    const int64_t j = class_of(b);
    const double lp = logprob_of(b);
    if (j < 0 || j >= p.cols) {
      flags[0] = 1.0;
    } else {
      const unsigned int bit = 1u << (j % 32);
      if (atomicOr(&bitmap[j / 32], bit) & bit) flags[0] = 1.0;
    }
    if (!(lp <= 0.0)) flags[0] = 1.0;
    flags[1] = lp > flags[1] ? lp : flags[1];
  }
  group_reduce<kSparseThreads, true, 2>(flags, shared);  // also orders the bitmap's writes before its reads
  const bool bad_teacher = flags[0] != 0.0;
  const acc_t row_weight = device_row_weight ? device_row_weight[0] : p.row_weight;
  if ((mask && !mask[row]) || (!bad_teacher && flags[1] == -infinity<double>())) {  // masked, or no teacher
    if (threadIdx.x == 0) row_values[row] = acc_t(0);
    fill_row(grad_row, p.cols, acc_t(0));
    return;
  }

  // 2. the tail's max and sum, online
  acc_t run_max = -infinity<acc_t>(), run_sum = 0;
  double checks[2] = {0.0, 0.0};  // {NaN or +inf logits, finite logits}
  for (int64_t j = threadIdx.x; j < p.cols; j += kSparseThreads) {
    const acc_t x = logit_of(j);
    if (x != x || x == infinity<acc_t>()) checks[0] += 1.0;
    if (x > -infinity<acc_t>()) checks[1] += 1.0;
    if (is_marked(j) || !(x > run_max || run_max > -infinity<acc_t>())) continue;
    const acc_t new_max = x > run_max ? x : run_max;
    run_sum = run_sum * device_exp(run_max - new_max) + device_exp(x - new_max);
    run_max = new_max;
  }
  acc_t tail_max[1] = {run_max};
  group_reduce<kSparseThreads, true, 1>(tail_max, reinterpret_cast<acc_t*>(shared));
  const acc_t max_tail = tail_max[0];
  const bool has_tail = max_tail > -infinity<acc_t>();
  double sums[3] = {run_max > -infinity<acc_t>() ? double(run_sum) * exp(double(run_max) - double(max_tail)) : 0.0,
                    checks[0], checks[1]};
  group_reduce<kSparseThreads, false, 3>(sums, shared);
  const double z_tail = sums[0];
  if (bad_teacher || sums[1] != 0.0 || sums[2] == 0.0) {  // bad teacher entries, bad logits, or every class -inf
    if (threadIdx.x == 0) row_values[row] = std::numeric_limits<acc_t>::quiet_NaN();
    fill_row(grad_row, p.cols, std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }

  // 3. the bins, in double
  double top_max[1] = {-infinity<double>()};
  for (int64_t b = threadIdx.x; b < p.k; b += kSparseThreads) {
    const double x = double(logit_of(class_of(b)));
    top_max[0] = x > top_max[0] ? x : top_max[0];
  }
  group_reduce<kSparseThreads, true, 1>(top_max, shared);
  const double row_max = has_tail && double(max_tail) > top_max[0] ? double(max_tail) : top_max[0];
  double mass[2] = {0.0, 0.0};  // {sum_I exp(x - m), sum_I p}
  for (int64_t b = threadIdx.x; b < p.k; b += kSparseThreads) {
    mass[0] += exp(double(logit_of(class_of(b))) - row_max);
    mass[1] += exp(logprob_of(b));
  }
  group_reduce<kSparseThreads, false, 2>(mass, shared);
  const double z = mass[0] + (has_tail ? z_tail * exp(double(max_tail) - row_max) : 0.0);
  const double log_z = log(z);
  const double lq_tail = has_tail ? double(max_tail) - row_max + log(z_tail / z) : -infinity<double>();
  const double p_tail = p.k == p.cols ? 0.0 : (1.0 - mass[1] > 0.0 ? 1.0 - mass[1] : 0.0);
  const double lp_tail = log(p_tail);
  const auto lq_of = [&](int64_t b) { return double(logit_of(class_of(b))) - row_max - log_z; };
  double stats[4] = {0.0, 0.0, 0.0, 0.0};  // statistic and surrogate of alpha_lo, then of alpha_hi
  for (int64_t b = threadIdx.x; b < p.k; b += kSparseThreads) {
    const double lq = lq_of(b), lp = logprob_of(b);
    stats[0] += sparse_kd::statistic_term(p.branch_lo, p.alpha_lo, p.log_clip, lq, lp);
    stats[2] += sparse_kd::statistic_term(p.branch_hi, p.alpha_hi, p.log_clip, lq, lp);
    if (p.surrogate) {
      stats[1] += sparse_kd::surrogate_term(p.branch_lo, p.alpha_lo, p.log_clip, lq, lp);
      stats[3] += sparse_kd::surrogate_term(p.branch_hi, p.alpha_hi, p.log_clip, lq, lp);
    }
  }
  group_reduce<kSparseThreads, false, 4>(stats, shared);
  stats[0] += sparse_kd::statistic_term(p.branch_lo, p.alpha_lo, p.log_clip, lq_tail, lp_tail);
  stats[2] += sparse_kd::statistic_term(p.branch_hi, p.alpha_hi, p.log_clip, lq_tail, lp_tail);
  stats[1] += sparse_kd::surrogate_term(p.branch_lo, p.alpha_lo, p.log_clip, lq_tail, lp_tail);
  stats[3] += sparse_kd::surrogate_term(p.branch_hi, p.alpha_hi, p.log_clip, lq_tail, lp_tail);
  const double d_lo = branch_divergence(p.branch_lo, p.alpha_lo, stats[0]);
  const double d_hi = p.same_alpha ? d_lo : branch_divergence(p.branch_hi, p.alpha_hi, stats[2]);
  const bool use_lo = d_lo > d_hi;  // strict, as in AlphaNet; NaN selects alpha_max
  const Branch branch = use_lo ? p.branch_lo : p.branch_hi;
  const double alpha = use_lo ? p.alpha_lo : p.alpha_hi, statistic = use_lo ? stats[0] : stats[2];
  const double value = p.surrogate ? (use_lo ? stats[1] : stats[3]) : (use_lo ? d_lo : d_hi);
  if (threadIdx.x == 0) row_values[row] = acc_t(value) * p.t_squared * row_weight;
  if (!grad_row) return;

  // 4. the gradient, scaled by T and the row weight
  const double scale = double(row_weight) * double(p.temperature);
  const double tail_gradient = sparse_kd::bin_gradient(branch, alpha, p.log_clip, statistic, lq_tail, lp_tail);
  const acc_t tail_factor = has_tail ? acc_t(tail_gradient / z_tail * scale) : acc_t(0);
  for (int64_t j = threadIdx.x; j < p.cols; j += kSparseThreads) {
    if (is_marked(j)) continue;
    grad_row[j] = static_cast<student_t>(has_tail ? device_exp(logit_of(j) - max_tail) * tail_factor : acc_t(0));
  }
  // without a tail class the tail bin's gradient stays with the k classes (../sparse_adaptive_kd_math.h)
  const double spill = has_tail ? 0.0 : tail_gradient;
  for (int64_t b = threadIdx.x; b < p.k; b += kSparseThreads) {
    const double lq = lq_of(b);
    const double g = sparse_kd::bin_gradient(branch, alpha, p.log_clip, statistic, lq, logprob_of(b)) + exp(lq) * spill;
    grad_row[class_of(b)] = static_cast<student_t>(g * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Host wrapper: the op's semantics around the kernel; `launch` as in adaptive_kd_rows.

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> sparse_adaptive_kd_rows(const at::Tensor& student, const at::Tensor& indices,
                                                           const at::Tensor& logprobs,
                                                           const std::optional<at::Tensor>& mask, double alpha_min,
                                                           double alpha_max, double clip, double temperature,
                                                           int64_t reduction, bool surrogate, bool compute_grad,
                                                           int64_t max_shared_bytes, Launch&& launch) {
  check_sparse_arguments(student, indices, logprobs, mask, alpha_min, alpha_max, clip, temperature, reduction);
  const int64_t rows = student.size(0), cols = student.size(1);
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 rows, got ", rows);
  const int64_t bitmap_bytes = (cols + 31) / 32 * 4;
  TORCH_CHECK_VALUE(bitmap_bytes <= max_shared_bytes, "the CUDA kernel marks the teacher's classes in shared memory: ",
                    cols, " classes need ", bitmap_bytes, " bytes, this device offers ", max_shared_bytes,
                    "; use backend='triton'");
  const at::ScalarType value_dtype = c10::promoteTypes(student.scalar_type(), logprobs.scalar_type());
  const at::ScalarType acc_dtype = value_dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mask_contiguous = mask.has_value() ? mask->contiguous() : at::Tensor();
  const double row_weight = reduction == kReductionMean && rows > 0 ? 1.0 / double(rows) : 1.0;
  at::Tensor device_row_weight = mask.has_value() && reduction == kReductionMean
                                     ? mask_contiguous.sum().to(acc_dtype).clamp_min(1).reciprocal().reshape({1})
                                     : at::Tensor();
  at::Tensor row_values = at::empty({rows}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());

  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "sparse_kd_cuda_student", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "sparse_kd_cuda_logprobs",
                                      [&] {
        using logprob_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_kd_cuda_indices", [&] {
          const auto run = [&](auto acc) {
            using acc_t = decltype(acc);
            const SparseParams<acc_t> params{rows, cols, indices.size(1), student.stride(0), student.stride(1),
                                             indices.stride(0), indices.stride(1), logprobs.stride(0),
                                             logprobs.stride(1), acc_t(1.0 / temperature), acc_t(temperature),
                                             acc_t(temperature * temperature), acc_t(row_weight), alpha_min,
                                             alpha_max, std::log(clip), classify_alpha(alpha_min),
                                             classify_alpha(alpha_max), alpha_min == alpha_max, surrogate};
            launch(&sparse_adaptive_kd_kernel<acc_t, student_t, index_t, logprob_t>, rows, kSparseThreads,
                   bitmap_bytes, params, student.const_data_ptr<student_t>(), indices.const_data_ptr<index_t>(),
                   logprobs.const_data_ptr<logprob_t>(), compute_grad ? grad.mutable_data_ptr<student_t>() : nullptr,
                   row_values.mutable_data_ptr<acc_t>(),
                   mask.has_value() ? mask_contiguous.const_data_ptr<bool>() : nullptr,
                   device_row_weight.defined() ? device_row_weight.const_data_ptr<acc_t>() : nullptr);
          };
          if constexpr (std::is_same_v<student_t, double> || std::is_same_v<logprob_t, double>) run(double{});
          else run(float{});
        });
      });
    });
  }
  if (reduction == kReductionNone) return {row_values.to(value_dtype), grad};
  return {row_values.sum().to(value_dtype), grad};
}

}  // namespace cuda_kd
}  // namespace alphadiv
