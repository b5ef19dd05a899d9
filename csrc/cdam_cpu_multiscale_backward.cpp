// Fused CPU backward of cdam_map, multiscale_cdam_map and multiscale_cdam_attention
// (docs/autograd.md, sections 2 and 3), driven by cdam_fast/autograd/cpu_backward.py.
//
// With M = (1/S) sum_s A_s the gradient of every scale's map is dM / S, so one pass over the
// full-grid query rows serves all scales. Per row i (bounded row chunks, at::parallel_for):
//  * dM_i: the row of the incoming map gradient, or g_i . v_j from one GEMM per chunk;
//  * full-grid scale: the row's C x Mp logarithms once (row_logs) give J_i and, after the row's
//    min-max / expm1 adjoint G_i, its class sums (row_class_sums: row side and key side);
//  * each smaller scale: the upsampled row J_up,i from the held n_s x n_s divergences (the
//    forward's taps: along keys once per chunk, then the row's four query taps), its adjoint G_i,
//    and the query side of the pair-upsampling adjoint (four axpys into per-worker
//    [source rows, N] buffers); after the chunk the key side (the transposed key taps) lands in
//    dJ_s [n_s, n_s]. No N x N map is ever formed;
//  * the row of M (the scales' A rows / S, evaluated as the forward does), for gv = M^T g.
// The smaller grids' divergence gradients (jsd_self_class_grads, each unordered pair once) and
// the softmax / resize adjoints follow on the host.
//
// The min-max / expm1 adjoint of a row (row_adjoint) follows the rules of docs/autograd.md:
// ties at the row max / min share its gradient evenly, each extremum's own term is formed as
// (mean of the tied gX - gX) + the rest of the row's sum (so a single extremum cancels exactly),
// constant rows get none, J = 0 passes none, and dA/dX carries the factor 2^-e of
// reference.gradient_exponent (the host multiplies the result back by 2^e).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cdam_common.h"
#include "cdam_cpu_backward_rows.h"
#include "cdam_cpu_math.h"

namespace {

using cdam_bwd::kLanes;
using cdam_bwd::log2v;
using cdam_bwd::sum_lanes;
using cdam_bwd::Vec;

// Bound of the per-chunk buffers (floats): g v^T and M rows [R, N] each, and per thread the
// query-side adjoint of every smaller scale [source rows of the chunk, N].
constexpr int64_t kChunkFloats = int64_t(1) << 21;
// exp(y) is taken as 0 below this (exp_nonpos clamps there instead): a key that far from the row
// minimum must pass no gradient at any alpha, since the host multiplies G back by 2^e ~ alpha.
constexpr float kExpUnderflow = -86.f;

using cdam::max_lanes;
using cdam::min_lanes;

// The per-worker buffers below (key-side class sums and a row's logs, C x Mp floats each, and
// the smaller scales' query-side adjoints) are bounded by the memory policy's budget
// (cdam_cpu_backward_rows.h, task_count); last_buffer_bytes() reports the most one call of the
// last backward allocated for them.
using cdam_bwd::add_task_sums;
using cdam_bwd::g_buffer_bytes;
using cdam_bwd::last_buffer_bytes;
using cdam_bwd::task_count;

// Dynamically balanced parallel loop over [begin, end) in blocks (rows of unequal cost), on at
// most `workers` workers; f(slot, begin, end) gets a slot in [0, workers) that no other worker
// holds at the same time (the index of its buffers).
template <class F>
void parallel_blocks(int64_t begin, int64_t end, int64_t block, int64_t workers, const F& f) {
  if (end <= begin) return;
  const int64_t blocks = (end - begin + block - 1) / block;
  const int64_t threads = std::min<int64_t>({int64_t(at::get_num_threads()), blocks, workers});
  if (threads <= 1) {
    f(0, begin, end);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t slot, int64_t) {
    for (int64_t k = next.fetch_add(1); k < blocks; k = next.fetch_add(1))
      f(slot, begin + k * block, std::min(end, begin + (k + 1) * block));
  });
}

// Per-scale constants of the row transform and its adjoint.
struct Transform {
  double alpha = 0.0;
  float neg_alpha = 0.f;  // -alpha, clamped to the float32 range
  float weight = 0.f;     // this scale's share of M (1/S, or k/S for k identical scales)
  float gscale = 0.f;     // weight * alpha / (1 - exp(-alpha)) * 2^-e (docs/autograd.md, "Large alpha")
  cdam::TransformFactors tf;
  Transform(double a, double w) : alpha(a), weight(float(w)), tf(cdam::transform_factors(a)) {
    neg_alpha = -float(std::min(a, double(cdam::kFloat32Max)));
    gscale = float(w * std::ldexp(a / -std::expm1(-a), -std::max(0, std::ilogb(a))));
  }
};

// One row: jr [n] divergences, dm [n] the gradient of M's row. Writes G [n] (the gradient of this
// scale's J row, scaled by 2^-e) and, if m is given, adds weight * A to m [n].
void row_adjoint(const float* jr, const float* dm, int64_t n, const Transform& k, float* m, float* G) {
  Vec vhi(-std::numeric_limits<float>::infinity()), vlo(std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec v = Vec::loadu(jr + j);
    vhi = at::vec::maximum(vhi, v);
    vlo = at::vec::minimum(vlo, v);
  }
  float hi = max_lanes(vhi), lo = min_lanes(vlo);
  for (; j < n; ++j) {
    hi = std::max(hi, jr[j]);
    lo = std::min(lo, jr[j]);
  }
  const float span = hi - lo;
  if (!(span >= cdam::kConstantRowEps)) {  // constant row: X := 1, A = 1, no gradient
    std::fill(G, G + n, 0.f);
    if (m)
      for (j = 0; j < n; ++j) m[j] += k.weight;
    return;
  }
  const float inv = 1.f / span;
  const Vec zero(0.f), one(1.f), vlo_row(lo), vhi_row(hi), vinv(inv), vneg_alpha(k.neg_alpha);
  const Vec voffset(k.tf.exp_neg_alpha), vfactor(k.tf.factor), vweight(k.weight), vgscale(k.gscale);
  const bool series = k.tf.small;  // small alpha: A in double below (rare), as the forward's series avoids
  Vec ext_hi(0.f), ext_lo(0.f), cnt_hi(0.f), cnt_lo(0.f), rest_hi(0.f), rest_lo(0.f);
  // pass 1: gX = dm * dA/dX (stored in G), A into m, the extremes' and the rest's sums
  for (j = 0; j < n; j += kLanes) {
    const int64_t count = std::min(kLanes, n - j);
    const Vec J = Vec::loadu(jr + j, count);
    const Vec is_hi = J == vhi_row, is_lo = J == vlo_row;
    // t = 1 - X = (J - lo) / span, exactly 0 at the row min and 1 at the row max
    Vec t = at::vec::minimum(at::vec::maximum((J - vlo_row) * vinv, zero), one);
    t = Vec::blendv(t, one, is_hi);
    const Vec y = t * vneg_alpha;
    const Vec e = Vec::blendv(cdam::exp_nonpos(y), zero, y < Vec(kExpUnderflow));
    if (m && !series) {
      const Vec a = at::vec::maximum((e - voffset) * vfactor, zero) * vweight;
      (Vec::loadu(m + j, count) + a).store(m + j, count);
    }
    Vec gx = Vec::loadu(dm + j, count) * vgscale * e;
    gx = Vec::set(zero, gx, count);  // lanes past n add nothing
    gx.store(G + j, count);
    const Vec valid = Vec::set(zero, one, count);
    ext_hi = ext_hi + Vec::blendv(zero, gx, is_hi);
    ext_lo = ext_lo + Vec::blendv(zero, gx, is_lo);
    cnt_hi = cnt_hi + Vec::blendv(zero, valid, is_hi);
    cnt_lo = cnt_lo + Vec::blendv(zero, valid, is_lo);
    rest_hi = rest_hi + Vec::blendv(gx * t, zero, is_hi);
    rest_lo = rest_lo + Vec::blendv(gx * (one - t), zero, is_lo);
  }
  if (m && series)
    for (j = 0; j < n; ++j) {
      const double t = jr[j] == hi ? 1.0 : std::min(1.0, std::max(0.0, double(jr[j] - lo) / double(span)));
      m[j] += k.weight * float(std::exp(-k.alpha * t) * std::expm1(-k.alpha * (1.0 - t)) / std::expm1(-k.alpha));
    }
  const float n_hi = sum_lanes(cnt_hi), n_lo = sum_lanes(cnt_lo);
  const Vec mean_hi(sum_lanes(ext_hi) / n_hi), add_hi(sum_lanes(rest_hi) / n_hi);
  const Vec mean_lo(sum_lanes(ext_lo) / n_lo), add_lo(sum_lanes(rest_lo) / n_lo);
  // pass 2: G = (the extremes' terms or -gX) / span, 0 where J = 0
  for (j = 0; j < n; j += kLanes) {
    const int64_t count = std::min(kLanes, n - j);
    const Vec J = Vec::loadu(jr + j, count);
    const Vec gx = Vec::loadu(G + j, count);
    Vec g = Vec::blendv(zero - gx, (mean_hi - gx) + add_hi, J == vhi_row);
    g = Vec::blendv(g, (mean_lo - gx) + add_lo, J == vlo_row);
    g = Vec::blendv(g * vinv, zero, J == zero);
    g.store(G + j, count);
  }
}

// One smaller scale: its divergences, the forward's taps onto the full grid, and dJ.
struct SmallScale {
  const float* J;        // [n_s, n_s] of this batch element
  const int32_t* idx;    // [N, 4] source cells (flat on the small grid)
  const float* wts;      // [N, 4]
  float* dJ;             // [n_s, n_s] output
  int64_t ns;
  int64_t a0 = 0, a1 = 0;  // source rows of the current chunk
  std::vector<float> keyed;  // [a1 - a0, N]: J_s upsampled along keys
  std::vector<float> dkeyed;  // [workers, a1 - a0, N]: per-worker query-side adjoint
};

// Source rows [a0, a1) of the small grid that full-grid rows [i0, i1) read.
std::pair<int64_t, int64_t> source_rows(const int32_t* idx, int64_t ns, int64_t i0, int64_t i1) {
  int64_t a0 = ns, a1 = 0;
  for (int64_t i = i0; i < i1; ++i)
    for (int t = 0; t < 4; ++t) {
      a0 = std::min<int64_t>(a0, idx[i * 4 + t]);
      a1 = std::max<int64_t>(a1, idx[i * 4 + t] + 1);
    }
  return {a0, std::max(a0, a1)};
}

// The most source rows of the smaller scales (summed) that one chunk of R full-grid rows reads.
int64_t worst_source_rows(int64_t N, const std::vector<SmallScale>& small, int64_t R) {
  int64_t worst = 0;
  for (int64_t i0 = 0; i0 < N; i0 += R) {
    int64_t rows = 0;
    for (const SmallScale& s : small) {
      const auto [a0, a1] = source_rows(s.idx, s.ns, i0, std::min(N, i0 + R));
      rows += a1 - a0;
    }
    worst = std::max(worst, rows);
  }
  return worst;
}

// Each smaller scale's most source rows in one chunk of R rows, summed over the scales: its
// query-side adjoint buffer keeps its largest size, so this bounds what they hold together.
int64_t held_source_rows(int64_t N, const std::vector<SmallScale>& small, int64_t R) {
  int64_t held = 0;
  for (const SmallScale& s : small) {
    int64_t most = 0;
    for (int64_t i0 = 0; i0 < N; i0 += R) {
      const auto [a0, a1] = source_rows(s.idx, s.ns, i0, std::min(N, i0 + R));
      most = std::max(most, a1 - a0);
    }
    held += most;
  }
  return held;
}

// Rows per chunk: the forward's bound on [R, N] buffers, halved while the per-worker query-side
// adjoints of the smaller scales (their source rows x N) exceed it too.
int64_t chunk_rows(int64_t N, const std::vector<SmallScale>& small) {
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, kChunkFloats / std::max<int64_t>(N, 1)));
  while (R > 1 && worst_source_rows(N, small, R) * N > kChunkFloats) R /= 2;
  return R;
}

// The pass over the full-grid rows (see the top of the file). full: {p, lp, rp, kT, lkT, rk, w} of
// the full-grid scale (empty: no scale keeps the full grid), with weight full_weight; small: per
// smaller scale J [B, n_s, n_s], taps idx [N, 4] / wts [N, 4], each with weight small_weight.
// The map's gradient comes as gmap [B, N, N], or as g [B, N, D] with v [B, N, D] (dM = g v^T;
// then gv = M^T g is returned). Returns (T [B, N, C], U [B, C, Mp] of the full-grid scale
// (empty without one), dJ of each smaller scale [B, n_s, n_s], gv (empty without v)), float32.
// max_rows > 0 caps the rows per chunk (tests: several chunks at small N); buffer_budget bounds
// the per-worker buffers (task_count).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor> multiscale_rows_backward(
    const std::vector<at::Tensor>& full, double full_weight, const std::vector<at::Tensor>& Js,
    const std::vector<at::Tensor>& idx, const std::vector<at::Tensor>& wts, double small_weight,
    const c10::optional<at::Tensor>& gmap, const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& v,
    int64_t B, int64_t N, double alpha, int64_t max_rows, int64_t buffer_budget) {
  TORCH_CHECK(full.empty() || full.size() == 7, "full: p, lp, rp, kT, lkT, rk, w");
  TORCH_CHECK(Js.size() == idx.size() && Js.size() == wts.size(), "one tap set per smaller scale");
  TORCH_CHECK(gmap.has_value() != (g.has_value() && v.has_value()), "give gmap, or g and v");
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const bool has_full = !full.empty(), attention = v.has_value();
  const int64_t C = has_full ? full[0].size(2) : 0, Mp = has_full ? full[3].size(2) : 0;
  TORCH_CHECK(!has_full || (Mp >= N && Mp % (2 * kLanes) == 0), "keys must be padded to a multiple of ", 2 * kLanes);
  at::Tensor T = has_full ? at::zeros({B, N, C}, opts) : at::zeros({0}, opts);
  at::Tensor U = has_full ? at::zeros({B, C, Mp}, opts) : at::zeros({0}, opts);
  std::vector<at::Tensor> dJs;
  for (const at::Tensor& j : Js) dJs.push_back(at::zeros_like(j));
  const int64_t D = attention ? v->size(2) : 0;
  at::Tensor gv = attention ? at::zeros({B, N, D}, opts) : at::zeros({0}, opts);
  const Transform full_tf(alpha, full_weight), small_tf(alpha, small_weight);

  std::vector<SmallScale> small(Js.size());
  for (size_t s = 0; s < Js.size(); ++s) {
    small[s].ns = Js[s].size(1);
    small[s].idx = idx[s].data_ptr<int32_t>();
    small[s].wts = wts[s].data_ptr<float>();
  }
  const int64_t R = max_rows > 0 ? std::min(max_rows, chunk_rows(N, small)) : chunk_rows(N, small);
  at::Tensor GV = attention ? at::empty({R, N}, opts) : at::Tensor();
  at::Tensor W = attention ? at::empty({R, N}, opts) : at::Tensor();
  // per worker: key-side sums and a row's logs (C x Mp each), three rows of the row's width and
  // the smaller scales' query-side adjoints (each at its largest over the chunks)
  const int64_t width = has_full ? Mp : N;
  const int64_t per_worker = int64_t(sizeof(float)) * (2 * C * Mp + 3 * width + held_source_rows(N, small, R) * N);
  const int64_t workers = task_count(buffer_budget, per_worker, N);
  g_buffer_bytes = workers * per_worker;
  std::vector<float> u_local(has_full ? workers * C * Mp : 0);
  // exact logs of tiny sums only where some entry needs them (cdam_cpu_backward_rows.h)
  const auto logs_of_row = has_full && (cdam_bwd::has_tiny(full[0]) || cdam_bwd::has_tiny(full[3]))
                               ? cdam_bwd::row_logs<true> : cdam_bwd::row_logs<false>;

  for (int64_t b = 0; b < B; ++b) {
    std::fill(u_local.begin(), u_local.end(), 0.f);
    for (size_t s = 0; s < small.size(); ++s) {
      small[s].J = Js[s].data_ptr<float>() + b * small[s].ns * small[s].ns;
      small[s].dJ = dJs[s].data_ptr<float>() + b * small[s].ns * small[s].ns;
    }
    for (int64_t i0 = 0; i0 < N; i0 += R) {
      const int64_t i1 = std::min(N, i0 + R), nr = i1 - i0;
      const float* dm_rows;  // row r of the chunk's dM at dm_rows + r * N
      at::Tensor g_rows;
      if (attention) {
        g_rows = (*g)[b].narrow(0, i0, nr);
        at::Tensor gvr = GV.narrow(0, 0, nr);
        at::mm_out(gvr, g_rows, (*v)[b].t());
        dm_rows = GV.data_ptr<float>();
        W.zero_();
      } else {
        dm_rows = gmap->data_ptr<float>() + (b * N + i0) * N;
      }
      // each smaller scale: its chunk's rows upsampled along keys (the forward's tap order)
      for (SmallScale& s : small) {
        std::tie(s.a0, s.a1) = source_rows(s.idx, s.ns, i0, i1);
        const int64_t na = s.a1 - s.a0;
        s.keyed.resize(na * N);
        s.dkeyed.assign(workers * na * N, 0.f);
        parallel_blocks(0, na, 4, workers, [&](int64_t, int64_t begin, int64_t end) {
          for (int64_t a = begin; a < end; ++a) {
            const float* src = s.J + (s.a0 + a) * s.ns;
            float* dst = s.keyed.data() + a * N;
            for (int64_t k = 0; k < N; ++k) {
              const int32_t* ik = s.idx + k * 4;
              const float* wk = s.wts + k * 4;
              dst[k] = wk[0] * src[ik[0]] + wk[1] * src[ik[1]] + wk[2] * src[ik[2]] + wk[3] * src[ik[3]];
            }
          }
        });
      }
      parallel_blocks(0, nr, 4, workers, [&](int64_t tid, int64_t begin, int64_t end) {
        std::vector<float> logs(C * Mp), jrow(width), part(width), grow(width, 0.f);
        float* ut = has_full ? u_local.data() + tid * C * Mp : nullptr;
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = i0 + r;
          const float* dm = dm_rows + r * N;
          float* m = attention ? W.data_ptr<float>() + r * N : nullptr;
          if (has_full) {
            const float* prow = full[0].data_ptr<float>() + (b * N + i) * C;
            const float* kb = full[3].data_ptr<float>() + b * C * Mp;
            const float* wb = full[6].data_ptr<float>() + b * C;
            logs_of_row(prow, kb, wb, C, Mp, logs.data(), jrow.data(), part.data());
            const Vec ri(full[2].data_ptr<float>()[b * N + i]);
            const float* rkb = full[5].data_ptr<float>() + b * Mp;
            for (int64_t j = 0; j < Mp; j += kLanes) {
              const Vec jv = (ri + Vec::loadu(rkb + j) - Vec::loadu(jrow.data() + j)) * Vec(cdam::kHalfLn2);
              at::vec::maximum(jv, Vec(0.f)).store(jrow.data() + j);
            }
            jrow[i] = 0.f;  // the self divergence
            row_adjoint(jrow.data(), dm, N, full_tf, m, grow.data());
            std::fill(grow.begin() + N, grow.end(), 0.f);  // padded keys: no gradient
            cdam_bwd::row_class_sums(grow.data(), logs.data(), full[1].data_ptr<float>() + (b * N + i) * C,
                                     full[4].data_ptr<float>() + b * C * Mp, C, Mp,
                                     T.data_ptr<float>() + (b * N + i) * C, ut);
          }
          for (SmallScale& s : small) {
            const int64_t na = s.a1 - s.a0;
            const int32_t* ii = s.idx + i * 4;
            const float* wi = s.wts + i * 4;
            const float* src[4];
            Vec w[4];
            for (int t = 0; t < 4; ++t) {
              src[t] = s.keyed.data() + (ii[t] - s.a0) * N;
              w[t] = Vec(wi[t]);
            }
            for (int64_t k = 0; k < N; k += kLanes) {  // along queries: the forward's order
              const int64_t count = std::min(kLanes, N - k);
              Vec u = w[0] * Vec::loadu(src[0] + k, count);
              for (int t = 1; t < 4; ++t) u = at::vec::fmadd(w[t], Vec::loadu(src[t] + k, count), u);
              u.store(jrow.data() + k, count);
            }
            row_adjoint(jrow.data(), dm, N, small_tf, m, grow.data());
            float* dk = s.dkeyed.data() + tid * na * N;
            for (int t = 0; t < 4; ++t) {  // query side of the pair-upsampling adjoint
              float* dst = dk + (ii[t] - s.a0) * N;
              for (int64_t k = 0; k < N; k += kLanes) {
                const int64_t count = std::min(kLanes, N - k);
                at::vec::fmadd(w[t], Vec::loadu(grow.data() + k, count), Vec::loadu(dst + k, count))
                    .store(dst + k, count);
              }
            }
          }
        }
      });
      // key side of the pair-upsampling adjoint: dJ_s[a, ik[k, u]] += wk[k, u] sum_workers dkeyed[a, k]
      for (SmallScale& s : small) {
        const int64_t na = s.a1 - s.a0;
        parallel_blocks(0, na, 1, workers, [&](int64_t, int64_t begin, int64_t end) {
          for (int64_t a = begin; a < end; ++a) {
            float* row = s.dkeyed.data() + a * N;
            for (int64_t t = 1; t < workers; ++t) {
              const float* other = s.dkeyed.data() + (t * na + a) * N;
              for (int64_t k = 0; k < N; ++k) row[k] += other[k];
            }
            float* dst = s.dJ + (s.a0 + a) * s.ns;
            for (int64_t k = 0; k < N; ++k) {
              const int32_t* ik = s.idx + k * 4;
              const float* wk = s.wts + k * 4;
              const float x = row[k];
              dst[ik[0]] += wk[0] * x;
              dst[ik[1]] += wk[1] * x;
              dst[ik[2]] += wk[2] * x;
              dst[ik[3]] += wk[3] * x;
            }
          }
        });
      }
      if (attention) gv[b].addmm_(W.narrow(0, 0, nr).t(), g_rows);
    }
    if (has_full) add_task_sums(U.data_ptr<float>() + b * C * Mp, u_local, workers, C * Mp);
  }
  return {T, U, dJs, gv};
}

// pairwise_jsd(p)'s gradient sums for the score gradient G [B, n, n] (the diagonal passes none),
// each unordered pair once: row i takes G_ij + G_ji for the keys j > i. p [B, n, C], lp its log
// terms, kT / lkT [B, C, Mp] the same rows class-major and zero-padded. Returns T [B, n, C] (row
// side) and U [B, C, Mp] (key side): the gradient is their sum. buffer_budget: as for
// multiscale_rows_backward (task_count).
std::vector<at::Tensor> jsd_self_class_grads(const at::Tensor& p, const at::Tensor& lp, const at::Tensor& kT,
                                             const at::Tensor& lkT, const at::Tensor& w, const at::Tensor& G,
                                             int64_t buffer_budget) {
  const int64_t B = p.size(0), n = p.size(1), C = p.size(2), Mp = kT.size(2);
  TORCH_CHECK(Mp >= n && Mp % kLanes == 0, "jsd_self_class_grads: keys must be padded to a multiple of ", kLanes);
  TORCH_CHECK(G.size(1) == n && G.size(2) == n && G.is_contiguous(), "jsd_self_class_grads: G must be [B, n, n]");
  at::Tensor T = at::zeros({B, n, C}, p.options());
  at::Tensor U = at::zeros({B, C, Mp}, p.options());
  // per worker: key-side sums (C x Mp), a row of symmetrised G (Mp) and the row-side sums (C lanes)
  const int64_t per_worker = int64_t(sizeof(float)) * (C * Mp + Mp) + C * int64_t(sizeof(Vec));
  const int64_t workers = task_count(buffer_budget, per_worker, n);
  g_buffer_bytes = std::max(g_buffer_bytes.load(), workers * per_worker);  // after the row pass's
  std::vector<float> u_local(workers * C * Mp);
  const bool tiny = cdam_bwd::has_tiny(p) || cdam_bwd::has_tiny(kT);
  for (int64_t b = 0; b < B; ++b) {
    const float* pb = p.data_ptr<float>() + b * n * C;
    const float* lpb = lp.data_ptr<float>() + b * n * C;
    const float* kb = kT.data_ptr<float>() + b * C * Mp;
    const float* lkb = lkT.data_ptr<float>() + b * C * Mp;
    const float* wb = w.data_ptr<float>() + b * C;
    const float* Gb = G.data_ptr<float>() + b * n * n;
    float* Tb = T.data_ptr<float>() + b * n * C;
    std::fill(u_local.begin(), u_local.end(), 0.f);
    parallel_blocks(0, n, 4, workers, [&](int64_t tid, int64_t begin, int64_t end) {
      float* ut = u_local.data() + tid * C * Mp;
      std::vector<Vec> tacc(C);
      std::vector<float> sym(Mp);
      const float* grow = sym.data();
      for (int64_t i = begin; i < end; ++i) {
        const float* prow = pb + i * C;
        const float* lprow = lpb + i * C;
        const int64_t j0 = (i + 1) / kLanes * kLanes;
        std::fill(tacc.begin(), tacc.end(), Vec(0.f));
        // G_ij + G_ji for the keys above the diagonal, 0 elsewhere in the first vector and on padding
        std::fill(sym.begin() + j0, sym.end(), 0.f);
        for (int64_t j = i + 1; j < n; ++j) sym[j] = Gb[i * n + j] + Gb[j * n + i];
        for (int64_t j = j0; j < Mp; j += kLanes) {  // keys above the diagonal
          const Vec gj = Vec::loadu(grow + j);
          for (int64_t c = 0; c < C; ++c) {
            const Vec sum = Vec(prow[c]) + Vec::loadu(kb + c * Mp + j);
            const Vec lg = tiny ? cdam_bwd::log2_sum<true>(sum, Vec(wb[c])) : log2v(sum * Vec(wb[c]));
            tacc[c] = at::vec::fmadd(gj, Vec(lprow[c]) - lg, tacc[c]);
            float* uc = ut + c * Mp + j;
            at::vec::fmadd(gj, Vec::loadu(lkb + c * Mp + j) - lg, Vec::loadu(uc)).store(uc);
          }
        }
        for (int64_t c = 0; c < C; ++c) Tb[i * C + c] = sum_lanes(tacc[c]);
      }
    });
    add_task_sums(U.data_ptr<float>() + b * C * Mp, u_local, workers, C * Mp);
  }
  return {T, U};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cdam_fast fused CPU backward of cdam_map and the multi-scale ops (see cdam_fast/autograd/cpu_backward.py)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("multiscale_rows_backward", &multiscale_rows_backward,
        "one pass over the full-grid rows: the full scale's class sums, the smaller scales' dJ, gv", py::arg("full"),
        py::arg("full_weight"), py::arg("Js"), py::arg("idx"), py::arg("wts"), py::arg("small_weight"),
        py::arg("gmap"), py::arg("g"), py::arg("v"), py::arg("B"), py::arg("N"), py::arg("alpha"),
        py::arg("max_rows") = 0, py::arg("buffer_budget") = -1, nogil);
  m.def("jsd_self_class_grads", &jsd_self_class_grads,
        "per-class gradient sums of sum_{i<j} G_ij J(p_i, p_j), each pair once", py::arg("p"), py::arg("lp"),
        py::arg("kT"), py::arg("lkT"), py::arg("w"), py::arg("G"), py::arg("buffer_budget") = -1, nogil);
  m.def("last_buffer_bytes", &last_buffer_bytes,
        "bytes of per-worker buffers of the last backward (the most of one call)");
}
