// Row helpers of the CPU backward kernels, shared by cdam_cpu_backward.cpp (pairwise_jsd,
// jsd_attention, cdam_attention) and cdam_cpu_multiscale_backward.cpp (cdam_map and the
// multi-scale ops): the backward's log2, the two passes over one query row's C x Mp logs, and
// the memory policy's bound on the per-task buffers.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cdam_common.h"
#include "cdam_cpu_math.h"

namespace cdam_bwd {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
using cdam::kClassBlock;  // J is accumulated in the forward's blocked order

// The per-task buffers of the row passes (key-side class sums U, C x Mp floats, a row's C x Mp
// logs, the multi-scale pass's query-side adjoints) are the backward's only memory that grows
// with the thread count (64 threads at C = 1000, M = 16k: ~4 GB each). They are bounded by the
// memory policy's budget (cdam_fast/memory.py, passed as buffer_budget bytes; negative: no
// bound): at most min(threads, rows, budget / per_task_bytes) tasks exist, at least one (one
// task's buffers are the least these passes need). Each extension module keeps its own count of
// the bytes its last backward allocated for them (last_buffer_bytes).
inline std::atomic<int64_t> g_buffer_bytes{0};

inline int64_t last_buffer_bytes() { return g_buffer_bytes.load(); }

inline int64_t task_count(int64_t buffer_budget, int64_t per_task_bytes, int64_t rows) {
  int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(rows, 1));
  if (buffer_budget >= 0) tasks = std::min(tasks, buffer_budget / std::max<int64_t>(per_task_bytes, 1));
  return std::max<int64_t>(tasks, 1);
}

// U[k] += sum over the tasks of local[t * n + k], for k < n (the tasks' partial key-side sums).
inline void add_task_sums(float* U, const std::vector<float>& local, int64_t tasks, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t k = begin; k < end; ++k) U[k] += local[t * n + k];
  });
}

// log2 of max(s, kTinyMass) with the forward's inlined log2 (csrc/cdam_cpu_math.h): the same
// logarithm of every s w as the forward, exact at powers of two, so with one class (s w = 1 and
// lp = 0) every lp - log2(s w) is exactly 0 and so is the gradient.
// (A plain max: at::vec::maximum's NaN propagation costs two more instructions per log, and the
// inlined log2 maps NaN to a finite value anyway; a NaN input reaches J through s itself.)
inline Vec log2v(const Vec& s) {
#if defined(CPU_CAPABILITY_AVX2)
  return cdam::log2_nonneg(Vec(_mm256_max_ps(_mm256_set1_ps(cdam::kTinyMass), static_cast<__m256>(s))));
#else
  return cdam::log2_nonneg(at::vec::maximum(s, Vec(cdam::kTinyMass)));
#endif
}
// log2(s w) for sums s = p + q >= 0, exact for every s > 0 when kTiny (some entry of the call
// lies in (0, kTinySum): only then can a sum be that small). Such sums are scaled by
// 2^kTinySumExponent before the product (exact: a power of two) and the exponent is taken off
// after, so s w is a normal float far above kTinyMass; other sums give log2v(s w) bit for bit.
// Without kTiny (the usual case) it is log2v(s w): the check costs nothing in the inner loops.
template <bool kTiny>
inline Vec log2_sum(const Vec& s, const Vec& w) {
  if constexpr (kTiny) {
    static const float scale = std::ldexp(1.f, int(cdam::kTinySumExponent));
    const Vec small = s < Vec(cdam::kTinySum);  // all-ones lanes where s is tiny
    return log2v(Vec::blendv(s, s * Vec(scale), small) * w) - (small & Vec(cdam::kTinySumExponent));
  } else {
    return log2v(s * w);
  }
}

// Whether some entry of t lies in (0, kTinySum): whether the calls above need their kTiny form.
inline bool has_tiny(const at::Tensor& t) { return ((t > 0) & (t < cdam::kTinySum)).any().item<bool>(); }

using cdam::sum_lanes;

// Pass 1 of one row (prow: its C probabilities): logs[c, j] = log2(s_jc w_c) for every (padded)
// key j and J's class sum jrow[j] = sum_c s log2(s w), blocked as the forward (kClassBlock
// classes into fresh partial sums `part`, then into the total). Class-major: every stream (keys,
// logs, the row's sums) is read or written in order; two vectors per step for independent logs.
template <bool kTiny>
inline void row_logs(const float* prow, const float* __restrict kb, const float* __restrict wb, int64_t C, int64_t Mp,
              float* __restrict logs, float* __restrict jrow, float* __restrict part) {
  std::fill(jrow, jrow + Mp, 0.f);
  for (int64_t c0 = 0; c0 < C; c0 += kClassBlock) {
    std::fill(part, part + Mp, 0.f);
    for (int64_t c = c0; c < std::min<int64_t>(C, c0 + kClassBlock); ++c) {
      const Vec pc(prow[c]), wc(wb[c]);
      const float* __restrict kc = kb + c * Mp;
      float* __restrict lc = logs + c * Mp;
      for (int64_t j = 0; j < Mp; j += 2 * kLanes) {
        const Vec s0 = pc + Vec::loadu(kc + j), s1 = pc + Vec::loadu(kc + j + kLanes);
        const Vec l0 = log2_sum<kTiny>(s0, wc), l1 = log2_sum<kTiny>(s1, wc);
        l0.store(lc + j);
        l1.store(lc + j + kLanes);
        at::vec::fmadd(s0, l0, Vec::loadu(part + j)).store(part + j);
        at::vec::fmadd(s1, l1, Vec::loadu(part + j + kLanes)).store(part + j + kLanes);
      }
    }
    for (int64_t j = 0; j < Mp; j += kLanes) (Vec::loadu(jrow + j) + Vec::loadu(part + j)).store(jrow + j);
  }
}

// Pass 2 of one row, given its score gradients grow [Mp] (zero on padded keys) and the logs of
// pass 1: trow[c] = sum_j G_j (lp_c - logs[c, j]) and ut[c, j] += G_j (lk_cj - logs[c, j]).
inline void row_class_sums(const float* __restrict grow, const float* __restrict logs, const float* __restrict lprow,
                    const float* __restrict lkb, int64_t C, int64_t Mp, float* __restrict trow, float* __restrict ut) {
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict lc = logs + c * Mp;
    const float* __restrict lkc = lkb + c * Mp;
    float* __restrict uc = ut + c * Mp;
    const Vec lpc(lprow[c]);
    Vec t0(0.f), t1(0.f);
    for (int64_t j = 0; j < Mp; j += 2 * kLanes) {
      const Vec g0 = Vec::loadu(grow + j), g1 = Vec::loadu(grow + j + kLanes);
      const Vec l0 = Vec::loadu(lc + j), l1 = Vec::loadu(lc + j + kLanes);
      t0 = at::vec::fmadd(g0, lpc - l0, t0);
      t1 = at::vec::fmadd(g1, lpc - l1, t1);
      at::vec::fmadd(g0, Vec::loadu(lkc + j) - l0, Vec::loadu(uc + j)).store(uc + j);
      at::vec::fmadd(g1, Vec::loadu(lkc + j + kLanes) - l1, Vec::loadu(uc + j + kLanes)).store(uc + j + kLanes);
    }
    trow[c] = sum_lanes(t0 + t1);
  }
}

}  // namespace cdam_bwd
