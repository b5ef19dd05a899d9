// torch bindings of the CUDA kernels (cdam_cuda_kernels.cu): allocation, dtype preparation
// (float32 distributions, padded 16-bit values) and launches on the current stream. The
// multi-scale preprocessing (grids, distributions, taps) arrives ready from
// cdam_fast/backends/cuda_backend.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "cdam_centring.h"
#include "cdam_cuda.h"

namespace {

namespace cc = cdam_cuda;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cdam_fast CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Distributions [B, n, C] in float32 with their centring weights w [B, C] (shared with the other
// side of the divergence, cdam_centring.h) and row terms, alive as long as this object.
struct DistBuffers {
  at::Tensor p, w, r;
  DistBuffers(const at::Tensor& src, const at::Tensor& weights) : p(src.to(at::kFloat).contiguous()), w(weights) {
    TORCH_CHECK(p.dim() == 3, "distributions must be [B, n, C]");
    TORCH_CHECK(p.size(1) <= INT32_MAX && p.size(2) <= INT32_MAX, "too many rows or classes");
    r = cdam::centred_row_terms(p, w);
  }
  // p against itself: centred on its own mean distribution.
  explicit DistBuffers(const at::Tensor& src) : DistBuffers(src, cdam::centring_weights(src, nullptr)) {}
  cc::Dist view() const {
    cc::Dist d;
    d.p = p.data_ptr<float>();
    d.r = r.data_ptr<float>();
    d.w = w.data_ptr<float>();
    d.n = int(p.size(1));
    return d;
  }
  int B() const { return int(p.size(0)); }
  int C() const { return int(p.size(2)); }
};

// v [B, M, D] padded with zeros to [B, Mp, Dp] in the tensor-core input type.
struct ValueBuffers {
  at::Tensor hi, lo;
  cc::ValuesView view;
  explicit ValueBuffers(const at::Tensor& v) {
    const int64_t B = v.size(0), M = v.size(1), D = v.size(2);
    view.Mp = int(round_up(M, 32));
    view.Dp = int(round_up(D, 16));
    view.D = int(D);
    const auto st = v.scalar_type();
    const auto type = st == at::kHalf ? at::kHalf : at::kBFloat16;
    hi = at::zeros({B, view.Mp, view.Dp}, v.options().dtype(type));
    at::Tensor hi_part = hi.narrow(1, 0, M).narrow(2, 0, D);
    hi_part.copy_(v);
    view.hi = hi.data_ptr();
    if (st == at::kFloat) {  // fp32: bf16 hi + bf16 remainder
      lo = at::zeros_like(hi);
      lo.narrow(1, 0, M).narrow(2, 0, D).copy_(v - hi_part.to(at::kFloat));
      view.lo = lo.data_ptr();
      view.kind = cc::ValueKind::kSplitBf16;
    } else {
      TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, "v must be float16, bfloat16 or float32");
      view.kind = st == at::kHalf ? cc::ValueKind::kHalf : cc::ValueKind::kBf16;
    }
  }
};

at::Tensor jsd_of(const DistBuffers& a, const DistBuffers* b) {
  const DistBuffers& keys = b ? *b : a;
  at::Tensor J = at::empty({a.p.size(0), a.p.size(1), keys.p.size(1)}, a.p.options());
  check(cc::pairwise_jsd(a.view(), keys.view(), a.B(), a.C(), b == nullptr, J.data_ptr<float>(), stream()), "pairwise_jsd");
  return J;
}

// Row ranges [B, n] of a stored [B, n, m] divergence matrix.
std::pair<at::Tensor, at::Tensor> ranges_of(const at::Tensor& J) {
  at::Tensor hi = at::empty({J.size(0), J.size(1)}, J.options()), lo = at::empty_like(hi);
  check(cc::row_range(J.data_ptr<float>(), J.size(0) * J.size(1), int(J.size(2)), hi.data_ptr<float>(),
                      lo.data_ptr<float>(), stream()),
        "row_range");
  return {hi, lo};
}

// Row ranges of the self divergences of `a`, recomputed (nothing N x N stored).
std::pair<at::Tensor, at::Tensor> recomputed_ranges(const DistBuffers& a) {
  at::Tensor hi = at::empty({a.p.size(0), a.p.size(1)}, a.p.options()), lo = at::empty_like(hi);
  check(cc::fill_row_range(hi.data_ptr<float>(), lo.data_ptr<float>(), hi.numel(), stream()), "fill_row_range");
  check(cc::jsd_row_range(a.view(), a.B(), a.C(), hi.data_ptr<float>(), lo.data_ptr<float>(), stream()), "jsd_row_range");
  return {hi, lo};
}

void guard_inputs(const at::Tensor& t) { TORCH_CHECK(t.is_cuda(), "the cuda backend takes CUDA tensors"); }

// ----------------------------------------------------------------------------- public ops

at::Tensor pairwise_jsd(const at::Tensor& p, const c10::optional<at::Tensor>& q) {
  guard_inputs(p);
  const c10::cuda::CUDAGuard device(p.device());
  if (!q.has_value()) return jsd_of(DistBuffers(p), nullptr);
  const at::Tensor w = cdam::centring_weights(p, &*q);
  const DistBuffers a(p, w), b(*q, w);
  return jsd_of(a, &b);
}

at::Tensor cdam_map(const at::Tensor& p, double alpha) {
  guard_inputs(p);
  const c10::cuda::CUDAGuard device(p.device());
  const DistBuffers a(p);
  at::Tensor J = jsd_of(a, nullptr);
  auto [hi, lo] = ranges_of(J);
  check(cc::cdam_transform(J.data_ptr<float>(), J.size(0) * J.size(1), int(J.size(2)), hi.data_ptr<float>(),
                           lo.data_ptr<float>(), float(alpha), stream()),
        "cdam_transform");
  return J;
}

at::Tensor cdam_attention(const at::Tensor& p, const at::Tensor& v, double alpha, bool materialize) {
  guard_inputs(p);
  const c10::cuda::CUDAGuard device(p.device());
  const DistBuffers a(p);
  const ValueBuffers vals(v);
  at::Tensor J;
  std::pair<at::Tensor, at::Tensor> range;
  if (materialize) {
    J = jsd_of(a, nullptr);
    range = ranges_of(J);
  } else {
    range = recomputed_ranges(a);
  }
  at::Tensor out = at::empty({v.size(0), v.size(1), v.size(2)}, p.options().dtype(at::kFloat));
  check(cc::cdam_attention(a.view(), materialize ? J.data_ptr<float>() : nullptr, range.first.data_ptr<float>(),
                           range.second.data_ptr<float>(), a.B(), a.C(), float(alpha), vals.view, out.data_ptr<float>(),
                           stream()),
        "cdam_attention");
  return out;
}

// Everything one multi-scale call keeps alive while its kernels are queued.
struct ScaleBuffers {
  std::vector<DistBuffers> dists;
  std::vector<at::Tensor> keep;
  cc::ScaleSet set;
};

ScaleBuffers prepare_scales(const std::vector<at::Tensor>& ps, const std::vector<c10::optional<at::Tensor>>& idx,
                            const std::vector<c10::optional<at::Tensor>>& wts, int64_t N, bool materialize) {
  TORCH_CHECK(!ps.empty() && ps.size() <= size_t(cc::kMaxScales), "between 1 and ", cc::kMaxScales, " scales");
  TORCH_CHECK(ps.size() == idx.size() && ps.size() == wts.size(), "one distribution and one tap set per scale");
  ScaleBuffers out;
  out.dists.reserve(ps.size());
  out.set.count = int(ps.size());
  for (size_t s = 0; s < ps.size(); ++s) {
    out.dists.emplace_back(ps[s]);
    const DistBuffers& d = out.dists.back();
    cc::ScaleView& sv = out.set.s[s];
    sv.ns = int(d.p.size(1));
    sv.dist = d.view();
    const bool upsampled = idx[s].has_value();
    if (upsampled) {
      at::Tensor i = idx[s]->to(at::kInt).contiguous(), w = wts[s]->to(at::kFloat).contiguous();
      out.keep.push_back(i);
      out.keep.push_back(w);
      sv.idx = i.data_ptr<int>();
      sv.wts = w.data_ptr<float>();
    }
    // Upsampled grids are always stored (they are smaller than N x N); the full grid only
    // when materialising.
    std::pair<at::Tensor, at::Tensor> range;
    if (upsampled || materialize) {
      at::Tensor J = jsd_of(d, nullptr);
      out.keep.push_back(J);
      sv.J = J.data_ptr<float>();
      if (upsampled) {
        range.first = at::empty({d.p.size(0), N}, d.p.options());
        range.second = at::empty_like(range.first);
        check(cc::upsampled_row_range(sv, d.B(), int(N), range.first.data_ptr<float>(), range.second.data_ptr<float>(),
                                      stream()),
              "upsampled_row_range");
      } else {
        range = ranges_of(J);
      }
    } else {
      range = recomputed_ranges(d);
    }
    out.keep.push_back(range.first);
    out.keep.push_back(range.second);
    sv.hi = range.first.data_ptr<float>();
    sv.lo = range.second.data_ptr<float>();
  }
  return out;
}

at::Tensor multiscale_cdam_map(const std::vector<at::Tensor>& ps, const std::vector<c10::optional<at::Tensor>>& idx,
                               const std::vector<c10::optional<at::Tensor>>& wts, int64_t N, double alpha) {
  guard_inputs(ps.at(0));
  const c10::cuda::CUDAGuard device(ps[0].device());
  const ScaleBuffers scales = prepare_scales(ps, idx, wts, N, /*materialize=*/true);
  at::Tensor out = at::empty({ps[0].size(0), N, N}, ps[0].options().dtype(at::kFloat));
  check(cc::multiscale_map(scales.set, int(ps[0].size(0)), int(N), float(alpha), out.data_ptr<float>(), stream()),
        "multiscale_map");
  return out;
}

at::Tensor multiscale_cdam_attention(const std::vector<at::Tensor>& ps, const std::vector<c10::optional<at::Tensor>>& idx,
                                     const std::vector<c10::optional<at::Tensor>>& wts, const at::Tensor& v, double alpha,
                                     bool materialize) {
  guard_inputs(v);
  const c10::cuda::CUDAGuard device(v.device());
  const int64_t N = v.size(1);
  const ScaleBuffers scales = prepare_scales(ps, idx, wts, N, materialize);
  const ValueBuffers vals(v);
  at::Tensor out = at::empty({v.size(0), N, v.size(2)}, v.options().dtype(at::kFloat));
  check(cc::multiscale_attention(scales.set, int(v.size(0)), int(ps[0].size(2)), int(N), float(alpha), vals.view,
                                 out.data_ptr<float>(), stream()),
        "multiscale_attention");
  return out;
}

at::Tensor jsd_attention(const at::Tensor& p, const at::Tensor& v, double tau, const c10::optional<at::Tensor>& q) {
  guard_inputs(p);
  const c10::cuda::CUDAGuard device(p.device());
  const at::Tensor w = cdam::centring_weights(p, q.has_value() ? &*q : nullptr);
  const DistBuffers a(p, w);
  c10::optional<DistBuffers> b;
  if (q.has_value()) b.emplace(*q, w);
  const ValueBuffers vals(v);
  at::Tensor out = at::empty({p.size(0), p.size(1), v.size(2)}, p.options().dtype(at::kFloat));
  check(cc::jsd_attention(a.view(), b ? b->view() : a.view(), !q.has_value(), a.B(), a.C(), float(tau), vals.view,
                          out.data_ptr<float>(), stream()),
        "jsd_attention");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cdam_fast CUDA kernels (float32 maps; float32 attention outputs, cast by cdam_fast/backends/cuda_backend.py)";
  m.def("pairwise_jsd", &pairwise_jsd, py::arg("p"), py::arg("q") = py::none());
  m.def("cdam_map", &cdam_map, py::arg("p"), py::arg("alpha"));
  m.def("cdam_attention", &cdam_attention, py::arg("p"), py::arg("v"), py::arg("alpha"), py::arg("materialize"));
  m.def("multiscale_cdam_map", &multiscale_cdam_map, py::arg("ps"), py::arg("idx"), py::arg("wts"), py::arg("n"),
        py::arg("alpha"));
  m.def("multiscale_cdam_attention", &multiscale_cdam_attention, py::arg("ps"), py::arg("idx"), py::arg("wts"),
        py::arg("v"), py::arg("alpha"), py::arg("materialize"));
  m.def("jsd_attention", &jsd_attention, py::arg("p"), py::arg("v"), py::arg("tau"), py::arg("q") = py::none());
}
