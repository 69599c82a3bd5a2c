// Per-bin math of alphadiv::sparse_adaptive_kd, shared by its CPU and CUDA kernels.
//
// A row's teacher is k classes I with log-probabilities lp_I plus a tail bin of mass
// p_tail = max(0, 1 - sum exp(lp_I)) (0 when I holds every class). The student's bins are
// lq_b = log q_b for b in I and lq_tail = log sum_{j not in I} q_j. On the k + 1 bins the loss is the
// dense op's (adaptive_kd_math.h): with lw = lp - lq,
//
//   branch      statistic S = sum over bins of        divergence      d D / d z_b (bin logits z)
//   ForwardKL   p lw                                  S               q_b - p_b
//   ReverseKL   q log c,  log c = min(lw, log clip)   -S              q_b (S - log c_b)
//   General     q (c - 1), c = exp(min(a lw, log clip))  S / (a(a-1))  (q_b / a) (S - (c_b - 1))
//   (alpha = -1 is General here: k + 1 terms need no cheaper form)
//
// and the surrogate -sum rho_b q_b lq_b as the dense op's. The gradient wrt a student logit j is
// G_b(j) q_j / q_b(j): for j in I that is G_b itself; for j outside I it is G_tail q_j / q_tail, computed
// as G_tail exp(x_j - m_tail) / Z_tail with m_tail, Z_tail the max and sum over the tail's classes
// (finite however small the tail's mass). When no class outside I has student mass (q_tail = 0), log q_tail
// is a constant and the tail's G (forward KL: -p_tail; 0 on the alpha branches) stays with the k classes:
// G_b - q_b sum_I G = G_b + q_b G_tail, as the bins' gradients sum to 0. Terms of a bin with q = 0 (alpha
// branches) or p = 0 (forward KL) are 0.
#pragma once

#include <cmath>

#include "adaptive_kd_math.h"

namespace alphadiv {
namespace sparse_kd {

// A bin's term of the statistic S (see the table).
template <typename acc_t>
ALPHADIV_HOST_DEVICE inline acc_t statistic_term(Branch branch, acc_t alpha, acc_t log_clip, acc_t lq, acc_t lp) {
  const acc_t q = exp(lq);
  if (branch == Branch::ForwardKL) {
    const acc_t p = exp(lp);
    return p == acc_t(0) ? acc_t(0) : p * (lp - lq);
  }
  if (q == acc_t(0)) return acc_t(0);
  if (branch == Branch::ReverseKL) return q * fmin(lp - lq, log_clip);
  return q * expm1(fmin(alpha * (lp - lq), log_clip));
}

// A bin's term of the surrogate, -rho_b q_b lq_b.
template <typename acc_t>
ALPHADIV_HOST_DEVICE inline acc_t surrogate_term(Branch branch, acc_t alpha, acc_t log_clip, acc_t lq, acc_t lp) {
  const acc_t q = exp(lq);
  if (branch == Branch::ForwardKL) {
    const acc_t p = exp(lp);
    return p == acc_t(0) ? acc_t(0) : -p * lq;
  }
  if (q == acc_t(0)) return acc_t(0);
  if (branch == Branch::ReverseKL) return -q * (fmin(lp - lq, log_clip) - acc_t(1)) * lq;
  const acc_t c = exp(fmin(alpha * (lp - lq), log_clip));
  return -q * (c / alpha + acc_t(1) / (alpha * (alpha - acc_t(1)))) * lq;
}

// d D / d z_b of a bin, given the branch's statistic S.
template <typename acc_t>
ALPHADIV_HOST_DEVICE inline acc_t bin_gradient(Branch branch, acc_t alpha, acc_t log_clip, acc_t statistic, acc_t lq,
                                               acc_t lp) {
  const acc_t q = exp(lq);
  if (branch == Branch::ForwardKL) return q - exp(lp);
  if (q == acc_t(0)) return acc_t(0);
  if (branch == Branch::ReverseKL) return q * (statistic - fmin(lp - lq, log_clip));
  return q / alpha * (statistic - expm1(fmin(alpha * (lp - lq), log_clip)));
}

}  // namespace sparse_kd
}  // namespace alphadiv
