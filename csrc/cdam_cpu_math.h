// Inlined vector log2 and exp of the CPU kernels, shared by the forward (cdam_cpu.cpp) and the
// backward (cdam_cpu_backward.cpp) so that both take the same logarithm of every s w, and the
// horizontal reductions of one vector.
// ATen's Vec::log2 / Vec::exp are out-of-line Sleef calls, several times slower.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cdam_constants.h"

namespace cdam {

using VecF = at::vec::Vectorized<float>;

// Horizontal reductions of one vector.
inline float sum_lanes(const VecF& v) {
  return at::vec::vec_reduce_all<float>([](VecF& a, VecF& b) { return a + b; }, v);
}
inline float max_lanes(const VecF& v) {
  return at::vec::vec_reduce_all<float>([](VecF& a, VecF& b) { return at::vec::maximum(a, b); }, v);
}
inline float min_lanes(const VecF& v) {
  return at::vec::vec_reduce_all<float>([](VecF& a, VecF& b) { return at::vec::minimum(a, b); }, v);
}

#if defined(CPU_CAPABILITY_AVX2)
// log2 for non-negative finite floats in AVX2 registers. x = 2^e m with m rounded to the nearest
// of the nine centres 1 + k / 8 (k = 0..8; k = 8 is k = 0 of the next exponent): adding half an
// interval to the bits before splitting them carries into the exponent, so m lies in
// [0.96875, 1.9375) and k is the top three mantissa bits. Two in-register table lookups (vpermps)
// give g_k = float(1 / c_k) and log2(1 / g_k); log2(m) = log2(1 + r) - log2(g_k) with
// r = m g_k - 1 (one FMA, -0.0556 <= r <= 0.0625) and log2(1 + r) = r P(r), P of degree 3 fitted to
// the absolute minimax of log2(1 + r) on the union of the eight r ranges (1.4e-8 before rounding).
// The centre of interval 0 is exactly 1 (g = 1, log 0): every power of two gives exactly its
// exponent, so the logs that must cancel do (s w = 1 with one class: J = 0 and a zero gradient).
// Max error 7.4e-8 absolute over every float in [0.5, 2) (benchmarks/RESULTS.md, optimisation 7).
// x = 0 (all bits 0) comes out as -127 and denormals as finite garbage of that size; the
// divergence only ever multiplies them by x itself (0 log 0 = 0, |x log x| < 1e-35) and the
// backward clamps s at kTinyMass first.
inline VecF log2_nonneg(const VecF& xv) {
  const __m256i bits = _mm256_castps_si256(static_cast<__m256>(xv));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_set1_epi32(0x00080000));
  // vpermps reads the low three bits of each index: rounded >> 20 leaves the top mantissa bits there.
  const __m256i index = _mm256_srli_epi32(rounded, 20);
  const __m256 inv_centre = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(1.0f, 0.8888888955116272f, 0.800000011920929f, 0.7272727489471436f, 0.6666666865348816f,
                     0.6153846383094788f, 0.5714285969734192f, 0.5333333611488342f),
      index);
  const __m256 log_centre = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(0.0f, 0.16992498934268951f, 0.32192808389663696f, 0.45943158864974976f, 0.5849624872207642f,
                     0.7004396915435791f, 0.8073548674583435f, 0.9068905115127563f),
      index);
  // e << 23 = the exponent field of `rounded` less 127 << 23 (0x3f800000 has no mantissa bits,
  // so the subtraction leaves them alone and the mask drops them); m = x / 2^e = bits - (e << 23)
  const __m256i e_shifted =
      _mm256_and_si256(_mm256_sub_epi32(rounded, _mm256_set1_epi32(0x3f800000)), _mm256_set1_epi32(int(0xff800000u)));
  const __m256 e = _mm256_cvtepi32_ps(_mm256_srai_epi32(e_shifted, 23));
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, e_shifted));
  const __m256 r = _mm256_fmsub_ps(m, inv_centre, _mm256_set1_ps(1.f));
  __m256 p = _mm256_set1_ps(-0.35750243067741394f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.4820980131626129f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(-0.7213557362556458f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.442694067955017f));
  // e added last: e + log_centre rounded first would put one fixed error (up to 1.2e-7 for
  // |e| = 3) on every value of a table interval, a bias that the class sums of J accumulate
  return VecF(_mm256_add_ps(e, _mm256_fmadd_ps(p, r, log_centre)));
}

// exp(y) for y <= 0. y is clamped at -86, where exp is 4e-38: callers only add such values to
// sums of order one or to offsets of that size. y = n ln2 + f, |f| <= ln2 / 2, exp(f) by a
// degree-6 polynomial (relative minimax fit), 2^n added to the exponent bits: max relative error
// 1.1e-7 on [-86, 0]; exactly 1 at y = 0.
inline VecF exp_nonpos(const VecF& yv) {
  // max(-86, y) with y second: MAXPS returns its second operand when one is NaN, so NaN stays NaN
  const __m256 y = _mm256_max_ps(_mm256_set1_ps(-86.f), static_cast<__m256>(yv));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.4426950408889634f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), y);  // ln2 in two parts: n ln2_hi is exact
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(0.0013836828293278813f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.008374814875423908f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.04166822507977486f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.16666419804096222f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.49999991059303284f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return VecF(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale)));
}
#else
inline VecF log2_nonneg(const VecF& x) { return at::vec::maximum(x, VecF(kTinyMass)).log2(); }
inline VecF exp_nonpos(const VecF& y) { return at::vec::maximum(y, VecF(-86.f)).exp(); }
#endif

}  // namespace cdam
