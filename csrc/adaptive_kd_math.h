// Shared definitions of the adaptive alpha-divergence KD op, used by every backend.
//
// Per row, with temperature T (logits already divided by T):
//   lq = log_softmax(student)   q = exp(lq)
//   lp = log_softmax(teacher)   p = exp(lp)
//   lw = lp - lq                (log importance ratio, never formed as p / q)
//
//   branch      divergence D                      d D / d student_j            kept statistic
//   ForwardKL   sum p * lw                        q_j - p_j                     sum p * lw
//   ReverseKL   -R,  R = sum q * log c            q_j * (R - log c_j)           R
//               log c = min(lw, log clip)
//   General     B / (alpha (alpha - 1))           (q_j / alpha) (B - (c_j - 1)) B = sum q (c - 1)
//               c = exp(min(alpha lw, log clip))
//   NegOne      General with alpha = -1, where c = min(q / p, clip) needs no exponential.
//
// B is accumulated as sum q (c - 1) rather than sum q c - 1: both are equal because sum q = 1, but
// the first is exactly 0 when p == q and loses no digits when the distributions are close.
// Terms with q == 0 (alpha branches) or p == 0 (forward KL) are the limits, i.e. 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ALPHADIV_HOST_DEVICE __host__ __device__
#else
#define ALPHADIV_HOST_DEVICE
#endif

namespace alphadiv {

// |alpha - 1| and |alpha| below this select the KL limits, as the AlphaNet reference code does.
constexpr double kAlphaLimitTolerance = 1e-3;

// Largest temperature: the divergence is of order 1/T^2 before the T^2 factor, and above this it is
// below the fp32 rounding of its terms (at T = 1e5 fp32 gives -26.4 where float64 gives 4.60).
constexpr double kMaxTemperature = 100.0;

enum class Branch : int { ForwardKL = 0, ReverseKL = 1, General = 2, NegOne = 3 };

enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

inline Branch classify_alpha(double alpha) {
  if (alpha - 1.0 < kAlphaLimitTolerance && 1.0 - alpha < kAlphaLimitTolerance) return Branch::ForwardKL;
  if (alpha < kAlphaLimitTolerance && -alpha < kAlphaLimitTolerance) return Branch::ReverseKL;
  if (alpha == -1.0) return Branch::NegOne;
  return Branch::General;
}

// Divergence of a branch from its kept statistic (for ForwardKL the statistic is sum p * lw itself).
template <typename acc_t>
ALPHADIV_HOST_DEVICE inline acc_t branch_divergence(Branch branch, acc_t alpha, acc_t stat) {
  switch (branch) {
    case Branch::ForwardKL: return stat;
    case Branch::ReverseKL: return -stat;
    default: return stat / (alpha * (alpha - acc_t(1)));
  }
}

}  // namespace alphadiv
