// Fused adaptive alpha-divergence KD on CUDA: the kernel, its launch plan and the host wrapper.
//
// nvcc compiles this header into the CUDA extension (adaptive_kd_cuda.cu supplies the <<<>>> launch);
// the CPU test in tests/cuda_emulation compiles the same code with CUDA's thread model emulated, so
// the indexing, the vector packs, the register and shared-memory caches and every reduction are
// tested without a GPU.
//
// Layout. A row is handled by a warp (rows of up to 1024 columns) or by a block of 512 threads.
// Columns are read in packs of 16 bytes (4 fp32 or 8 fp16/bf16 values, one 128-bit load) when both
// inputs share a dtype, have unit column stride and are 16-byte aligned, else one element at a time
// with any strides. The row is read from memory once into on-chip storage where it fits: up to 32
// elements (at most 8 packs) of each input per thread in registers (rows of up to 16384 columns in
// packs), then, for a block per row, as many further packs as the device's shared memory per block
// holds (H100: 227 KB, another 57344 bf16 or 28672 fp32 columns). The rest of a longer row is
// streamed, one pack per thread at a time, and re-read by the later sweeps (from L2 where it stays
// resident). Offsets are int64.
//
// Math (details in ../adaptive_kd_math.h). With xs = s/T - max_s, xt = t/T - max_t, four sweeps over
// the row, each followed by one reduction over the row's threads (warp shuffles, then shared memory
// across the warps of a block), accumulating in fp32 (fp64 for fp64 inputs):
//   1. the row maxima;
//   2. Z_s = sum exp(xs), Z_t = sum exp(xt) and K = sum exp(xt)(xt - xs), whence
//      forward KL = K / Z_t + log(Z_s / Z_t)  (one log of the ratio: log Z_s - log Z_t would be a
//      difference of two ~log C numbers whose rounding dominates when p is close to q);
//   3. the statistics (R or B) of both alphas that are not forward KL, in one sweep;
//   4. the chosen branch's gradient, scaled by the reduction's row weight times T and written once in
//      the student's dtype, and the surrogate when asked for.
// Each row's value and gradient carry the reduction's row weight (1, or 1 / rows for a mean), so a
// reduced loss is one sum of the row values. A masked mean divides by the count of valid rows, read
// on the device: nothing synchronises with the host and the op can be captured in a CUDA graph.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../adaptive_kd_checks.h"
#include "../adaptive_kd_math.h"

namespace alphadiv {
namespace cuda_kd {

constexpr int kWarp = 32;
constexpr int kWarpRowThreads = 256;   // block size when a warp handles a row: 8 rows per block
constexpr int kBlockRowThreads = 512;  // block size when a block handles a row
constexpr int kPackBytes = 16;         // one 128-bit load
constexpr int kMaxCachedElements = 32;  // elements of each input a thread keeps in registers
constexpr int64_t kWarpRowMaxCols = 1024;

// ---------------------------------------------------------------------------------------------
// Device math

template <typename acc_t>
__device__ __forceinline__ acc_t device_exp(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return expf(x); else return exp(x);
}
// exp of the sweeps. Inputs of 16 bits use the SFU's ex2 (__expf: about 2 ulp, plus the rounding of
// x log2(e), relative 6e-8 |x|): their gradients are rounded to 8 or 11 bits, and the accurate expf
// costs several more instructions per call, at 4 to 6 calls per element.
template <bool kFast, typename acc_t>
__device__ __forceinline__ acc_t sweep_exp(acc_t x) {
  if constexpr (kFast) return __expf(x); else return device_exp(x);
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
__device__ __forceinline__ acc_t device_fma(acc_t a, acc_t b, acc_t c) {
  if constexpr (std::is_same_v<acc_t, float>) return fmaf(a, b, c); else return fma(a, b, c);
}
// a / b from a precomputed 1 / b: the product, corrected by its residual (an IEEE division costs
// several times more, and the kernel divides each element by Z_s and Z_t).
template <typename acc_t>
__device__ __forceinline__ acc_t quotient(acc_t a, acc_t b, acc_t inverse_b) {
  const acc_t estimate = a * inverse_b;
  return device_fma(device_fma(-estimate, b, a), inverse_b, estimate);
}
template <typename acc_t>
__device__ __forceinline__ acc_t max_propagating_nan(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// Reduces kN values over the kGroup threads of a row group (a sum, or a NaN-propagating max); every
// thread of the group gets the results. Groups larger than a warp combine warps through `shared`
// (kWarp * kN values).
template <int kGroup, bool kMax, int kN, typename acc_t>
__device__ __forceinline__ void group_reduce(acc_t (&values)[kN], acc_t* shared) {
  const auto combine = [](acc_t a, acc_t b) { return kMax ? max_propagating_nan(a, b) : a + b; };
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      values[n] = combine(values[n], __shfl_xor_sync(0xffffffffu, values[n], offset));
    }
  }
  if constexpr (kGroup > kWarp) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const acc_t neutral = kMax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
    __syncthreads();  // the previous reduction's readers are done with `shared`
    if (lane == 0) {
#pragma unroll
      for (int n = 0; n < kN; ++n) shared[n * kWarp + warp] = values[n];
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      values[n] = lane < kGroup / kWarp ? shared[n * kWarp + lane] : neutral;
      for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
        values[n] = combine(values[n], __shfl_xor_sync(0xffffffffu, values[n], offset));
      }
    }
  }
}

template <typename acc_t>
struct Params {
  int64_t rows, cols, s_row_stride, s_col_stride, t_row_stride, t_col_stride;
  int64_t shared_packs;  // packs of each input per thread kept in dynamic shared memory
  acc_t inv_temperature, temperature, t_squared, alpha_lo, alpha_hi, clip, log_clip;
  acc_t row_weight;  // of the reduction, unless the device computes it (masked mean)
  Branch branch_lo, branch_hi;
  bool same_alpha, surrogate;
};

// c - 1 (General, NegOne) or log c (ReverseKL) at one element with max-shifted logits xs, xt.
template <bool kFastExp, typename acc_t>
__device__ __forceinline__ acc_t clipped_weight(Branch branch, acc_t xs, acc_t xt, acc_t alpha, acc_t log_ratio,
                                                acc_t zt_over_zs, const Params<acc_t>& p) {
  if (branch == Branch::NegOne) {
    const acc_t ratio = sweep_exp<kFastExp>(xs - xt) * zt_over_zs;  // q / p; inf where p == 0
    return (ratio < p.clip ? ratio : p.clip) - acc_t(1);
  }
  const acc_t log_w = (xt - xs) + log_ratio;
  if (branch == Branch::ReverseKL) return log_w < p.log_clip ? log_w : p.log_clip;
  const acc_t scaled = log_w * alpha;
  return device_expm1(scaled < p.log_clip ? scaled : p.log_clip);
}

#ifndef ALPHADIV_CUDA_EMULATION
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  return dynamic_shared;
}
#endif

// kVec consecutive columns: one 16-byte load when kVec * sizeof(T) == 16.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// ---------------------------------------------------------------------------------------------
// Kernel: kGroup threads per row (kWarp or kBlockRowThreads), kVec columns per pack (1: any
// strides), kCached packs per thread held in registers.

// At most 8 packs and 32 elements of each input: beyond that ptxas spills (bf16 at 8 packs of 8).
template <int kVec>
constexpr int kMaxCachedPacks = kMaxCachedElements / kVec < 8 ? kMaxCachedElements / kVec : 8;

// Launch bounds: a block per row runs one block per SM (it takes the shared memory), so ptxas may use
// 128 registers per thread; without the minimum of 1 it aims at two blocks and spills at 64. A warp
// per row runs at least two blocks of 8 rows per SM.
template <int kGroup, int kVec, int kCached, typename acc_t, typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kGroup > kWarp ? kGroup : kWarpRowThreads, kGroup > kWarp ? 1 : 2)
adaptive_kd_kernel(Params<acc_t> p, const student_t* __restrict__ student, const teacher_t* __restrict__ teacher,
                   student_t* __restrict__ grad, acc_t* __restrict__ row_values, const bool* __restrict__ mask,
                   const acc_t* __restrict__ device_row_weight) {
  using StudentPack = Pack<student_t, kVec>;
  using TeacherPack = Pack<teacher_t, kVec>;
  constexpr bool kFastExp = sizeof(student_t) == 2 && sizeof(teacher_t) == 2;
  __shared__ acc_t shared[kWarp * 3];
  constexpr int kBlock = kGroup > kWarp ? kGroup : kWarpRowThreads;
  const int lane = threadIdx.x % kGroup;
  const int64_t row = int64_t(blockIdx.x) * (kBlock / kGroup) + threadIdx.x / kGroup;
  if (row >= p.rows) return;  // a whole group at once (block-per-row: the whole block)
  const int64_t packs = p.cols / kVec;  // kVec divides cols
  StudentPack* grad_row = grad ? reinterpret_cast<StudentPack*>(grad + row * p.cols) : nullptr;
  if (mask && !mask[row]) {
    if (lane == 0) row_values[row] = acc_t(0);
    if (grad_row) {
      StudentPack zero;
#pragma unroll
      for (int j = 0; j < kVec; ++j) zero.v[j] = static_cast<student_t>(0.0f);
      for (int64_t k = lane; k < packs; k += kGroup) grad_row[k] = zero;
    }
    return;
  }
  const acc_t row_weight = device_row_weight ? device_row_weight[0] : p.row_weight;
  const student_t* s = student + row * p.s_row_stride;
  const teacher_t* t = teacher + row * p.t_row_stride;
  const acc_t inv_t = p.inv_temperature;

  const auto load_student = [&](int64_t k) {
    if constexpr (kVec == 1) return StudentPack{{s[k * p.s_col_stride]}};
    else return reinterpret_cast<const StudentPack*>(s)[k];
  };
  const auto load_teacher = [&](int64_t k) {
    if constexpr (kVec == 1) return TeacherPack{{t[k * p.t_col_stride]}};
    else return reinterpret_cast<const TeacherPack*>(t)[k];
  };
  // This thread owns packs i * kGroup + lane for i < owned: the first kCached stay in registers, the
  // next p.shared_packs in shared memory (slot (i - kCached) * kGroup + lane: each thread reads back
  // only its own), the rest are streamed. The shared and streamed loops have no early exits and unroll
  // by 4, so a thread has four loads of each input in flight instead of one.
  const int64_t owned = lane < packs ? (packs - lane + kGroup - 1) / kGroup : 0;
  const int64_t shared_end = owned < kCached + p.shared_packs ? owned : kCached + p.shared_packs;
  StudentPack cached_s[kCached];
  TeacherPack cached_t[kCached];
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    if (i < owned) {
      cached_s[i] = load_student(int64_t(i) * kGroup + lane);
      cached_t[i] = load_teacher(int64_t(i) * kGroup + lane);
    }
  }
  StudentPack* shared_s = nullptr;
  TeacherPack* shared_t = nullptr;
  if (p.shared_packs > 0) {
    shared_s = reinterpret_cast<StudentPack*>(dynamic_shared_memory());
    shared_t = reinterpret_cast<TeacherPack*>(shared_s + p.shared_packs * kGroup);
#pragma unroll 4
    for (int64_t i = kCached; i < shared_end; ++i) {
      const int64_t slot = (i - kCached) * kGroup + lane;
      shared_s[slot] = load_student(i * kGroup + lane);
      shared_t[slot] = load_teacher(i * kGroup + lane);
    }
  }
  // Calls visit(k, xs, xt) for each pack k of this thread, with xs = s/T and xt = t/T in acc_t.
  const auto for_each_pack = [&](auto&& visit) {
    acc_t xs[kVec], xt[kVec];
    const auto convert = [&](const StudentPack& sp, const TeacherPack& tp) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        xs[j] = static_cast<acc_t>(sp.v[j]) * inv_t;
        xt[j] = static_cast<acc_t>(tp.v[j]) * inv_t;
      }
    };
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      if (i < owned) {
        convert(cached_s[i], cached_t[i]);
        visit(int64_t(i) * kGroup + lane, xs, xt);
      }
    }
    for (int64_t i = kCached; i < shared_end; ++i) {
      const int64_t slot = (i - kCached) * kGroup + lane;
      const StudentPack sp = shared_s[slot];  // one 128-bit shared load each, not one per element
      const TeacherPack tp = shared_t[slot];
      convert(sp, tp);
      visit(i * kGroup + lane, xs, xt);
    }
#pragma unroll 4
    for (int64_t i = kCached + p.shared_packs; i < owned; ++i) {
      convert(load_student(i * kGroup + lane), load_teacher(i * kGroup + lane));
      visit(i * kGroup + lane, xs, xt);
    }
  };

  // 1. maxima
  acc_t maxima[2] = {-std::numeric_limits<acc_t>::infinity(), -std::numeric_limits<acc_t>::infinity()};
  for_each_pack([&](int64_t, const acc_t(&xs)[kVec], const acc_t(&xt)[kVec]) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      maxima[0] = max_propagating_nan(maxima[0], xs[j]);
      maxima[1] = max_propagating_nan(maxima[1], xt[j]);
    }
  });
  group_reduce<kGroup, true>(maxima, shared);
  const acc_t max_s = maxima[0], max_t = maxima[1];

  // 2. normalisers and the forward-KL sum
  acc_t sums[3] = {0, 0, 0};  // Z_s, Z_t, K
  for_each_pack([&](int64_t, const acc_t(&xs)[kVec], const acc_t(&xt)[kVec]) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t ds = xs[j] - max_s, dt = xt[j] - max_t;
      const acc_t es = sweep_exp<kFastExp>(ds), et = sweep_exp<kFastExp>(dt);
      sums[0] += es;
      sums[1] += et;
      sums[2] += et == acc_t(0) ? acc_t(0) : et * (dt - ds);
    }
  });
  group_reduce<kGroup, false>(sums, shared);
  const acc_t zs = sums[0], zt = sums[1];
  const acc_t log_zs = device_log(zs);
  const acc_t log_ratio = device_log(zs / zt);
  const acc_t zt_over_zs = zt / zs;
  const acc_t forward_kl = sums[2] / zt + log_ratio;

  // 3. statistics of the alpha branches that are not forward KL (uniform over the group)
  const bool need_lo = p.branch_lo != Branch::ForwardKL;
  const bool need_hi = !p.same_alpha && p.branch_hi != Branch::ForwardKL;
  acc_t stats[2] = {forward_kl, forward_kl};
  if (need_lo || need_hi) {
    acc_t partial[2] = {0, 0};
    for_each_pack([&](int64_t, const acc_t(&xs)[kVec], const acc_t(&xt)[kVec]) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t ds = xs[j] - max_s, dt = xt[j] - max_t;
        const acc_t es = sweep_exp<kFastExp>(ds);
        if (es == acc_t(0)) continue;  // q == 0: the term's limit is 0
        if (need_lo) {
          partial[0] += es * clipped_weight<kFastExp>(p.branch_lo, ds, dt, p.alpha_lo, log_ratio, zt_over_zs, p);
        }
        if (need_hi) {
          partial[1] += es * clipped_weight<kFastExp>(p.branch_hi, ds, dt, p.alpha_hi, log_ratio, zt_over_zs, p);
        }
      }
    });
    group_reduce<kGroup, false>(partial, shared);
    if (need_lo) stats[0] = partial[0] / zs;
    if (need_hi) stats[1] = partial[1] / zs;
  }
  if (p.same_alpha) stats[1] = stats[0];
  const acc_t d_lo = branch_divergence(p.branch_lo, p.alpha_lo, stats[0]);
  const acc_t d_hi = branch_divergence(p.branch_hi, p.alpha_hi, stats[1]);
  const bool use_lo = d_lo > d_hi;  // strict, as in AlphaNet; NaN selects alpha_max
  const Branch branch = use_lo ? p.branch_lo : p.branch_hi;
  const acc_t alpha = use_lo ? p.alpha_lo : p.alpha_hi;
  const acc_t stat = use_lo ? stats[0] : stats[1];
  acc_t value = use_lo ? d_lo : d_hi;

  // 4. gradient of the chosen branch, and the surrogate (branch and surrogate are uniform per row;
  // no element divides: q and p use refined reciprocals, q / p is exp(xs - xt) Z_t / Z_s)
  if (grad_row || p.surrogate) {
    const acc_t scale = row_weight * p.temperature;
    const acc_t inv_zs = acc_t(1) / zs, inv_zt = acc_t(1) / zt, inv_alpha = acc_t(1) / alpha;
    const acc_t general_offset = acc_t(1) / (alpha * (alpha - acc_t(1)));  // of the general surrogate's rho
    acc_t surrogate[1] = {0};
    for_each_pack([&](int64_t k, const acc_t(&xs)[kVec], const acc_t(&xt)[kVec]) {
      StudentPack out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t ds = xs[j] - max_s, dt = xt[j] - max_t;
        const acc_t q = quotient(sweep_exp<kFastExp>(ds), zs, inv_zs);
        acc_t g, q_rho, seen;
        if (branch == Branch::ForwardKL) {
          const acc_t pr = quotient(sweep_exp<kFastExp>(dt), zt, inv_zt);
          g = q - pr;
          q_rho = pr;
          seen = pr;
        } else {
          const acc_t w = clipped_weight<kFastExp>(branch, ds, dt, alpha, log_ratio, zt_over_zs, p);
          seen = q;
          if (branch == Branch::ReverseKL) {
            g = q * (stat - w);
            q_rho = q * (w - acc_t(1));
          } else {
            g = q * (stat - w) * inv_alpha;
            q_rho = q * ((w + acc_t(1)) * inv_alpha + general_offset);
          }
          if (q == acc_t(0)) g = acc_t(0);
        }
        out.v[j] = static_cast<student_t>(g * scale);
        if (p.surrogate && seen != acc_t(0)) surrogate[0] -= q_rho * (ds - log_zs);
      }
      if (grad_row) grad_row[k] = out;
    });
    if (p.surrogate) {
      group_reduce<kGroup, false>(surrogate, shared);
      value = surrogate[0];
    }
  }
  if (lane == 0) row_values[row] = value * p.t_squared * row_weight;
}

// ---------------------------------------------------------------------------------------------
// Launch plan: which instance of the kernel runs, on how many blocks of how many threads.

struct Pointers {
  const void* student;
  const void* teacher;
  void* grad;
  void* row_values;
  const bool* mask;
  const void* device_row_weight;  // nullptr: Params::row_weight
};

// Launches adaptive_kd_kernel<kGroup, kVec, kCached> through
// `launch(kernel, blocks, threads, shared_bytes, args...)`. A block per row also keeps in shared memory
// the packs beyond the registers, as many as `max_shared_bytes` holds.
template <int kGroup, int kVec, int kCached, typename acc_t, typename student_t, typename teacher_t, typename Launch>
void launch_instance(Params<acc_t> params, const Pointers& ptr, int64_t max_shared_bytes, Launch&& launch) {
  constexpr int kThreads = kGroup > kWarp ? kGroup : kWarpRowThreads;
  constexpr int kRowsPerBlock = kThreads / kGroup;
  constexpr int64_t kBytesPerPackRound = int64_t(kGroup) * kVec * (sizeof(student_t) + sizeof(teacher_t));
  const int64_t blocks = (params.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t packs_beyond_registers = (params.cols / kVec + kGroup - 1) / kGroup - kCached;
  params.shared_packs = kGroup > kWarp && packs_beyond_registers > 0
                            ? std::min(packs_beyond_registers, max_shared_bytes / kBytesPerPackRound)
                            : 0;
  const int64_t shared_bytes = params.shared_packs * kBytesPerPackRound;
  launch(&adaptive_kd_kernel<kGroup, kVec, kCached, acc_t, student_t, teacher_t>, blocks, kThreads, shared_bytes,
         params, static_cast<const student_t*>(ptr.student), static_cast<const teacher_t*>(ptr.teacher),
         static_cast<student_t*>(ptr.grad), static_cast<acc_t*>(ptr.row_values), ptr.mask,
         static_cast<const acc_t*>(ptr.device_row_weight));
}

// The smallest register cache (1, 2, 4 or the maximum packs per thread) that holds the row, else the
// maximum with the rest streamed: fewer registers for short rows keep more blocks resident.
template <int kGroup, int kVec, typename acc_t, typename student_t, typename teacher_t, typename Launch>
void launch_cached(const Params<acc_t>& params, const Pointers& ptr, int64_t max_shared_bytes, Launch&& launch) {
  constexpr int kMost = kMaxCachedPacks<kVec>;
  const int64_t packs_per_thread = (params.cols / kVec + kGroup - 1) / kGroup;
  if (packs_per_thread <= 1) {
    return launch_instance<kGroup, kVec, 1, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes, launch);
  }
  if (packs_per_thread <= 2) {
    return launch_instance<kGroup, kVec, 2, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes, launch);
  }
  if constexpr (kMost > 4) {
    if (packs_per_thread <= 4) {
      return launch_instance<kGroup, kVec, 4, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes, launch);
    }
  }
  launch_instance<kGroup, kVec, kMost, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes, launch);
}

// Whether rows can be read in 16-byte packs: unit column strides, pack-aligned rows and bases.
template <int kVec>
bool can_use_packs(const at::Tensor& student, const at::Tensor& teacher) {
  const auto aligned = [](const at::Tensor& x) {
    return x.stride(1) == 1 && x.stride(0) % kVec == 0 &&
           reinterpret_cast<std::uintptr_t>(x.const_data_ptr()) % kPackBytes == 0;
  };
  return student.size(1) % kVec == 0 && aligned(student) && aligned(teacher);
}

template <typename acc_t, typename student_t, typename teacher_t, typename Launch>
void launch_rows(const Params<acc_t>& params, const at::Tensor& student, const at::Tensor& teacher,
                 const Pointers& ptr, int64_t max_shared_bytes, Launch&& launch) {
  // Packs for one dtype of 2 or 4 bytes in both inputs; otherwise single elements with any strides.
  if constexpr (std::is_same_v<student_t, teacher_t> && sizeof(student_t) <= 4) {
    constexpr int kVec = kPackBytes / sizeof(student_t);
    if (can_use_packs<kVec>(student, teacher)) {
      if (params.cols / kVec <= int64_t(kWarp) * kMaxCachedPacks<kVec>) {
        return launch_cached<kWarp, kVec, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes, launch);
      }
      return launch_cached<kBlockRowThreads, kVec, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes,
                                                                                launch);
    }
  }
  if (params.cols <= kWarpRowMaxCols) {
    return launch_instance<kWarp, 1, kMaxCachedPacks<1>, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes,
                                                                                     launch);
  }
  launch_instance<kBlockRowThreads, 1, kMaxCachedPacks<1>, acc_t, student_t, teacher_t>(params, ptr, max_shared_bytes,
                                                                                        launch);
}

// ---------------------------------------------------------------------------------------------
// Host wrapper: the op's semantics around the kernel; `launch` runs a kernel instance on the
// current device and stream (or, in the CPU test, in CUDA's emulated thread model), with up to
// `max_shared_bytes` of dynamic shared memory per block.

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> adaptive_kd_rows(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& mask, double alpha_min,
                                                    double alpha_max, double clip, double temperature,
                                                    int64_t reduction, bool surrogate, bool compute_grad,
                                                    int64_t max_shared_bytes, Launch&& launch) {
  check_arguments(student, teacher, mask, alpha_min, alpha_max, clip, temperature, reduction);
  const int64_t rows = student.size(0), cols = student.size(1);
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 rows, got ", rows);
  const at::ScalarType value_dtype = c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
  const at::ScalarType acc_dtype = value_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = student.options().dtype(acc_dtype);

  at::Tensor mask_contiguous = mask.has_value() ? mask->contiguous() : at::Tensor();
  // Row weight: 1 / valid rows for a mean (a mean over no rows is 0), else 1; on the device for a
  // masked mean, whose count is there.
  const double row_weight = reduction == kReductionMean && rows > 0 ? 1.0 / double(rows) : 1.0;
  at::Tensor device_row_weight = mask.has_value() && reduction == kReductionMean
                                     ? mask_contiguous.sum().to(acc_dtype).clamp_min(1).reciprocal().reshape({1})
                                     : at::Tensor();
  at::Tensor row_values = at::empty({rows}, acc_options);
  at::Tensor grad = compute_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  const Pointers ptr{student.const_data_ptr(), teacher.const_data_ptr(),
                     compute_grad ? grad.mutable_data_ptr() : nullptr, row_values.mutable_data_ptr(),
                     mask.has_value() ? mask_contiguous.const_data_ptr<bool>() : nullptr,
                     device_row_weight.defined() ? device_row_weight.const_data_ptr() : nullptr};

  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "adaptive_kd_cuda_student", [&] {
      using student_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "adaptive_kd_cuda_teacher",
                                      [&] {
        using teacher_t = scalar_t;
        const auto run = [&](auto acc) {
          using acc_t = decltype(acc);
          const Params<acc_t> params{rows, cols, student.stride(0), student.stride(1), teacher.stride(0),
                                     teacher.stride(1), 0, acc_t(1.0 / temperature), acc_t(temperature),
                                     acc_t(temperature * temperature), acc_t(alpha_min), acc_t(alpha_max), acc_t(clip),
                                     acc_t(std::log(clip)), acc_t(row_weight), classify_alpha(alpha_min),
                                     classify_alpha(alpha_max), alpha_min == alpha_max, surrogate};
          launch_rows<acc_t, student_t, teacher_t>(params, student, teacher, ptr, max_shared_bytes, launch);
        };
        // fp64 accumulation exactly when an input is fp64 (value_dtype is then double)
        if constexpr (std::is_same_v<student_t, double> || std::is_same_v<teacher_t, double>) run(double{});
        else run(float{});
      });
    });
  }
  if (reduction == kReductionNone) return {row_values.to(value_dtype), grad};
  return {row_values.sum().to(value_dtype), grad};
}

}  // namespace cuda_kd
}  // namespace alphadiv
