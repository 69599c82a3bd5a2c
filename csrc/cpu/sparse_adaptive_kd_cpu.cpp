// Adaptive alpha-divergence KD from a sparse teacher (its top-k log-probabilities) on CPU: one task per
// block of rows; per row (math in ../sparse_adaptive_kd_math.h), with x = s / T:
//   1. x into a row buffer; the k teacher classes gathered from it (their indices checked: in [0, C),
//      distinct) and then set to -inf in the buffer, which leaves the tail's classes;
//   2. m_tail = max of the tail, Z_tail = sum exp(x - m_tail) (vector sweep, exp kept in a second
//      buffer); with m = max(m_tail, max x_I), Z = sum_I exp(x_b - m) + Z_tail exp(m_tail - m);
//   3. the k + 1 bins: lq_b = x_b - m - log Z, lq_tail = m_tail - m + log(Z_tail / Z); the teacher's
//      p_tail = 1 - sum exp(lp_I) (in double); both alphas' statistics, the selection, the value;
//   4. the gradient: G_tail exp(x_j - m_tail) / Z_tail over the buffer (0 at the k classes), then G_b
//      written at the k classes, and the row out in the student's dtype.
// The bins are summed in double (k + 1 scalar terms); the sweeps over C run in vectors.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../adaptive_kd_checks.h"
#include "../sparse_adaptive_kd_math.h"
#include "row_sweeps.h"

namespace alphadiv {
namespace {

using at::vec::Vectorized;
using namespace cpu_rows;

constexpr int64_t kElementsPerTask = 1 << 13;  // rows per parallel task ~ this many elements (32 x 1000 logits: 4 tasks)

// ---------------------------------------------------------------------------------------------
// Kernel

struct SparseParams {
  double alpha_min, alpha_max, clip, temperature;
  bool surrogate;
};

// The statistics, divergence and surrogate of one alpha over a row's bins.
struct BinBranch {
  Branch branch;
  double alpha, statistic = 0, divergence = 0, surrogate = 0;
  BinBranch(double alpha_value) : branch(classify_alpha(alpha_value)), alpha(alpha_value) {}

  void evaluate(const std::vector<double>& lq, const std::vector<double>& lp, double log_clip, bool with_surrogate) {
    statistic = surrogate = 0;
    for (size_t b = 0; b < lq.size(); ++b) {
      statistic += sparse_kd::statistic_term(branch, alpha, log_clip, lq[b], lp[b]);
      if (with_surrogate) surrogate += sparse_kd::surrogate_term(branch, alpha, log_clip, lq[b], lp[b]);
    }
    divergence = branch_divergence(branch, alpha, statistic);
  }
};

template <typename acc_t, typename student_t, typename index_t, typename logprob_t>
void sparse_kd_rows(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                    const bool* mask, const SparseParams& params, double grad_scale, double* row_values,
                    at::Tensor* grad) {
  using Vec = Vectorized<acc_t>;
  const int64_t rows = student.size(0), cols = student.size(1), k = indices.size(1);
  const int64_t padded_cols = (cols + Vec::size() - 1) / Vec::size() * Vec::size();
  const student_t* s_data = student.const_data_ptr<student_t>();
  const index_t* i_data = indices.const_data_ptr<index_t>();
  const logprob_t* l_data = logprobs.const_data_ptr<logprob_t>();
  student_t* g_data = grad ? grad->mutable_data_ptr<student_t>() : nullptr;
  const acc_t inv_temperature = acc_t(1.0 / params.temperature);
  const double log_clip = std::log(params.clip), t_squared = params.temperature * params.temperature;
  const double row_grad_scale = grad_scale * params.temperature;  // d (T^2 D(s / T)) / d s = T D'(s / T)
  const bool tail_is_empty = k == cols;  // k distinct classes out of C: all of them

  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(padded_cols), e(padded_cols);
    std::vector<uint8_t> in_topk(cols, 0);  // reset after each row at its k classes only
    std::vector<int64_t> classes(k);
    std::vector<double> x_topk(k), lq(k + 1), lp(k + 1);
    BinBranch lo(params.alpha_min), hi(params.alpha_max);
    for (int64_t row = begin; row < end; ++row) {
      student_t* g_row = g_data ? g_data + row * cols : nullptr;
      const auto finish_empty_row = [&](double value) {
        row_values[row] = value;
        if (g_row) std::fill(g_row, g_row + cols, static_cast<student_t>(value));
      };
      // sweep 1: the row, the k classes, and their checks (on every row, masked or not)
      const acc_t row_max = load_scaled_row(s_data + row * student.stride(0), student.stride(1), cols, padded_cols,
                                            inv_temperature, x.data());
      bool any_teacher = false;
      double p_topk = 0;
      for (int64_t b = 0; b < k; ++b) {
        const int64_t j = static_cast<int64_t>(i_data[row * indices.stride(0) + b * indices.stride(1)]);
        const double log_p = static_cast<double>(l_data[row * logprobs.stride(0) + b * logprobs.stride(1)]);
        TORCH_CHECK_VALUE(j >= 0 && j < cols, "topk_indices[", row, ", ", b, "] = ", j, " is not a class of the ",
                          cols, " logits");
        TORCH_CHECK_VALUE(!in_topk[j], "topk_indices row ", row, " holds class ", j, " twice: the k classes must "
                          "be distinct");
        TORCH_CHECK_VALUE(log_p <= 0, "topk_logprobs[", row, ", ", b, "] = ", log_p, " is not a log-probability "
                          "(<= 0, not NaN)");
        in_topk[j] = 1;
        classes[b] = j;
        x_topk[b] = x[j];
        lp[b] = log_p;
        p_topk += std::exp(log_p);
        any_teacher = any_teacher || log_p > -std::numeric_limits<double>::infinity();
      }
      for (int64_t b = 0; b < k; ++b) {
        in_topk[classes[b]] = 0;
        x[classes[b]] = -std::numeric_limits<acc_t>::infinity();
      }
      if ((mask && !mask[row]) || !any_teacher) {  // no teacher: the row is 0, like a masked one
        finish_empty_row(0.0);
        continue;
      }
      if (!std::isfinite(row_max)) {  // NaN or +inf logits, or every class at -inf
        finish_empty_row(std::numeric_limits<double>::quiet_NaN());
        continue;
      }
      // sweep 2: the tail's max and sum, then the row's normaliser
      const acc_t max_tail = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); },
                                                        x.data(), padded_cols);
      const bool has_tail = max_tail > -std::numeric_limits<acc_t>::infinity();
      double z_tail = 0;
      if (has_tail) {
        const acc_t* xs = x.data();
        acc_t* es = e.data();
        const Vec shift(-max_tail);
        z_tail = padded_row_sums<acc_t, 1>(padded_cols, [=](int64_t i) {
          const Vec value = exp_nonpositive(Vec::loadu(xs + i) + shift);
          value.store(es + i);
          return std::array<Vec, 1>{value};
        })[0];
      }
      double max_all = has_tail ? double(max_tail) : -std::numeric_limits<double>::infinity();
      for (int64_t b = 0; b < k; ++b) max_all = std::max(max_all, x_topk[b]);
      double z = has_tail ? z_tail * std::exp(double(max_tail) - max_all) : 0.0;
      for (int64_t b = 0; b < k; ++b) z += std::exp(x_topk[b] - max_all);
      const double log_z = std::log(z);
      // sweep 3: the bins
      for (int64_t b = 0; b < k; ++b) lq[b] = x_topk[b] - max_all - log_z;
      lq[k] = has_tail ? double(max_tail) - max_all + std::log(z_tail / z) : -std::numeric_limits<double>::infinity();
      lp[k] = tail_is_empty ? -std::numeric_limits<double>::infinity() : std::log(std::max(0.0, 1.0 - p_topk));
      lo.evaluate(lq, lp, log_clip, params.surrogate);
      if (params.alpha_min == params.alpha_max) {
        hi = lo;
      } else {
        hi.evaluate(lq, lp, log_clip, params.surrogate);
      }
      const bool use_lo = lo.divergence > hi.divergence;  // strict, as in AlphaNet; NaN selects alpha_max
      const BinBranch& chosen = use_lo ? lo : hi;
      row_values[row] = (params.surrogate ? chosen.surrogate : chosen.divergence) * t_squared * grad_scale;
      if (!g_row) continue;
      // sweep 4: the gradient
      const auto gradient_of = [&](int64_t b) {
        return row_grad_scale * sparse_kd::bin_gradient(chosen.branch, chosen.alpha, log_clip, chosen.statistic,
                                                        lq[b], lp[b]);
      };
      const double tail_gradient = gradient_of(k);
      if (has_tail) {
        const Vec tail_factor(acc_t(tail_gradient / z_tail));
        acc_t* es = e.data();
        for (int64_t i = 0; i < padded_cols; i += Vec::size()) (Vec::loadu(es + i) * tail_factor).store(es + i);
      } else {
        std::fill(e.begin(), e.end(), acc_t(0));
      }
      // Without a tail class the tail's log q is a constant (-inf) and its bin gradient (forward KL: -p_tail)
      // stays with the k classes: G_b - q_b sum_I G = G_b + q_b G_tail (the bins' gradients sum to 0).
      const double spill = has_tail ? 0.0 : tail_gradient;
      for (int64_t b = 0; b < k; ++b) e[classes[b]] = acc_t(gradient_of(b) + std::exp(lq[b]) * spill);
      write_gradient_row(e.data(), g_row, cols);
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();  // order the non-temporal gradient stores before the task ends
#endif
  });
}

// ---------------------------------------------------------------------------------------------
// Launcher: argument checks, dtype dispatch, reduction.

std::tuple<at::Tensor, at::Tensor> sparse_adaptive_kd_cpu(const at::Tensor& student, const at::Tensor& indices,
                                                          const at::Tensor& logprobs,
                                                          const std::optional<at::Tensor>& mask, double alpha_min,
                                                          double alpha_max, double clip, double temperature,
                                                          int64_t reduction, bool surrogate, bool compute_grad) {
  check_sparse_arguments(student, indices, logprobs, mask, alpha_min, alpha_max, clip, temperature, reduction);
  check_cpu_capability();
  const int64_t rows = student.size(0);
  const at::ScalarType value_dtype = c10::promoteTypes(student.scalar_type(), logprobs.scalar_type());

  at::Tensor mask_contiguous = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_data = mask.has_value() ? mask_contiguous.const_data_ptr<bool>() : nullptr;
  double valid_rows = static_cast<double>(rows);
  if (mask_data) valid_rows = static_cast<double>(std::count(mask_data, mask_data + rows, true));
  const double grad_scale = reduction == kReductionMean ? (valid_rows > 0 ? 1.0 / valid_rows : 0.0) : 1.0;

  at::Tensor row_values = at::empty({rows}, student.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? at::empty({rows, student.size(1)}, student.options())
                                 : at::empty({0}, student.options());
  if (compute_grad) advise_huge_pages(grad);
  const SparseParams params{alpha_min, alpha_max, clip, temperature, surrogate};
  dispatch_input_dtypes(student.scalar_type(), logprobs.scalar_type(), [&](auto acc, auto s, auto l) {
    using acc_t = decltype(acc);
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_adaptive_kd_cpu_indices", [&] {
      sparse_kd_rows<acc_t, decltype(s), index_t, decltype(l)>(student, indices, logprobs, mask_data, params,
                                                                grad_scale, row_values.mutable_data_ptr<double>(),
                                                                compute_grad ? &grad : nullptr);
    });
  });

  if (reduction == kReductionNone) return {row_values.to(value_dtype), grad};
  const double* values = row_values.const_data_ptr<double>();
  double total = 0.0;  // in row order: the result does not depend on the thread count
  for (int64_t row = 0; row < rows; ++row) total += values[row];
  return {at::scalar_tensor(total, student.options().dtype(value_dtype)), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphadiv, CPU, m) { m.impl("sparse_adaptive_kd", &sparse_adaptive_kd_cpu); }

}  // namespace alphadiv
