// CPU backward passes of pairwise_jsd and jsd_attention (docs/autograd.md, sections 1 and 4):
// SIMD over keys (at::vec::Vectorized), at::parallel_for over rows, BLAS GEMMs for the products
// with g and v, thread-local key-side accumulators. Never builds [N, M, C]; jsd_attention keeps
// bounded [rows, M] chunks of the weights and score gradients (O(N (C + D)) plus 16 MiB).
//
// J is evaluated in the forward's centred form (cdam_common.h): with the centring weights w [B, C]
// shared by both sides, J_ij = (ln 2 / 2) (r_i + r'_j - sum_c s log2(s w_c)), and the gradient's
// log(p_ic / m_ijc) = ln 2 (lp_ic - log2(s w_c)) with lp_ic = log2(2 p_ic w_c): one logarithm per
// (i, j, c) serves both. Inputs arrive from cdam_fast/backends/cpu_backward.py float32 and prepared:
// rows p [B, N, C], their log terms lp [B, N, C] and row terms r [B, N] (cdam_fast/centring.py);
// keys class-major and zero-padded to a multiple of the vector width, kT / lkT [B, C, Mp], rk [B, Mp].
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
#include "cdam_cpu_backward_rows.h"

namespace {

using Vec = at::vec::Vectorized<float>;
using VecD = at::vec::Vectorized<double>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kLanesD = VecD::size();
// Largest [rows, Mp] float chunk of weights and of g v^T per step: 8 MiB each.
constexpr int64_t kChunkFloats = int64_t(1) << 21;
using cdam_bwd::add_task_sums;
using cdam_bwd::g_buffer_bytes;
using cdam_bwd::has_tiny;
using cdam_bwd::last_buffer_bytes;
using cdam_bwd::log2_sum;
using cdam_bwd::log2v;
using cdam_bwd::row_class_sums;
using cdam_bwd::row_logs;
using cdam_bwd::sum_lanes;
using cdam_bwd::task_count;

// The passes below split their rows into `tasks` contiguous blocks, each with its own buffers,
// as many as the memory policy's budget allows (cdam_cpu_backward_rows.h, task_count).

// fn(task, begin, end) for `tasks` contiguous blocks of [i0, i1), the tasks run in parallel.
template <typename F>
void for_each_task(int64_t i0, int64_t i1, int64_t tasks, const F& fn) {
  const int64_t per = (i1 - i0 + tasks - 1) / tasks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, i0 + t * per, std::min(i1, i0 + (t + 1) * per));
  });
}

// For rows [i0, i1) of batch element b with score gradients G (row i at G + (i - i0) * Mp, zero
// on padded keys) and centring weights w [C]: T[i, c] = sum_j G_ij (lp_ic - log2(s_ijc w_c)) and,
// if U is given, U[c, j] += sum_i G_ij (lk_cj - log2(s_ijc w_c)), through per-thread buffers summed at the end.
template <bool kTiny>
void class_terms(const float* p, const float* lp, const float* kT, const float* lkT, const float* w, const float* G,
                 int64_t i0, int64_t i1, int64_t C, int64_t Mp, float* T, float* U, int64_t buffer_budget) {
  const int64_t tasks = U ? task_count(buffer_budget, C * Mp * int64_t(sizeof(float)), i1 - i0)
                          : task_count(-1, 0, i1 - i0);
  std::vector<float> u_local(U ? tasks * C * Mp : 0, 0.f);
  g_buffer_bytes = int64_t(u_local.size() * sizeof(float));
  for_each_task(i0, i1, tasks, [&](int64_t task, int64_t begin, int64_t end) {
    float* ut = U ? u_local.data() + task * C * Mp : nullptr;
    std::vector<Vec> tacc(C);
    for (int64_t i = begin; i < end; ++i) {
      const float* prow = p + i * C;
      const float* lprow = lp + i * C;
      const float* grow = G + (i - i0) * Mp;
      std::fill(tacc.begin(), tacc.end(), Vec(0.f));
      for (int64_t j = 0; j < Mp; j += kLanes) {
        const Vec g = Vec::loadu(grow + j);
        for (int64_t c = 0; c < C; ++c) {
          const Vec lg = log2_sum<kTiny>(Vec(prow[c]) + Vec::loadu(kT + c * Mp + j), Vec(w[c]));
          tacc[c] = at::vec::fmadd(g, Vec(lprow[c]) - lg, tacc[c]);
          if (ut) {
            Vec u = Vec::loadu(ut + c * Mp + j);
            at::vec::fmadd(g, Vec::loadu(lkT + c * Mp + j) - lg, u).store(ut + c * Mp + j);
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) T[i * C + c] = sum_lanes(tacc[c]);
    }
  });
  if (U) add_task_sums(U, u_local, tasks, C * Mp);
}

// pairwise_jsd: given G [B, N, Mp] (zero-padded), T [B, N, C] and, if keys_too, U [B, C, Mp].
std::vector<at::Tensor> jsd_class_grads(const at::Tensor& p, const at::Tensor& lp, const at::Tensor& kT,
                                        const at::Tensor& lkT, const at::Tensor& w, const at::Tensor& G,
                                        bool keys_too, int64_t buffer_budget) {
  const int64_t B = p.size(0), N = p.size(1), C = p.size(2), Mp = kT.size(2);
  at::Tensor T = at::zeros({B, N, C}, p.options());
  at::Tensor U = keys_too ? at::zeros({B, C, Mp}, p.options()) : at::Tensor();
  const auto terms = has_tiny(p) || has_tiny(kT) ? class_terms<true> : class_terms<false>;
  for (int64_t b = 0; b < B; ++b)
    terms(p.data_ptr<float>() + b * N * C, lp.data_ptr<float>() + b * N * C,
                kT.data_ptr<float>() + b * C * Mp, lkT.data_ptr<float>() + b * C * Mp, w.data_ptr<float>() + b * C,
                G.data_ptr<float>() + b * N * Mp, 0, N, C, Mp, T.data_ptr<float>() + b * N * C,
                keys_too ? U.data_ptr<float>() + b * C * Mp : nullptr, buffer_budget);
  return {T, keys_too ? U : at::zeros({0}, p.options())};
}

// Row transforms of the attention backward. kind 0 (jsd_attention): w = softmax_j(-J_ij / tau),
// G = -w (g.v - Delta) / tau, 1 / tau clamped to the float32 range as in the forward. kind 1
// (cdam_attention): A = expm1(alpha X) / expm1(alpha) in the forward's form (kernels/common.py:
// cdam_transform) with t = 1 - X = (J - lo) / span taken directly, evaluated in double as
// A = exp(-alpha t) expm1(-alpha X) / expm1(-alpha), which is accurate for every alpha (so the
// float32 forward's small-alpha series is not needed here) and exactly 1 at t = 0 and on constant
// rows (span < kConstantRowEps, X := 1); dA/dX = -dA/dt = alpha exp(-alpha t) / (1 - exp(-alpha)).
// G from docs/autograd.md section 2: ties at the row max / min share its gradient evenly;
// constant rows get none.
struct RowStats {
  float hi, lo, span;
  bool flat;
};

RowStats row_stats(const float* jr, int64_t M) {
  float hi = -std::numeric_limits<float>::infinity(), lo = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < M; ++j) {
    hi = std::max(hi, jr[j]);
    lo = std::min(lo, jr[j]);
  }
  return {hi, lo, hi - lo, hi - lo < cdam::kConstantRowEps};
}

float neg_inv_tau(double tau) { return float(std::max(-1.0 / tau, -double(cdam::kFloat32Max))); }

void forward_row(int kind, double param, const float* jr, float* wr, int64_t M) {
  if (kind == 0) {  // vectorised with the forward's inlined exp (the scalar std::exp cost ~5 % here)
    const float scale = neg_inv_tau(param);
    const int64_t Mv = M - M % kLanes;
    Vec vlo(std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < Mv; j += kLanes) vlo = at::vec::minimum(vlo, Vec::loadu(jr + j));
    float lo = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, vlo);
    for (int64_t j = Mv; j < M; ++j) lo = std::min(lo, jr[j]);
    Vec vsum(0.f);
    for (int64_t j = 0; j < Mv; j += kLanes) {
      const Vec e = cdam::exp_nonpos((Vec::loadu(jr + j) - Vec(lo)) * Vec(scale));
      e.store(wr + j);
      vsum = vsum + e;
    }
    float sum = sum_lanes(vsum);
    for (int64_t j = Mv; j < M; ++j) sum += (wr[j] = std::exp((jr[j] - lo) * scale));
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < Mv; j += kLanes) (Vec::loadu(wr + j) * Vec(inv)).store(wr + j);
    for (int64_t j = Mv; j < M; ++j) wr[j] *= inv;
    return;
  }
  const RowStats st = row_stats(jr, M);
  const double alpha = param, denom = std::expm1(-alpha), inv = st.flat ? 0.0 : 1.0 / st.span;
  // the same double formula in Vectorized<double> (Sleef's 1-ulp exp / expm1, 4 lanes; the
  // scalar libm calls cost ~10 % of this backward)
  const VecD vlo(st.lo), vhi(st.hi), vinv(inv), vneg_alpha(-alpha), vdenom(denom), zero(0.0);
  int64_t j = 0;
  for (; j + kLanesD <= M; j += kLanesD) {
    double buf[kLanesD];
    for (int64_t k = 0; k < kLanesD; ++k) buf[k] = jr[j + k];
    const VecD jd = VecD::loadu(buf);
    const VecD t = at::vec::maximum(zero, (jd - vlo) * vinv);
    const VecD x = st.flat ? VecD(1.0) : (vhi - jd) * vinv;
    at::vec::maximum(zero, (vneg_alpha * t).exp() * (vneg_alpha * x).expm1() / vdenom).store(buf);
    for (int64_t k = 0; k < kLanesD; ++k) wr[j + k] = float(buf[k]);
  }
  for (; j < M; ++j) {
    const double t = std::max(0.0, double(jr[j] - st.lo) * inv);
    const double x = st.flat ? 1.0 : double(st.hi - jr[j]) * inv;
    wr[j] = float(std::max(0.0, std::exp(-alpha * t) * std::expm1(-alpha * x) / denom));
  }
}

void gradient_row(int kind, double param, const float* jr, float* wr, const float* gr, int64_t M) {
  double delta = 0.0;
  if (kind == 0) {
    const float scale = neg_inv_tau(param);
    for (int64_t j = 0; j < M; ++j) delta += double(wr[j]) * gr[j];
    for (int64_t j = 0; j < M; ++j) wr[j] = wr[j] * (gr[j] - float(delta)) * scale;
    return;
  }
  const RowStats st = row_stats(jr, M);
  if (st.flat) {
    std::fill(wr, wr + M, 0.f);
    return;
  }
  // dA/dX = scale exp(-alpha t), scale = alpha / (1 - exp(-alpha)), times 2^-e with
  // e = max(0, ilogb(alpha)) (the caller multiplies the gradient back by 2^e: constants.py
  // gradient_exponent): G then stays in the float32 range for every alpha, so huge alpha gives
  // +-inf gradients where they are genuinely beyond it, never inf - inf = NaN in the class sums.
  const double alpha = param, inv = 1.0 / st.span;
  const double scale = std::ldexp(alpha / -std::expm1(-alpha), -std::max(0, std::ilogb(alpha)));
  // t = 1 - X = (J - lo) / span, exactly 0 / 1 at the row min / max
  auto t_of = [&](float jv) {
    return jv == st.lo ? 0.0 : jv == st.hi ? 1.0 : std::min(1.0, std::max(0.0, double(jv - st.lo) * inv));
  };
  // At a min / max position the direct term -gX and the position's own share of the sum through
  // lo / hi (both ~ alpha / span) cancel analytically for a single extremum: the sums are split
  // into the extremum positions' gX (their mean taken first, minus gX) and the rest.
  double ext_hi = 0.0, ext_lo = 0.0, rest_hi = 0.0, rest_lo = 0.0;
  int64_t n_hi = 0, n_lo = 0;
  for (int64_t j = 0; j < M; ++j) {
    const double t = t_of(jr[j]), gx = double(gr[j]) * scale * std::exp(-alpha * t);
    if (jr[j] == st.hi) { ext_hi += gx; ++n_hi; } else rest_hi += gx * t;
    if (jr[j] == st.lo) { ext_lo += gx; ++n_lo; } else rest_lo += gx * (1.0 - t);
  }
  const double mean_hi = ext_hi / double(n_hi), mean_lo = ext_lo / double(n_lo);
  const double add_hi = rest_hi / double(n_hi), add_lo = rest_lo / double(n_lo);
  for (int64_t j = 0; j < M; ++j) {
    const double gx = double(gr[j]) * scale * std::exp(-alpha * t_of(jr[j]));
    const double G = jr[j] == st.lo ? (mean_lo - gx) + add_lo : jr[j] == st.hi ? (mean_hi - gx) + add_hi : -gx;
    wr[j] = float(G * inv);
  }
}

// The attention backward (kind as above, param = tau or alpha) in bounded row chunks; returns
// T [B, N, C], U [B, C, Mp], gv [B, M, D] (float32). need_p false: gv alone (T and U stay zero):
// each row's weights, no g . v products, score gradients or class sums. Each row's C x Mp logarithms are taken once
// into a per-thread buffer (C Mp floats, cache-resident at paper sizes) that serves both its J
// row and, once the row's score gradient is known, its class sums: one log per (i, j, c).
std::vector<at::Tensor> attention_backward(const at::Tensor& p, const at::Tensor& lp, const at::Tensor& rp,
                                           const at::Tensor& kT, const at::Tensor& lkT, const at::Tensor& rk,
                                           const at::Tensor& cw, const at::Tensor& v, const at::Tensor& g, int64_t kind,
                                           double param, bool self, int64_t buffer_budget, bool need_p) {
  const int64_t B = p.size(0), N = p.size(1), C = p.size(2), Mp = kT.size(2), M = v.size(1);
  TORCH_CHECK(Mp > 0 && Mp % (2 * kLanes) == 0, "attention_backward: keys must be padded to a positive multiple of ",
              2 * kLanes);
  at::Tensor T = at::zeros({B, N, C}, p.options());
  at::Tensor U = at::zeros({B, C, Mp}, p.options());
  at::Tensor gv = at::zeros({B, M, v.size(2)}, p.options());
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, kChunkFloats / Mp));
  at::Tensor W = at::zeros({R, Mp}, p.options()), GV = at::empty({R, M}, p.options());
  // per task: its key-side sums (only with need_p) and its row's logs (C x Mp each), and three Mp rows
  const int64_t per_task = ((need_p ? 2 : 1) * C + 3) * Mp * int64_t(sizeof(float));
  const int64_t tasks = task_count(buffer_budget, per_task, std::min(N, R));
  std::vector<float> u_local(need_p ? tasks * C * Mp : 0);
  g_buffer_bytes = tasks * per_task;
  float* w = W.data_ptr<float>();
  const auto logs_of_row = has_tiny(p) || has_tiny(kT) ? row_logs<true> : row_logs<false>;
  for (int64_t b = 0; b < B; ++b) {
    const float* pb = p.data_ptr<float>() + b * N * C;
    const float* lpb = lp.data_ptr<float>() + b * N * C;
    const float* kb = kT.data_ptr<float>() + b * C * Mp;
    const float* lkb = lkT.data_ptr<float>() + b * C * Mp;
    const float* rkb = rk.data_ptr<float>() + b * Mp;
    const float* wb = cw.data_ptr<float>() + b * C;
    float* Tb = T.data_ptr<float>() + b * N * C;
    std::fill(u_local.begin(), u_local.end(), 0.f);
    for (int64_t i0 = 0; i0 < N; i0 += R) {
      const int64_t nr = std::min(R, N - i0);
      const at::Tensor g_rows = g[b].narrow(0, i0, nr);
      if (need_p) {
        at::Tensor gvr = GV.narrow(0, 0, nr);
        at::mm_out(gvr, g_rows, v[b].t());  // g_i . v_j
      }
      for_each_task(0, nr, std::min(tasks, nr), [&](int64_t task, int64_t begin, int64_t end) {
        float* ut = need_p ? u_local.data() + task * C * Mp : nullptr;
        std::vector<float> logs(C * Mp), jrow(Mp), part(Mp), grow(Mp);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = i0 + r;
          logs_of_row(pb + i * C, kb, wb, C, Mp, logs.data(), jrow.data(), part.data());
          const Vec ri(rp.data_ptr<float>()[b * N + i]);
          for (int64_t j = 0; j < Mp; j += kLanes) {
            const Vec jv = (ri + Vec::loadu(rkb + j) - Vec::loadu(jrow.data() + j)) * Vec(cdam::kHalfLn2);
            at::vec::maximum(jv, Vec(0.f)).store(jrow.data() + j);
          }
          if (self) jrow[i] = 0.f;
          float* wr = w + r * Mp;
          forward_row(int(kind), param, jrow.data(), wr, M);
          if (!need_p) continue;
          std::copy(wr, wr + M, grow.begin());
          gradient_row(int(kind), param, jrow.data(), grow.data(), GV.data_ptr<float>() + r * M, M);
          if (kind == 1)  // J = 0 (the diagonal, identical rows) passes no gradient (opdefs/cdam.py: divergence_grad)
            for (int64_t j = 0; j < M; ++j) grow[j] = jrow[j] == 0.f ? 0.f : grow[j];
          std::fill(grow.begin() + M, grow.end(), 0.f);  // padded keys: no gradient
          row_class_sums(grow.data(), logs.data(), lpb + i * C, lkb, C, Mp, Tb + i * C, ut);
        }
      });
      gv[b].addmm_(W.narrow(0, 0, nr).narrow(1, 0, M).t(), g_rows);
    }
    if (!need_p) continue;
    add_task_sums(U.data_ptr<float>() + b * C * Mp, u_local, tasks, C * Mp);
  }
  return {T, U, gv};
}

// The kernels' log2 (log2v) on a float32 tensor, for the tests (tests/test_cpu_log2.py).
at::Tensor log2_values(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1, "log2_values: x must be a 1-D float32 tensor");
  const at::Tensor xc = at::constant_pad_nd(x.contiguous(), {0, (kLanes - x.numel() % kLanes) % kLanes}, 1.0);
  at::Tensor out = at::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t k = 0; k < xc.numel(); k += kLanes) log2v(Vec::loadu(src + k)).store(dst + k);
  return out.narrow(0, 0, x.numel());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cdam_fast CPU backward kernels (see cdam_fast/backends/cpu_backward.py)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("jsd_class_grads", &jsd_class_grads, "per-class gradient sums of sum_ij G_ij J_ij", py::arg("p"),
        py::arg("lp"), py::arg("kT"), py::arg("lkT"), py::arg("w"), py::arg("G"), py::arg("keys_too"),
        py::arg("buffer_budget") = -1, nogil);
  m.def("attention_backward", &attention_backward,
        "backward of softmax(-J / tau) @ v (kind 0) or cdam_map(p, alpha) @ v (kind 1)", py::arg("p"), py::arg("lp"),
        py::arg("rp"), py::arg("kT"), py::arg("lkT"), py::arg("rk"), py::arg("w"), py::arg("v"), py::arg("g"), py::arg("kind"),
        py::arg("param"), py::arg("self"), py::arg("buffer_budget") = -1, py::arg("need_p") = true, nogil);
  m.def("last_buffer_bytes", &last_buffer_bytes, "bytes of per-task buffers the last backward call allocated");
  m.def("log2_values", &log2_values, "the backward's log2 of max(x, kTinyMass), elementwise (for tests)", py::arg("x"));
}
