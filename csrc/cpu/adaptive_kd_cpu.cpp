// Fused adaptive alpha-divergence KD on CPU: one task per block of rows, each row swept in cache.
//
// Sweeps per row (math in ../adaptive_kd_math.h), with xs = s/T - max(s/T), xt = t/T - max(t/T):
//   1. both row maxima: read in place when the row is contiguous and in the compute type (the common
//      case), else converted (and divided by T) into a buffer padded to a whole vector with -inf;
//   2. es = exp(xs), et = exp(xt) (the only two exponentials per element), Z_s, Z_t, and the
//      forward-KL sum  sum p lw = (1/Z_t) sum et (xt - xs) + log(Z_s / Z_t); xs and xt are kept only
//      for the branches that read them (reverse KL, general alpha, the surrogate);
//   3. for each alpha that is not forward KL, its statistic (alpha = -1 needs no exponential);
//   4. the selected branch: the gradient, written once in the student's dtype, and the surrogate
//      value when asked for.
// Pads (-inf, or reads past the row's end in sweep 2) add exactly 0 to every sum, so no sweep needs
// a scalar tail. The normalisations 1/Z are applied to the sums, not to every element. Sums run in
// vectors within blocks of kSumBlock elements and in double across blocks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <array>
#include <type_traits>
#include <limits>
#include <tuple>
#include <vector>

#include "../adaptive_kd_checks.h"
#include "../adaptive_kd_math.h"
#include "row_sweeps.h"

namespace alphadiv {
namespace {

using at::vec::Vectorized;
using namespace cpu_rows;

constexpr int64_t kElementsPerTask = 1 << 13;  // rows per parallel task ~ this many elements (32 x 1000 logits: 4 tasks)

// ---------------------------------------------------------------------------------------------
// Kernel

template <typename acc_t>
struct RowBuffers {
  acc_t* xs;  // s/T, then s/T - max
  acc_t* xt;  // t/T, then t/T - max
  acc_t* es;  // exp(xs), later the gradient row
  acc_t* et;  // exp(xt)
};

// Per-row constants of sweeps 3 and 4.
template <typename acc_t>
struct RowScalars {
  acc_t log_ratio;  // log w = (xt - xs) + log_ratio, log_ratio = log(Z_s / Z_t)
  acc_t log_zs;     // log q = xs - log_zs
  acc_t zt_over_zs;
  acc_t clip, log_clip;
};

// Picks where a row is read from, and returns its maximum (of logits / T).
template <typename scalar_t, typename acc_t>
inline std::pair<RowSource<acc_t>, acc_t> prepare_row(const scalar_t* src, int64_t col_stride, int64_t cols,
                                                      int64_t padded_cols, acc_t inv_temperature, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // max(x / T) == max(x) / T exactly: scaling by a positive number preserves order and rounds monotonically.
    if (col_stride == 1) return {{src, inv_temperature, cols}, contiguous_row_max(src, cols) * inv_temperature};
  }
  const acc_t row_max = load_scaled_row(src, col_stride, cols, padded_cols, inv_temperature, buffer);
  return {{buffer, acc_t(1), padded_cols}, row_max};
}

template <typename acc_t>
inline Vectorized<acc_t> zero_where_zero(const Vectorized<acc_t>& value, const Vectorized<acc_t>& weight) {
  // weight == 0 marks a class the distribution does not see: its term is 0 whatever value holds
  // (0 * inf, or NaN from -inf - -inf).
  return Vectorized<acc_t>::blendv(value, Vectorized<acc_t>(acc_t(0)), weight == Vectorized<acc_t>(acc_t(0)));
}

// Sweep 2: shifts both rows by their maxima, stores exp of both (and the shifted rows when
// kKeepShifted); returns {Z_s, Z_t, sum et (xt - xs)}. Without kKeepShifted, es and et may be the
// buffers the rows were converted into (each element is read before it is overwritten).
//
// The sweeps take their buffers by value and their lambdas capture by value: vector stores may alias
// anything, and pointers held in memory would be reloaded after every store.
template <bool kKeepShifted, typename acc_t>
inline std::array<double, 3> exp_sweep(const RowBuffers<acc_t> b, const RowSource<acc_t> s, const RowSource<acc_t> t,
                                       acc_t max_s, acc_t max_t, int64_t padded_cols) {
  using Vec = Vectorized<acc_t>;
  const Vec scale_s(s.scale), scale_t(t.scale), shift_s(-max_s), shift_t(-max_t);
  return padded_row_sums<acc_t, 3>(padded_cols, [=](int64_t i) {
    const Vec xs = at::vec::fmadd(s.load(i), scale_s, shift_s);  // x / T - max(x / T), one rounding
    const Vec xt = at::vec::fmadd(t.load(i), scale_t, shift_t);
    const Vec es = exp_nonpositive(xs), et = exp_nonpositive(xt);
    if constexpr (kKeepShifted) {
      xs.store(b.xs + i);
      xt.store(b.xt + i);
    }
    es.store(b.es + i);
    et.store(b.et + i);
    return std::array<Vec, 3>{es, et, zero_where_zero(et * (xt - xs), et)};
  });
}

// The clipped weight of an alpha branch at one vector: c - 1 (General, NegOne) or log c (ReverseKL).
template <Branch kBranch, typename acc_t>
inline Vectorized<acc_t> clipped_weight(const Vectorized<acc_t>& xs, const Vectorized<acc_t>& xt,
                                        const Vectorized<acc_t>& es, const Vectorized<acc_t>& et,
                                        const RowScalars<acc_t>& r, acc_t alpha) {
  using Vec = Vectorized<acc_t>;
  if constexpr (kBranch == Branch::NegOne) {  // c = min(q / p, clip) = min(es / et * Z_t / Z_s, clip)
    return at::vec::minimum(es / et * Vec(r.zt_over_zs), Vec(r.clip)) - Vec(acc_t(1));
  } else {
    const Vec log_w = (xt - xs) + Vec(r.log_ratio);
    if constexpr (kBranch == Branch::ReverseKL) {
      return at::vec::minimum(log_w, Vec(r.log_clip));
    } else {
      return at::vec::minimum(log_w * Vec(alpha), Vec(r.log_clip)).expm1();
    }
  }
}

// Sweep 3: the statistic of an alpha branch (R or B of adaptive_kd_math.h).
template <Branch kBranch, typename acc_t>
inline double alpha_statistic(const RowBuffers<acc_t> b, const RowScalars<acc_t> r, acc_t alpha, acc_t inv_zs,
                              int64_t padded_cols) {
  using Vec = Vectorized<acc_t>;
  const double sum = padded_row_sums<acc_t, 1>(padded_cols, [=](int64_t i) {
    const Vec es = Vec::loadu(b.es + i);
    const Vec w = clipped_weight<kBranch>(Vec::loadu(b.xs + i), Vec::loadu(b.xt + i), es, Vec::loadu(b.et + i), r,
                                          alpha);
    return std::array<Vec, 1>{zero_where_zero(es * w, es)};
  })[0];
  return sum * inv_zs;
}

// Sweep 4: writes scale * d D / d s of the branch into b.es (in place: es[i] is not read again) and
// returns the unnormalised surrogate sum when kSurrogate.
template <Branch kBranch, bool kSurrogate, typename acc_t>
inline double gradient_sweep(const RowBuffers<acc_t> b, const RowScalars<acc_t> r, acc_t alpha, acc_t stat,
                             acc_t q_scale, acc_t p_scale, bool write_grad, int64_t padded_cols) {
  using Vec = Vectorized<acc_t>;
  const acc_t inv_alpha = acc_t(1) / alpha, rho_offset = acc_t(1) / (alpha * (alpha - acc_t(1)));
  return padded_row_sums<acc_t, 1>(padded_cols, [=](int64_t i) {
    const Vec es = Vec::loadu(b.es + i), et = Vec::loadu(b.et + i);
    Vec grad, rho_e, seen;  // rho_e = e * rho of the surrogate, e = es (or et for forward KL)
    if constexpr (kBranch == Branch::ForwardKL) {
      grad = es * Vec(q_scale) - et * Vec(p_scale);  // (q - p) * scale
      rho_e = et;
      seen = et;
    } else {
      const Vec xs = Vec::loadu(b.xs + i), xt = Vec::loadu(b.xt + i);
      const Vec w = clipped_weight<kBranch>(xs, xt, es, et, r, alpha);
      grad = zero_where_zero(es * (Vec(stat) - w) * Vec(q_scale), es);
      seen = es;
      if constexpr (kSurrogate) {
        rho_e = kBranch == Branch::ReverseKL ? es * (w - Vec(acc_t(1)))
                                             : es * ((w + Vec(acc_t(1))) * Vec(inv_alpha) + Vec(rho_offset));
      }
    }
    if (write_grad) grad.store(b.es + i);
    if constexpr (!kSurrogate) {
      return std::array<Vec, 1>{Vec(acc_t(0))};
    } else {
      const Vec log_q = Vec::loadu(b.xs + i) - Vec(r.log_zs);
      return std::array<Vec, 1>{zero_where_zero(Vec(acc_t(0)) - rho_e * log_q, seen)};
    }
  })[0];
}

template <typename acc_t>
using StatisticFn = double (*)(RowBuffers<acc_t>, RowScalars<acc_t>, acc_t, acc_t, int64_t);
template <typename acc_t>
using GradientFn = double (*)(RowBuffers<acc_t>, RowScalars<acc_t>, acc_t, acc_t, acc_t, acc_t, bool,
                              int64_t);

template <typename acc_t>
StatisticFn<acc_t> statistic_for(Branch branch) {
  switch (branch) {
    case Branch::ReverseKL: return &alpha_statistic<Branch::ReverseKL, acc_t>;
    case Branch::NegOne: return &alpha_statistic<Branch::NegOne, acc_t>;
    case Branch::General: return &alpha_statistic<Branch::General, acc_t>;
    default: return nullptr;  // forward KL: summed in the exp sweep
  }
}

template <typename acc_t, bool kSurrogate>
GradientFn<acc_t> gradient_for(Branch branch) {
  switch (branch) {
    case Branch::ForwardKL: return &gradient_sweep<Branch::ForwardKL, kSurrogate, acc_t>;
    case Branch::ReverseKL: return &gradient_sweep<Branch::ReverseKL, kSurrogate, acc_t>;
    case Branch::NegOne: return &gradient_sweep<Branch::NegOne, kSurrogate, acc_t>;
    default: return &gradient_sweep<Branch::General, kSurrogate, acc_t>;
  }
}

// One alpha of the pair, with the sweeps that serve it.
template <typename acc_t>
struct AlphaBranch {
  Branch branch;
  double alpha;
  StatisticFn<acc_t> statistic;
  GradientFn<acc_t> gradient;
  AlphaBranch(double alpha_value, bool surrogate)
      : branch(classify_alpha(alpha_value)),
        alpha(alpha_value),
        statistic(statistic_for<acc_t>(branch)),
        gradient(surrogate ? gradient_for<acc_t, true>(branch) : gradient_for<acc_t, false>(branch)) {}
};

struct KDParams {
  double alpha_min, alpha_max, clip, temperature;
  int64_t reduction;
  bool surrogate;
};

template <typename acc_t, typename student_t, typename teacher_t>
void adaptive_kd_rows(const at::Tensor& student, const at::Tensor& teacher, const bool* mask,
                      const KDParams& params, double grad_scale, double* row_values, at::Tensor* grad) {
  using Vec = Vectorized<acc_t>;
  const int64_t rows = student.size(0), cols = student.size(1);
  const int64_t padded_cols = (cols + Vec::size() - 1) / Vec::size() * Vec::size();
  const student_t* s_data = student.const_data_ptr<student_t>();
  const teacher_t* t_data = teacher.const_data_ptr<teacher_t>();
  student_t* g_data = grad ? grad->mutable_data_ptr<student_t>() : nullptr;

  const AlphaBranch<acc_t> lo(params.alpha_min, params.surrogate), hi(params.alpha_max, params.surrogate);
  const acc_t inv_temperature = acc_t(1.0 / params.temperature);
  const double t_squared = params.temperature * params.temperature;
  // d (T^2 D(s / T)) / d s = T * D'(s / T), times the reduction's row weight.
  const double row_grad_scale = grad_scale * params.temperature;

  // Only the log-space branches (reverse KL, general alpha) and the surrogate read the shifted logits
  // after the exp sweep; otherwise the exponentials overwrite them and a row needs two buffers, not
  // four (at 32000 classes: 256 KB per thread instead of 512 KB, which stays in L2).
  const auto reads_logits = [](Branch branch) { return branch == Branch::ReverseKL || branch == Branch::General; };
  const bool keep_shifted = params.surrogate || reads_logits(lo.branch) || reads_logits(hi.branch);
  const auto exp_sweep_fn = keep_shifted ? &exp_sweep<true, acc_t> : &exp_sweep<false, acc_t>;

  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> storage((keep_shifted ? 4 : 2) * padded_cols);
    acc_t* const xs = storage.data();
    acc_t* const xt = xs + padded_cols;
    const RowBuffers<acc_t> b{xs, xt, keep_shifted ? xt + padded_cols : xs, keep_shifted ? xt + 2 * padded_cols : xt};
    for (int64_t row = begin; row < end; ++row) {
      student_t* g_row = g_data ? g_data + row * cols : nullptr;
      if (mask && !mask[row]) {
        row_values[row] = 0.0;
        if (g_row) std::fill(g_row, g_row + cols, student_t(0));
        continue;
      }
      const auto [source_s, max_s] =
          prepare_row(s_data + row * student.stride(0), student.stride(1), cols, padded_cols, inv_temperature, b.xs);
      const auto [source_t, max_t] =
          prepare_row(t_data + row * teacher.stride(0), teacher.stride(1), cols, padded_cols, inv_temperature, b.xt);
      if (!std::isfinite(max_s) || !std::isfinite(max_t)) {
        // NaN or +inf logits, or a row with every class at -inf: log_softmax itself is undefined.
        row_values[row] = std::numeric_limits<double>::quiet_NaN();
        if (g_row) std::fill(g_row, g_row + cols, static_cast<student_t>(std::numeric_limits<acc_t>::quiet_NaN()));
        continue;
      }
      const auto [zs, zt, kl_unnormalised] = exp_sweep_fn(b, source_s, source_t, max_s, max_t, padded_cols);
      const double log_ratio = std::log(zs) - std::log(zt);
      const RowScalars<acc_t> r{acc_t(log_ratio), acc_t(std::log(zs)), acc_t(zt / zs), acc_t(params.clip),
                                acc_t(std::log(params.clip))};
      const double forward_kl = kl_unnormalised / zt + log_ratio;  // sum p (xt - xs) + log(Z_s / Z_t)
      const auto statistic = [&](const AlphaBranch<acc_t>& a) {
        return a.statistic ? a.statistic(b, r, acc_t(a.alpha), acc_t(1.0 / zs), padded_cols) : forward_kl;
      };
      const double stat_lo = statistic(lo);
      const double stat_hi = params.alpha_min == params.alpha_max ? stat_lo : statistic(hi);
      const double d_lo = branch_divergence(lo.branch, lo.alpha, stat_lo);
      const double d_hi = branch_divergence(hi.branch, hi.alpha, stat_hi);
      const bool use_lo = d_lo > d_hi;  // strict, as in AlphaNet; NaN selects alpha_max
      const AlphaBranch<acc_t>& chosen = use_lo ? lo : hi;
      double value = use_lo ? d_lo : d_hi;

      if (g_row || params.surrogate) {
        // q = es / Z_s, p = et / Z_t; the alpha branches carry their 1 / alpha in the q factor.
        const double q_scale = row_grad_scale / zs / (chosen.branch == Branch::ForwardKL ||
                                                              chosen.branch == Branch::ReverseKL
                                                          ? 1.0
                                                          : chosen.alpha);
        const double surrogate = chosen.gradient(b, r, acc_t(chosen.alpha), acc_t(use_lo ? stat_lo : stat_hi),
                                                 acc_t(q_scale), acc_t(row_grad_scale / zt), g_row != nullptr,
                                                 padded_cols);
        if (params.surrogate) value = surrogate / (chosen.branch == Branch::ForwardKL ? zt : zs);
        if (g_row) write_gradient_row(b.es, g_row, cols);
      }
      row_values[row] = value * t_squared;
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();  // order the non-temporal gradient stores before the task ends
#endif
  });
}

// ---------------------------------------------------------------------------------------------
// Launcher: argument checks, dtype dispatch, reduction.

std::tuple<at::Tensor, at::Tensor> adaptive_kd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& mask, double alpha_min,
                                                   double alpha_max, double clip, double temperature,
                                                   int64_t reduction, bool surrogate, bool compute_grad) {
  check_arguments(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction);
  check_cpu_capability();
  const int64_t rows = student.size(0);
  const at::ScalarType value_dtype = c10::promoteTypes(student.scalar_type(), teacher.scalar_type());

  at::Tensor mask_contiguous = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_data = mask.has_value() ? mask_contiguous.const_data_ptr<bool>() : nullptr;
  double valid_rows = static_cast<double>(rows);
  if (mask_data) valid_rows = static_cast<double>(std::count(mask_data, mask_data + rows, true));
  // A mean over zero valid rows is 0, with zero gradient.
  const double grad_scale = reduction == kReductionMean ? (valid_rows > 0 ? 1.0 / valid_rows : 0.0) : 1.0;

  at::Tensor row_values = at::empty({rows}, student.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? at::empty({rows, student.size(1)}, student.options()) : at::empty({0}, student.options());
  if (compute_grad) advise_huge_pages(grad);
  const KDParams params{alpha_min, alpha_max, clip, temperature, reduction, surrogate};
  dispatch_input_dtypes(student.scalar_type(), teacher.scalar_type(), [&](auto acc, auto s, auto t) {
    using acc_t = decltype(acc);
    adaptive_kd_rows<acc_t, decltype(s), decltype(t)>(student, teacher, mask_data, params, grad_scale,
                                                      row_values.mutable_data_ptr<double>(),
                                                      compute_grad ? &grad : nullptr);
  });

  if (reduction == kReductionNone) return {row_values.to(value_dtype), grad};
  // Rows are summed in order in double: the result does not depend on the thread count.
  const double* values = row_values.const_data_ptr<double>();
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) total += values[row];
  if (reduction == kReductionMean) total = valid_rows > 0 ? total / valid_rows : 0.0;
  return {at::scalar_tensor(total, student.options().dtype(value_dtype)), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphadiv, CPU, m) { m.impl("adaptive_kd", &adaptive_kd_cpu); }

}  // namespace alphadiv
