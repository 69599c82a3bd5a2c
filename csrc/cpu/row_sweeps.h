// Row-sweep building blocks of the CPU kernels (dense and sparse-teacher ops): vector sums in blocks,
// the inline exponential, row loading and writing, dtype dispatch, and the build's instruction-set check.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace alphadiv {
namespace cpu_rows {

using at::vec::Vectorized;

constexpr int64_t kSumBlock = 1024;            // elements summed in a vector before going to double

// Sums of K streams of terms over the padded row; term(i) returns the K vectors of terms at i. Two
// vectors per step, added to each other before the accumulator: the loop-carried chain is one add
// per two vectors, and one accumulator per stream leaves the registers to the terms.
template <typename acc_t, int K, typename Term>
inline std::array<double, K> padded_row_sums(int64_t padded_cols, const Term& term) {
  using Vec = Vectorized<acc_t>;
  std::array<double, K> totals{};
  for (int64_t block = 0; block < padded_cols; block += kSumBlock) {
    const int64_t end = std::min(padded_cols, block + kSumBlock);
    std::array<Vec, K> acc;
    acc.fill(Vec(acc_t(0)));
    int64_t i = block;
    for (; i + 2 * Vec::size() <= end; i += 2 * Vec::size()) {
      const std::array<Vec, K> first = term(i), second = term(i + Vec::size());
      for (int k = 0; k < K; ++k) acc[k] += first[k] + second[k];
    }
    if (i < end) {
      const std::array<Vec, K> last = term(i);
      for (int k = 0; k < K; ++k) acc[k] += last[k];
    }
    for (int k = 0; k < K; ++k) {
      totals[k] += at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, acc[k]);
    }
  }
  return totals;
}

// Where the exp sweep reads a row of logits: the input row itself (contiguous, already in the compute
// type; scaled by 1/T on the fly) or a buffer it was converted into (already scaled, scale 1). Reads at
// or past `cols` give -inf, which adds exactly 0 to every sum.
template <typename acc_t>
struct RowSource {
  const acc_t* data;
  acc_t scale;
  int64_t cols;

  Vectorized<acc_t> load(int64_t i) const {
    using Vec = Vectorized<acc_t>;
    if (i + Vec::size() <= cols) return Vec::loadu(data + i);
    return Vec::set(Vec(-std::numeric_limits<acc_t>::infinity()), Vec::loadu(data + i, cols - i), cols - i);
  }
};

// max over a contiguous row in the compute type, NaN-propagating.
template <typename acc_t>
inline acc_t contiguous_row_max(const acc_t* src, int64_t cols) {
  using Vec = Vectorized<acc_t>;
  const auto vec_max = [](Vec a, Vec b) { return at::vec::maximum(a, b); };
  Vec first(-std::numeric_limits<acc_t>::infinity()), second = first;
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= cols; j += 2 * Vec::size()) {
    first = at::vec::maximum(first, Vec::loadu(src + j));
    second = at::vec::maximum(second, Vec::loadu(src + j + Vec::size()));
  }
  const RowSource<acc_t> tail{src, acc_t(1), cols};
  for (; j < cols; j += Vec::size()) first = at::vec::maximum(first, tail.load(j));
  return at::vec::vec_reduce_all<acc_t>(vec_max, at::vec::maximum(first, second));
}

// dst <- src / T in the compute type, padded with -inf to a whole vector; returns max(dst). For rows
// that need a conversion or are strided; contiguous rows in the compute type are read in place.
template <typename scalar_t, typename acc_t>
inline acc_t load_scaled_row(const scalar_t* src, int64_t col_stride, int64_t cols, int64_t padded_cols,
                             acc_t inv_temperature, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<acc_t>(src[j * col_stride]) * inv_temperature;
  std::fill(dst + cols, dst + padded_cols, -std::numeric_limits<acc_t>::infinity());
  return at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, dst, padded_cols);
}

// exp(x) for x <= 0 (logits minus their row max), inline. Cody-Waite reduction x = n ln2 + r with
// |r| <= ln2 / 2, then e^r = 1 + r + r^2 P(r) with Cephes' degree-5 minimax P (about 1 ulp over the
// interval), scaled by 2^n built in the exponent bits. P is evaluated in Estrin's scheme: three
// independent FMAs, then two on r^2, so the dependency chain is 5 FMAs deep instead of 8 (Horner) and
// the four exponentials of an unrolled step overlap. x < -87.3 (including -inf) gives 0: such a
// probability is below fp32's normal range.
template <typename acc_t>
inline Vectorized<acc_t> exp_nonpositive(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = Vectorized<float>;
    using IntVec = Vectorized<int32_t>;
    const Vec n = (x * Vec(1.44269504088896341f)).round();
    Vec r = at::vec::fmadd(n, Vec(-0.693145751953125f), x);  // ln2 split: the high part is exact in n * hi
    r = at::vec::fmadd(n, Vec(-1.428606765330187045e-06f), r);
    const Vec r2 = r * r;
    const Vec p45 = at::vec::fmadd(r, Vec(1.9875691500e-4f), Vec(1.3981999507e-3f));
    const Vec p23 = at::vec::fmadd(r, Vec(8.3334519073e-3f), Vec(4.1665795894e-2f));
    const Vec p01 = at::vec::fmadd(r, Vec(1.6666665459e-1f), Vec(5.0000001201e-1f));
    const Vec p = at::vec::fmadd(at::vec::fmadd(p45, r2, p23), r2, p01);
    const Vec poly = at::vec::fmadd(p, r2, r) + Vec(1.f);
    const IntVec exponent = (at::vec::convert_to_int_of_same_size(n) + IntVec(127)) << IntVec(23);
    const Vec result = poly * at::vec::cast<float>(exponent);
    return Vec::blendv(result, Vec(0.f), x < Vec(-87.3f));
  } else {
    return x.exp();
  }
}

// Copies a finished gradient row (in cache) to the output. fp32 rows go out with non-temporal
// stores: the [N, C] gradient is far larger than the caches and is not read again by this op, so
// skipping the read-for-ownership of every line saves a third of the memory traffic.
template <typename acc_t, typename student_t>
inline void write_gradient_row(const acc_t* row, student_t* out, int64_t cols) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<student_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    constexpr int64_t kLanes = 16;
#else
    constexpr int64_t kLanes = 8;
#endif
    int64_t j = 0;
    for (; j < cols && reinterpret_cast<uintptr_t>(out + j) % (kLanes * sizeof(float)) != 0; ++j) out[j] = row[j];
    for (; j + kLanes <= cols; j += kLanes) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_ps(out + j, _mm512_loadu_ps(row + j));
#else
      _mm256_stream_ps(out + j, _mm256_loadu_ps(row + j));
#endif
    }
    for (; j < cols; ++j) out[j] = row[j];
    return;
  }
#endif
  for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<student_t>(row[j]);
}

template <typename Fn>
inline void dispatch_input_dtypes(at::ScalarType student, at::ScalarType teacher, const Fn& fn) {
  const bool use_double = student == at::kDouble || teacher == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student, "adaptive_kd_cpu_student", [&] {
    using student_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher, "adaptive_kd_cpu_teacher", [&] {
      using teacher_t = scalar_t;
      if (use_double) {
        fn(double{}, student_t{}, teacher_t{});
      } else {
        fn(float{}, student_t{}, teacher_t{});
      }
    });
  });
}

// A fresh [N, C] gradient of tens of MB costs more in 4 KiB page faults and kernel zeroing than
// the kernel itself; asking for transparent huge pages on it (before the first touch) cuts that
// several-fold. Advice only: nothing changes where the kernel does not honour it.
inline void advise_huge_pages(const at::Tensor& tensor) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t end = begin + tensor.nbytes();
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = end & ~(kHugePage - 1);
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#else
  (void)tensor;
#endif
}

// The kernels are compiled for the build machine's vector instruction set (see setup.py).
inline void check_cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(supported, "alphadiv_kernels was built for AVX-512 but this CPU lacks it; reinstall with "
                         "ALPHADIV_CPU_CAPABILITY=avx2 (or default)");
#elif defined(CPU_CAPABILITY_AVX2)
  const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(supported, "alphadiv_kernels was built for AVX2 but this CPU lacks it; reinstall with "
                         "ALPHADIV_CPU_CAPABILITY=default");
#endif
}

}  // namespace cpu_rows
}  // namespace alphadiv
