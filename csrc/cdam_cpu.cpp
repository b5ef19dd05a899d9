// CPU implementation of the CDAM ops: SIMD over key columns (at::vec::Vectorized plus an inlined
// AVX2 log2), at::parallel_for over rows in dynamically balanced blocks, cache-sized tiles, and a
// BLAS GEMM per bounded row chunk for the products with v. Never builds [N, N, C]; the attention ops in
// recompute mode keep at most a bounded [rows, N] chunk of the map.
//
// Inputs arrive from cdam_fast/backends/cpu_backend.py already float32, contiguous and
// batch-flattened; that module also prepares the multi-scale grids (distributions and taps).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cdam_common.h"
#include "cdam_cpu_math.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Keys evaluated together by one inner loop: two vectors give the log2 calls some independence.
constexpr int64_t kKeyBlock = 2 * kLanes;
// Square tile (rows x keys) of the symmetric self-divergence; a multiple of kKeyBlock.
constexpr int64_t kTile = 64;
// Largest [rows, N] float chunk kept by the chunked (recompute) paths: 8 MiB.
constexpr int64_t kChunkFloats = int64_t(1) << 21;
// Largest [N, N] weight buffer of a jsd_attention(p, p) step that covers all pairs: 32 MiB (N <= 2896).
constexpr int64_t kSelfStepFloats = int64_t(1) << 23;
using cdam::kClassBlock;
// Keys per step of the online softmax in jsd_attention (a multiple of kKeyBlock).
constexpr int64_t kSoftmaxKeys = 4096;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::parallel_for over [begin, end) in blocks of `block` indices handed out dynamically: a thread
// that the OS deschedules (shared machines) delays the call by one block, not by its static half
// of the range. f(b0, b1) is called on disjoint sub-ranges covering [begin, end).
template <class F>
void parallel_blocks(int64_t begin, int64_t end, int64_t block, const F& f) {
  if (end <= begin) return;
  const int64_t blocks = ceil_div(end - begin, block);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  if (threads <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < blocks; k = next.fetch_add(1))
      f(begin + k * block, std::min(end, begin + (k + 1) * block));
  });
}

// Horizontal reductions of one vector (csrc/cdam_cpu_math.h).
using cdam::max_lanes;
using cdam::min_lanes;
using cdam::sum_lanes;

// Inlined AVX2 log2 and exp (csrc/cdam_cpu_math.h, shared with the backward).
using cdam::exp_nonpos;
using cdam::log2_nonneg;

// s log2 s with 0 log 0 = 0.
inline Vec xlog2x(const Vec& s) { return s * log2_nonneg(s); }

// The centring terms of cdam_centring.h in fused loops (the ATen version costs ~2 ms at N = 784,
// C = 101, a sixth of a pairwise_jsd): w [B, C] = 1 / (2u), u the mean of the finite entries of
// the rows of p (and q), in float64; the same values as cdam::centring_weights.
at::Tensor centring_weights(const at::Tensor& p, const at::Tensor* q) {
  const int64_t B = p.size(0), C = p.size(2);
  at::Tensor out = at::empty({B, C}, p.options());
  float* dst = out.data_ptr<float>();
  parallel_blocks(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> total(C), count(C);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(total.begin(), total.end(), 0.0);
      std::fill(count.begin(), count.end(), 0.0);
      for (const at::Tensor* t : {&p, q}) {
        if (t == nullptr) continue;
        const int64_t n = t->size(1);
        const float* rows = t->data_ptr<float>() + b * n * C;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t c = 0; c < C; ++c) {
            const float x = rows[i * C + c];
            if (std::isfinite(x)) {
              total[c] += x;
              count[c] += 1.0;
            }
          }
      }
      for (int64_t c = 0; c < C; ++c) {
        const double u = std::max(total[c] / std::max(count[c], 1.0), static_cast<double>(cdam::kTinyMass));
        dst[b * C + c] = static_cast<float>(0.5 / u);
      }
    }
  });
  return out;
}

// Row terms r_i = sum_c p_ic log2(2 p_ic w_c) [B, pad_to] (zero-padded): each term in float32 with
// Sleef's 1-ulp log2 (the kernel's own rounding of s w is of the same size), summed in float64.
at::Tensor centred_row_terms(const at::Tensor& p, const at::Tensor& w, int64_t pad_to) {
  const int64_t n = p.size(1), C = p.size(2), B = p.size(0);
  at::Tensor out = at::zeros({B, pad_to}, p.options());
  const float* src = p.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  parallel_blocks(0, B * n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> terms(kLanes);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / n;
      const float* x = src + row * C;
      const float* wb = wp + b * C;
      double acc = 0.0;
      for (int64_t c = 0; c < C; c += kLanes) {
        const int64_t count = std::min(kLanes, C - c);
        const Vec pv = Vec::loadu(x + c, count), arg = pv * Vec::loadu(wb + c, count) * Vec(2.f);
        (pv * at::vec::maximum(arg, Vec(cdam::kTinyMass)).log2()).store(terms.data(), count);
        for (int64_t k = 0; k < count; ++k) acc += terms[k];
      }
      dst[b * pad_to + row % n] = static_cast<float>(acc);
    }
  });
  return out;
}

// One side of a pairwise divergence laid out for the inner loop: keys in blocks of kKeyBlock,
// class-major inside a block, so each class step reads kKeyBlock contiguous floats.
struct Operand {
  at::Tensor rows;     // [B, n, C]
  at::Tensor weights;  // [B, C] centring weights w = 1 / (2u), shared by both sides of a divergence
  at::Tensor terms;    // [B, n_pad] row terms sum_c p log2(2 p w), zero-padded
  at::Tensor blocks;   // [B, n_pad / kKeyBlock, C, kKeyBlock]
  int64_t n = 0, n_pad = 0, C = 0;

  // Raw pointers into the tensors above: the inner loops must not pay data_ptr's checks.
  const float *rows_ptr = nullptr, *weights_ptr = nullptr, *terms_ptr = nullptr, *blocks_ptr = nullptr;

  // p [B, n, C] with the centring weights w [B, C] of the pair it belongs to.
  Operand(const at::Tensor& p, const at::Tensor& w) : rows(p.contiguous()), weights(w.contiguous()) {
    n = p.size(1);
    C = p.size(2);
    n_pad = ceil_div(n, kKeyBlock) * kKeyBlock;
    terms = centred_row_terms(rows, weights, n_pad);
    blocks = at::constant_pad_nd(rows, {0, 0, 0, n_pad - n})
                 .view({p.size(0), n_pad / kKeyBlock, kKeyBlock, C})
                 .transpose(2, 3)
                 .contiguous();
    rows_ptr = rows.data_ptr<float>();
    weights_ptr = weights.data_ptr<float>();
    terms_ptr = terms.data_ptr<float>();
    blocks_ptr = blocks.data_ptr<float>();
  }
  const float* row(int64_t b, int64_t i) const { return rows_ptr + (b * n + i) * C; }
  const float* term(int64_t b) const { return terms_ptr + b * n_pad; }
  const float* weight(int64_t b) const { return weights_ptr + b * C; }
  const float* block(int64_t b, int64_t kb) const {
    return blocks_ptr + ((b * (n_pad / kKeyBlock)) + kb) * C * kKeyBlock;
  }
};

// p against itself: centred on p's own mean distribution.
Operand self_operand(const at::Tensor& p) { return Operand(p, centring_weights(p.contiguous(), nullptr)); }

// J between query row i of `q_side` and the kKeyBlock keys of block kb of `k_side`; writes the
// first `count` of them to out.
inline void jsd_key_block(const Operand& q_side, const Operand& k_side, int64_t b, int64_t i, int64_t kb,
                          float* out, int64_t count) {
  const float* prow = q_side.row(b, i);
  const float* keys = k_side.block(b, kb);
  const float* w = q_side.weight(b);
  const int64_t C = q_side.C;
  // Blocked summation: kClassBlock terms into fresh partial sums, then into the totals, so the
  // rounding error grows with C / kClassBlock + kClassBlock instead of C (C' = 2000 classes).
  Vec acc0(0.f), acc1(0.f);
  for (int64_t c0 = 0; c0 < C; c0 += kClassBlock) {
    Vec part0(0.f), part1(0.f);
    const int64_t c1 = std::min(C, c0 + kClassBlock);
    for (int64_t c = c0; c < c1; ++c) {
      const Vec pc(prow[c]), wc(w[c]);
      const Vec s0 = pc + Vec::loadu(keys + c * kKeyBlock);
      const Vec s1 = pc + Vec::loadu(keys + c * kKeyBlock + kLanes);
      part0 = at::vec::fmadd(s0, log2_nonneg(s0 * wc), part0);
      part1 = at::vec::fmadd(s1, log2_nonneg(s1 * wc), part1);
    }
    acc0 = acc0 + part0;
    acc1 = acc1 + part1;
  }
  const Vec ri(q_side.term(b)[i]);
  const float* rk = k_side.term(b) + kb * kKeyBlock;
  const Vec zero(0.f), half_ln2(cdam::kHalfLn2);
  const Vec j0 = at::vec::maximum((ri + Vec::loadu(rk) - acc0) * half_ln2, zero);
  const Vec j1 = at::vec::maximum((ri + Vec::loadu(rk + kLanes) - acc1) * half_ln2, zero);
  j0.store(out, std::min(count, kLanes));
  if (count > kLanes) j1.store(out + kLanes, count - kLanes);
}

// J[i, k] for rows [i0, i1) x key blocks [kb0, kb1) into out (row i at out + (i - i0) * ld, key k
// at column k). Key block outer so a block's C x kKeyBlock floats stay in L1 across the rows.
void jsd_rows(const Operand& q_side, const Operand& k_side, int64_t b, int64_t i0, int64_t i1, int64_t kb0,
              int64_t kb1, float* out, int64_t ld) {
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t count = std::min(kKeyBlock, k_side.n - kb * kKeyBlock);
    for (int64_t i = i0; i < i1; ++i) jsd_key_block(q_side, k_side, b, i, kb, out + (i - i0) * ld + kb * kKeyBlock, count);
  }
}

// Self-divergence of batch elements [b0, b1) using symmetry: only tiles on or above the diagonal
// are evaluated, then mirrored; the diagonal is exactly 0. Element b's row i lands at
// out + (b - b0) * batch_stride + i * ld.
void jsd_self_into(const Operand& x, int64_t b0, int64_t b1, float* out, int64_t ld, int64_t batch_stride) {
  const int64_t n = x.n;
  const int64_t tiles = ceil_div(n, kTile);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t a = 0; a < tiles; ++a)
    for (int64_t c = a; c < tiles; ++c) pairs.emplace_back(a, c);
  const int64_t work = (b1 - b0) * static_cast<int64_t>(pairs.size());
  parallel_blocks(0, work, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = b0 + w / pairs.size();
      const auto [ti, tk] = pairs[w % pairs.size()];
      const int64_t i0 = ti * kTile, i1 = std::min(n, i0 + kTile);
      const int64_t k0 = tk * kTile, k1 = std::min(n, k0 + kTile);
      float* Jb = out + (b - b0) * batch_stride;
      jsd_rows(x, x, b, i0, i1, k0 / kKeyBlock, ceil_div(k1, kKeyBlock), Jb + i0 * ld, ld);
      if (ti != tk)
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t k = k0; k < k1; ++k) Jb[k * ld + i] = Jb[i * ld + k];
      else
        for (int64_t i = i0; i < i1; ++i) Jb[i * ld + i] = 0.f;
    }
  });
}

// Full self-divergence J [B, n, n].
at::Tensor jsd_self_full(const Operand& x) {
  const int64_t B = x.rows.size(0), n = x.n;
  at::Tensor J = at::empty({B, n, n}, x.rows.options());
  jsd_self_into(x, 0, B, J.data_ptr<float>(), n, n * n);
  return J;
}

// Spec 2.5-2.6 on one row of divergences: dst (+)= weight * expm1(alpha X) / expm1(alpha) with
// X = (hi - J) / (hi - lo), or weight where the row is constant. src and dst may alias (add=false).
// As kernels/common.py's cdam_transform: A = (exp(-alpha t) - exp(-alpha)) / (1 - exp(-alpha)) with
// t = 1 - X = (J - lo) / span taken directly, so the exponent is <= 0 (no overflow for any alpha),
// small A stay relatively accurate and t = 0 gives exactly 1; for alpha < kSmallAlphaLimit, where
// the difference cancels, A = exp(-alpha t) X g(alpha X) / g(alpha), g(y) = (1 - e^-y) / y by its
// Taylor series. A NaN divergence makes the row NaN (never a plausible row of ones).
void cdam_row(const float* src, int64_t n, float alpha, float weight, float* dst, bool add) {
  Vec vhi(-std::numeric_limits<float>::infinity()), vlo(std::numeric_limits<float>::infinity());
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    const Vec v = Vec::loadu(src + k);
    vhi = at::vec::maximum(vhi, v);  // Vectorized maximum / minimum propagate NaN
    vlo = at::vec::minimum(vlo, v);
  }
  float hi = max_lanes(vhi), lo = min_lanes(vlo);
  for (; k < n; ++k) {
    hi = std::isnan(src[k]) ? src[k] : std::max(hi, src[k]);
    lo = std::min(lo, src[k]);
  }
  const float span = hi - lo;
  const bool flat = span < cdam::kConstantRowEps;  // false for NaN
  const cdam::TransformFactors tf = cdam::transform_factors(static_cast<double>(alpha));
  const Vec vinv_span(flat ? 0.f : 1.f / span), vlo_row(lo), vhi_row(hi), one(1.f), zero(0.f);
  const Vec vfactor(tf.factor), voffset(tf.exp_neg_alpha), vneg_alpha(-tf.alpha_log2e / cdam::kLog2e);
  const Vec valpha(alpha), vweight(weight);
  auto transform = [&](const Vec& j) -> Vec {
    Vec t = (j - vlo_row) * vinv_span;
    t = Vec::blendv(t, zero, t < zero);  // NaN-keeping clamp: a recomputed J may round below lo
    const Vec e = exp_nonpos(t * vneg_alpha);  // exactly 1 at t = 0
    Vec a;
    if (tf.small) {
      const Vec x = (vhi_row - j) * vinv_span;
      const Vec y = x * valpha;
      Vec g(1.f / 5040.f);
      g = Vec(1.f / 720.f) - y * g;
      g = Vec(1.f / 120.f) - y * g;
      g = Vec(1.f / 24.f) - y * g;
      g = Vec(1.f / 6.f) - y * g;
      g = Vec(0.5f) - y * g;
      g = one - y * g;
      a = Vec::blendv(e * x * g * vfactor, one, t == zero);
    } else {
      a = (e - voffset) * vfactor;  // (1 - exp(-alpha)) * factor == 1 exactly (transform_factors)
    }
    return Vec::blendv(a, zero, a < zero) * vweight;  // t may round to 1 + ulp; keeps NaN
  };
  for (k = 0; k + kLanes <= n; k += kLanes) {
    Vec v = transform(Vec::loadu(src + k));
    if (add) v = v + Vec::loadu(dst + k);
    v.store(dst + k);
  }
  if (k < n) {
    Vec v = transform(Vec::loadu(src + k, n - k));
    if (add) v = v + Vec::loadu(dst + k, n - k);
    v.store(dst + k, n - k);
  }
}

// One scale of a (multi-scale) CDAM map, with the divergences either kept in memory (`J`, the
// materialize mode) or evaluated on demand from the distributions (recompute mode).
struct Scale {
  Operand dist;        // P_s [B, n_s, C]
  at::Tensor J;        // [B, n_s, n_s] when materialized, else undefined
  at::Tensor idx, wts; // [N, 4] bilinear taps onto the full grid, undefined for the full grid
  Scale(const at::Tensor& p, const c10::optional<at::Tensor>& taps_idx, const c10::optional<at::Tensor>& taps_wts,
        bool materialize)
      : dist(self_operand(p)) {
    if (taps_idx.has_value()) {
      idx = taps_idx->to(at::kInt).contiguous();
      wts = taps_wts->to(at::kFloat).contiguous();
    }
    if (materialize) J = jsd_self_full(dist);
  }
  bool upsampled() const { return idx.defined(); }
};

// acc[i - i0, :] += weight * A_s[i, :] for the full-grid rows [i0, i1) of batch b; acc is
// [i1 - i0, N] row-major. Parallel over rows; at most O((i1 - i0 + grid lines) * N) scratch.
void accumulate_scale(const Scale& s, int64_t b, int64_t i0, int64_t i1, int64_t N, float alpha, float weight,
                      float* acc, bool add) {
  const int64_t ns = s.dist.n;
  if (!s.upsampled()) {
    if (s.J.defined()) {
      const float* J = s.J.data_ptr<float>() + b * N * N;
      parallel_blocks(i0, i1, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) cdam_row(J + i * N, N, alpha, weight, acc + (i - i0) * N, add);
      });
      return;
    }
    // Recompute: blocks of rows share the key blocks in cache; each block's divergences go to a
    // private buffer (or straight into acc when it is written, not added to).
    parallel_blocks(i0, i1, 8, [&](int64_t begin, int64_t end) {
      constexpr int64_t kRows = 8;
      std::vector<float> buf(add ? kRows * N : 0);
      for (int64_t r0 = begin; r0 < end; r0 += kRows) {
        const int64_t r1 = std::min(end, r0 + kRows);
        float* J = add ? buf.data() : acc + (r0 - i0) * N;
        jsd_rows(s.dist, s.dist, b, r0, r1, 0, ceil_div(N, kKeyBlock), J, N);
        for (int64_t i = r0; i < r1; ++i) {
          J[(i - r0) * N + i] = 0.f;  // self divergence
          cdam_row(J + (i - r0) * N, N, alpha, weight, acc + (i - i0) * N, add);
        }
      }
    });
    return;
  }
  // Upsampled scale: the small-grid rows feeding [i0, i1) form one contiguous range [a0, a1).
  const int32_t* idx = s.idx.data_ptr<int32_t>();
  const float* wts = s.wts.data_ptr<float>();
  int64_t a0 = ns, a1 = 0;
  for (int64_t i = i0; i < i1; ++i)
    for (int t = 0; t < 4; ++t) {
      a0 = std::min<int64_t>(a0, idx[i * 4 + t]);
      a1 = std::max<int64_t>(a1, idx[i * 4 + t] + 1);
    }
  const int64_t na = a1 - a0;
  const float* small;
  at::Tensor small_buf;
  if (s.J.defined()) {
    small = s.J.data_ptr<float>() + (b * ns + a0) * ns;
  } else {
    small_buf = at::empty({na, ns}, s.dist.rows.options());
    float* out = small_buf.data_ptr<float>();
    parallel_blocks(a0, a1, 8, [&](int64_t begin, int64_t end) {
      jsd_rows(s.dist, s.dist, b, begin, end, 0, ceil_div(ns, kKeyBlock), out + (begin - a0) * ns, ns);
      for (int64_t a = begin; a < end; ++a) out[(a - a0) * ns + a] = 0.f;
    });
    small = out;
  }
  // Upsample along the key axis: keyed[a, k] = sum_t w[k, t] J_s[a, idx[k, t]].
  at::Tensor keyed_buf = at::empty({na, N}, s.dist.rows.options());
  float* keyed = keyed_buf.data_ptr<float>();
  parallel_blocks(0, na, 4, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      const float* src = small + a * ns;
      float* dst = keyed + a * N;
      for (int64_t k = 0; k < N; ++k) {
        const int32_t* ik = idx + k * 4;
        const float* wk = wts + k * 4;
        dst[k] = wk[0] * src[ik[0]] + wk[1] * src[ik[1]] + wk[2] * src[ik[2]] + wk[3] * src[ik[3]];
      }
    }
  });
  // Then along the query axis, one full-grid row at a time, and transform.
  parallel_blocks(i0, i1, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(N);
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* ii = idx + i * 4;
      const float* wi = wts + i * 4;
      const float* r[4];
      Vec w[4];
      for (int t = 0; t < 4; ++t) {
        r[t] = keyed + (ii[t] - a0) * N;
        w[t] = Vec(wi[t]);
      }
      for (int64_t k = 0; k < N; k += kLanes) {
        const int64_t count = std::min(kLanes, N - k);
        Vec u = w[0] * Vec::loadu(r[0] + k, count);
        for (int t = 1; t < 4; ++t) u = at::vec::fmadd(w[t], Vec::loadu(r[t] + k, count), u);
        u.store(row.data() + k, count);
      }
      cdam_row(row.data(), N, alpha, weight, acc + (i - i0) * N, add);
    }
  });
}

int64_t chunk_rows(int64_t N) { return std::max<int64_t>(16, std::min<int64_t>(N, kChunkFloats / std::max<int64_t>(N, 1))); }

std::vector<Scale> make_scales(const std::vector<at::Tensor>& ps, const std::vector<c10::optional<at::Tensor>>& idx,
                               const std::vector<c10::optional<at::Tensor>>& wts, bool materialize) {
  TORCH_CHECK(ps.size() == idx.size() && ps.size() == wts.size(), "one distribution and one tap set per scale");
  std::vector<Scale> scales;
  scales.reserve(ps.size());
  for (size_t s = 0; s < ps.size(); ++s) scales.emplace_back(ps[s].contiguous(), idx[s], wts[s], materialize);
  return scales;
}

// ----------------------------------------------------------------------------- public ops

at::Tensor pairwise_jsd(const at::Tensor& p, const c10::optional<at::Tensor>& q) {
  if (!q.has_value()) return jsd_self_full(self_operand(p));
  const at::Tensor qc = q->contiguous();
  const at::Tensor centre = centring_weights(p.contiguous(), &qc);
  const Operand rows(p, centre), keys(*q, centre);
  const int64_t B = p.size(0), N = p.size(1), M = keys.n;
  at::Tensor J = at::empty({B, N, M}, p.options());
  float* out = J.data_ptr<float>();
  const int64_t row_tiles = ceil_div(N, kTile);
  parallel_blocks(0, B * row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / row_tiles, i0 = (w % row_tiles) * kTile, i1 = std::min(N, i0 + kTile);
      jsd_rows(rows, keys, b, i0, i1, 0, ceil_div(M, kKeyBlock), out + (b * N + i0) * M, M);
    }
  });
  return J;
}

at::Tensor cdam_map(const at::Tensor& p, double alpha) {
  at::Tensor A = jsd_self_full(self_operand(p));
  const int64_t N = A.size(1);
  float* a = A.data_ptr<float>();
  parallel_blocks(0, A.size(0) * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) cdam_row(a + row * N, N, static_cast<float>(alpha), 1.f, a + row * N, false);
  });
  return A;
}

// Chunked (map rows) @ v: never more than chunk_rows(N) rows of the map at once.
at::Tensor multiscale_attention_impl(const std::vector<Scale>& scales, const at::Tensor& v, double alpha) {
  const int64_t B = v.size(0), N = v.size(1);
  at::Tensor out = at::empty_like(v);
  const int64_t R = chunk_rows(N);
  at::Tensor acc_buf = at::empty({std::min(R, N), N}, v.options());
  const float weight = 1.f / static_cast<float>(scales.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i0 = 0; i0 < N; i0 += R) {
      const int64_t i1 = std::min(N, i0 + R);
      at::Tensor acc = acc_buf.narrow(0, 0, i1 - i0);
      for (size_t s = 0; s < scales.size(); ++s)
        accumulate_scale(scales[s], b, i0, i1, N, static_cast<float>(alpha), weight, acc.data_ptr<float>(), s > 0);
      at::Tensor dst = out[b].narrow(0, i0, i1 - i0);
      at::mm_out(dst, acc, v[b]);
    }
  return out;
}

at::Tensor cdam_attention(const at::Tensor& p, const at::Tensor& v, double alpha, bool materialize) {
  if (materialize) return at::bmm(cdam_map(p, alpha), v);
  std::vector<Scale> one;
  one.emplace_back(p.contiguous(), c10::nullopt, c10::nullopt, false);
  return multiscale_attention_impl(one, v, alpha);
}

at::Tensor multiscale_cdam_map(const std::vector<at::Tensor>& ps, const std::vector<c10::optional<at::Tensor>>& idx,
                               const std::vector<c10::optional<at::Tensor>>& wts, int64_t N, double alpha) {
  TORCH_CHECK(!ps.empty(), "at least one scale");
  const int64_t B = ps[0].size(0);
  at::Tensor out = at::empty({B, N, N}, ps[0].options());
  const int64_t R = chunk_rows(N);
  const float weight = 1.f / static_cast<float>(ps.size());
  // Scale by scale, so only one scale's divergences are held besides the output.
  for (size_t s = 0; s < ps.size(); ++s) {
    const Scale scale(ps[s].contiguous(), idx[s], wts[s], /*materialize=*/true);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i0 = 0; i0 < N; i0 += R)
        accumulate_scale(scale, b, i0, std::min(N, i0 + R), N, static_cast<float>(alpha), weight,
                         out.data_ptr<float>() + (b * N + i0) * N, s > 0);
  }
  return out;
}

at::Tensor multiscale_cdam_attention(const std::vector<at::Tensor>& ps, const std::vector<c10::optional<at::Tensor>>& idx,
                                     const std::vector<c10::optional<at::Tensor>>& wts, const at::Tensor& v, double alpha,
                                     bool materialize) {
  TORCH_CHECK(!ps.empty(), "at least one scale");
  return multiscale_attention_impl(make_scales(ps, idx, wts, materialize), v, alpha);
}

// softmax_j(-J_ij / tau) @ v with an online softmax over blocks of keys: per row a running max m
// and sum l; O(rows x (kSoftmaxKeys + D)) scratch, rows x kSoftmaxKeys <= kChunkFloats.
at::Tensor jsd_attention(const at::Tensor& p, const at::Tensor& v, double tau, const c10::optional<at::Tensor>& q) {
  const at::Tensor qc = q.has_value() ? q->contiguous() : at::Tensor();
  const at::Tensor centre = centring_weights(p.contiguous(), q.has_value() ? &qc : nullptr);
  const Operand rows(p, centre);
  c10::optional<Operand> keys_own;
  if (q.has_value()) keys_own.emplace(*q, centre);
  const Operand& keys = q.has_value() ? *keys_own : rows;
  const int64_t B = p.size(0), N = p.size(1), M = keys.n, D = v.size(2);
  const bool self = !q.has_value();
  at::Tensor out = at::empty({B, N, D}, v.options());
  // Few, large steps (each is a parallel region plus a GEMM); the online softmax only takes
  // over when a row has more than kSoftmaxKeys keys.
  const int64_t K = std::min<int64_t>(ceil_div(M, kKeyBlock) * kKeyBlock, kSoftmaxKeys);
  // For p against itself a step holding every row and key evaluates each unordered pair once
  // (half the logarithms): worth a larger, still bounded, weight buffer.
  const bool whole = self && M <= K && N * K <= kSelfStepFloats;
  const int64_t R = whole ? N : std::max<int64_t>(1, std::min<int64_t>(N, kChunkFloats / K));
  // With a single key step no running rescale is needed: the product goes straight to out.
  const bool one_key_step = M <= K;
  at::Tensor weights = at::empty({R, K}, p.options());
  at::Tensor acc = one_key_step ? at::Tensor() : at::empty({R, D}, p.options());
  at::Tensor rescale = at::empty({R, 1}, p.options());
  std::vector<float> run_max(R), run_sum(R);
  // J <= ln 2: clamped to the float32 range the scale keeps every logit finite for any tau > 0
  // (below tau ~ 3e-39, -1 / tau is -inf in float32 and 0 * inf = NaN on the diagonal)
  const float neg_inv_tau = static_cast<float>(std::max(-1.0 / tau, -static_cast<double>(cdam::kFloat32Max)));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i0 = 0; i0 < N; i0 += R) {
      const int64_t i1 = std::min(N, i0 + R), nr = i1 - i0;
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      at::Tensor dst = out[b].narrow(0, i0, nr);
      if (!one_key_step) acc.zero_();
      for (int64_t k0 = 0; k0 < M; k0 += K) {
        const int64_t k1 = std::min(M, k0 + K), nk = k1 - k0;
        float* w = weights.data_ptr<float>();
        float* sc = rescale.data_ptr<float>();
        // Rows [begin, end): logits -J / tau -> exp(logit - running max), running sums.
        auto softmax_rows = [&](int64_t begin, int64_t end) {
          const Vec vneg_inv_tau(neg_inv_tau), ninf(-std::numeric_limits<float>::infinity()), zero(0.f);
          for (int64_t i = begin; i < end; ++i) {
            float* wr = w + (i - i0) * K;
            if (self && i >= k0 && i < k1) wr[i - k0] = 0.f;
            // wr holds K >= nk floats, K a multiple of kLanes: full vectors, tail lanes masked.
            Vec vmax = ninf;
            for (int64_t k = 0; k < nk; k += kLanes) {
              const Vec logit = Vec::loadu(wr + k) * vneg_inv_tau;
              logit.store(wr + k);
              vmax = at::vec::maximum(vmax, k + kLanes <= nk ? logit : Vec::set(ninf, logit, nk - k));
            }
            const float tile_max = max_lanes(vmax);  // NaN if a logit is NaN (Vectorized max keeps NaN)
            const float m_new = std::isnan(tile_max) ? tile_max : std::max(run_max[i - i0], tile_max);
            const Vec vm_new(m_new);
            Vec total = zero;
            for (int64_t k = 0; k < nk; k += kLanes) {
              const Vec e = exp_nonpos(Vec::loadu(wr + k) - vm_new);
              e.store(wr + k);  // lanes past nk are never read
              total = total + (k + kLanes <= nk ? e : Vec::set(zero, e, nk - k));
            }
            const float scale = std::exp(run_max[i - i0] - m_new);  // exp(-inf) = 0 on the first block
            sc[i - i0] = scale;
            run_sum[i - i0] = run_sum[i - i0] * scale + sum_lanes(total);
            run_max[i - i0] = m_new;
          }
        };
        if (whole) {
          // one step holds every pair of this batch element: evaluate J once per unordered pair
          jsd_self_into(rows, b, b + 1, w, K, 0);
          parallel_blocks(i0, i1, 8, softmax_rows);
        } else {
          parallel_blocks(i0, i1, 8, [&](int64_t begin, int64_t end) {
            jsd_rows(rows, keys, b, begin, end, k0 / kKeyBlock, ceil_div(k1, kKeyBlock), w + (begin - i0) * K - k0, K);
            softmax_rows(begin, end);
          });
        }
        const at::Tensor w_rows = weights.narrow(0, 0, nr).narrow(1, 0, nk), v_keys = v[b].narrow(0, k0, nk);
        if (one_key_step) {
          at::mm_out(dst, w_rows, v_keys);
        } else {
          at::Tensor acc_rows = acc.narrow(0, 0, nr);
          acc_rows.mul_(rescale.narrow(0, 0, nr));
          acc_rows.addmm_(w_rows, v_keys);
        }
      }
      const at::Tensor sums = at::from_blob(run_sum.data(), {nr, 1}, p.options());
      if (one_key_step)
        dst.div_(sums);
      else
        at::div_out(dst, acc.narrow(0, 0, nr), sums);
    }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cdam_fast CPU kernels (float32 in, float32 out; see cdam_fast/backends/cpu_backend.py)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("pairwise_jsd", &pairwise_jsd, "J [B, N, M] of p [B, N, C] against q (None: p itself)", py::arg("p"),
        py::arg("q") = py::none(), nogil);
  m.def("cdam_map", &cdam_map, "single-scale CDAM map [B, N, N]", py::arg("p"), py::arg("alpha"), nogil);
  m.def("cdam_attention", &cdam_attention, "cdam_map(p) @ v", py::arg("p"), py::arg("v"), py::arg("alpha"),
        py::arg("materialize"), nogil);
  m.def("multiscale_cdam_map", &multiscale_cdam_map, "mean over scales of the upsampled CDAM maps", py::arg("ps"),
        py::arg("idx"), py::arg("wts"), py::arg("n"), py::arg("alpha"), nogil);
  m.def("multiscale_cdam_attention", &multiscale_cdam_attention, "multiscale_cdam_map @ v without the map",
        py::arg("ps"), py::arg("idx"), py::arg("wts"), py::arg("v"), py::arg("alpha"), py::arg("materialize"), nogil);
  m.def("jsd_attention", &jsd_attention, "softmax(-J / tau) @ v, online softmax", py::arg("p"), py::arg("v"),
        py::arg("tau"), py::arg("q") = py::none(), nogil);
}
