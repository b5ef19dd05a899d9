"""Baselines the backends are measured against, written from the spec's formulas (docs: spec 2-3).

TEST ORACLE / BENCHMARK ONLY: nothing in the runtime package (cdam_fast without .benchmarks)
imports this module; users never need it.

Two families, both taking the ops' batch-flattened inputs (p [B, N, C], v [B, N, D],
sim [B, C, h, w]):

* ``published_*``: the published implementation's order of operations. One crop at a time
  (batch size 1), the pairwise mixture broadcast to a full [N, N, C] tensor, logs of the
  whole broadcast, J in the working dtype (fp16 on GPU as the reference code runs, fp32 on
  CPU), the row normalisation done as min-max -> softmax(X / 0.1) -> min-max, smaller
  scales upsampled with F.interpolate. It has no guard for constant rows (they give NaN,
  as published). ``dtype=`` overrides the working dtype (tests use it to run fp16 on CPU).
* ``plain_*``: the same maths in its most direct batched form (one broadcast, no chunks,
  float32 or float64), the input for ``compiled()``, i.e. torch.compile of the formula.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# Rows whose divergences span less than this are constant (spec 2.6); the plain form
# follows the package's definition there so that it can be compared with the reference.
CONSTANT_ROW_EPS = 1e-6


def published_dtype(device: torch.device) -> torch.dtype:
    """The reference code runs in fp16 on GPU; fp16 maths on CPU is slow and partly missing."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _map_dtype(working: torch.dtype) -> torch.dtype:
    """Maps come back in float32 like the ops' (float64 when the working dtype is)."""
    return torch.float64 if working == torch.float64 else torch.float32


def _entropy(x: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(x, x).sum(-1)  # xlogy: 0 log 0 = 0 where fp16 underflows to 0


def grid_at_scale(h: int, w: int, s: float) -> tuple[int, int]:
    """int(h*s) x int(w*s) (spec 2.1), at least one cell a side (tiny test grids)."""
    if s == 1.0:
        return h, w
    return max(1, int(h * s)), max(1, int(w * s))


def upsample_pairs(j: torch.Tensor, hs: int, ws: int, h: int, w: int) -> torch.Tensor:
    """[n_s, n_s] pair matrix -> [h*w, h*w]: bilinear along keys, then along queries (spec 2.4)."""
    up = functools.partial(F.interpolate, size=(h, w), mode="bilinear", align_corners=False)
    n = hs * ws
    by_key = up(j.reshape(1, n, hs, ws)).reshape(n, h * w)  # channels = small-grid queries
    by_query = up(by_key.t().reshape(1, h * w, hs, ws)).reshape(h * w, h * w)  # [key, query]
    return by_query.t()


def upsample_pairs_batched(j: torch.Tensor, hs: int, ws: int, h: int, w: int) -> torch.Tensor:
    """upsample_pairs over a leading batch dimension: [B, n_s, n_s] -> [B, N, N]."""
    B, n, _ = j.shape
    up = functools.partial(F.interpolate, size=(h, w), mode="bilinear", align_corners=False)
    by_key = up(j.reshape(B * n, 1, hs, ws)).reshape(B, n, h * w)
    by_query = up(by_key.transpose(1, 2).reshape(B * h * w, 1, hs, ws)).reshape(B, h * w, h * w)
    return by_query.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# The published order of operations (per crop, broadcast, fp16 on GPU)
# ----------------------------------------------------------------------------------------------

def _broadcast_jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p [N, C], q [M, C] -> J [N, M] via the full [N, M, C] mixture tensor."""
    m = (p[:, None, :] + q[None, :, :]) / 2
    return (_entropy(m) - (_entropy(p)[:, None] + _entropy(q)[None, :]) / 2).clamp_min(0)


def _published_normalise(j: torch.Tensor, alpha: float) -> torch.Tensor:
    """Row min-max of 1 - J, softmax(X / (1/alpha)), row min-max again (spec 2.5-2.6)."""
    x = 1 - j
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    x = (x - lo) / (hi - lo)
    a = torch.softmax(x * alpha, dim=-1)
    lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    return (a - lo) / (hi - lo)


def _per_crop(fn, *batched):
    """Run fn on one crop at a time, as the published code does, and stack the results."""
    return torch.stack([fn(*(t[b] for t in batched)) for b in range(batched[0].shape[0])])


def published_pairwise_jsd(p: torch.Tensor, q: torch.Tensor | None = None, *, dtype=None) -> torch.Tensor:
    dt = dtype or published_dtype(p.device)
    q = p if q is None else q
    return _per_crop(lambda a, b: _broadcast_jsd(a.to(dt), b.to(dt)), p, q).to(_map_dtype(dt))


def published_cdam_map(p: torch.Tensor, alpha: float = 10.0, *, dtype=None) -> torch.Tensor:
    dt = dtype or published_dtype(p.device)
    return _per_crop(lambda a: _published_normalise(_broadcast_jsd(a.to(dt), a.to(dt)), alpha), p).to(_map_dtype(dt))


def published_cdam_attention(p: torch.Tensor, v: torch.Tensor, alpha: float = 10.0, *, dtype=None) -> torch.Tensor:
    dt = dtype or published_dtype(p.device)

    def one(pc, vc):
        a = _published_normalise(_broadcast_jsd(pc.to(dt), pc.to(dt)), alpha)
        return a @ vc.to(dt)

    return _per_crop(one, p, v).to(v.dtype)


def _published_multiscale_one(sim: torch.Tensor, scales, tau: float, alpha: float) -> torch.Tensor:
    """sim [C, h, w] of one crop -> the mean of the per-scale maps, [h*w, h*w]."""
    C, h, w = sim.shape
    total = None
    for s in scales:
        hs, ws = grid_at_scale(h, w, s)
        grid = sim[None]
        if (hs, ws) != (h, w):
            grid = F.interpolate(grid, size=(hs, ws), mode="bilinear", align_corners=False)
        p = torch.softmax(grid[0].reshape(C, hs * ws).t() / tau, dim=-1)
        j = _broadcast_jsd(p, p)
        if (hs, ws) != (h, w):
            j = upsample_pairs(j, hs, ws, h, w)
        a = _published_normalise(j, alpha)
        total = a if total is None else total + a
    return total / len(scales)


def published_multiscale_cdam_map(sim, scales, tau: float = 0.1, alpha: float = 10.0, *, dtype=None) -> torch.Tensor:
    dt = dtype or published_dtype(sim.device)
    return _per_crop(lambda s: _published_multiscale_one(s.to(dt), scales, tau, alpha), sim).to(_map_dtype(dt))


def published_multiscale_cdam_attention(sim, v, scales, tau: float = 0.1, alpha: float = 10.0, *,
                                        dtype=None) -> torch.Tensor:
    dt = dtype or published_dtype(sim.device)
    return _per_crop(lambda s, vc: _published_multiscale_one(s.to(dt), scales, tau, alpha) @ vc.to(dt),
                     sim, v).to(v.dtype)


def published_jsd_attention(p, v, tau: float = 0.1, q=None, *, dtype=None) -> torch.Tensor:
    """Not in the paper: the same per-crop broadcast divergence, then softmax(-J / tau) @ v."""
    dt = dtype or published_dtype(p.device)
    q = p if q is None else q
    return _per_crop(lambda a, b, vc: torch.softmax(-_broadcast_jsd(a.to(dt), b.to(dt)) / tau, -1) @ vc.to(dt),
                     p, q, v).to(v.dtype)


# ----------------------------------------------------------------------------------------------
# The plain batched formula (what torch.compile is given)
# ----------------------------------------------------------------------------------------------

def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def plain_pairwise_jsd(p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    dt = _work_dtype(p)
    p = p.to(dt)
    q = p if q is None else q.to(dt)
    m = 0.5 * (p[:, :, None, :] + q[:, None, :, :])  # [B, N, M, C], never chunked
    return (_entropy(m) - 0.5 * (_entropy(p)[:, :, None] + _entropy(q)[:, None, :])).clamp_min(0)


def plain_normalise(j: torch.Tensor, alpha: float) -> torch.Tensor:
    """expm1(alpha X) / expm1(alpha), X the row min-max of 1 - J; constant rows give 1."""
    hi, lo = j.amax(-1, keepdim=True), j.amin(-1, keepdim=True)
    span = hi - lo
    flat = span < CONSTANT_ROW_EPS
    x = torch.where(flat, torch.ones_like(j), (hi - j) / span.clamp_min(CONSTANT_ROW_EPS))
    return torch.expm1(alpha * x) / math.expm1(alpha)


def plain_cdam_map(p: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    return plain_normalise(plain_pairwise_jsd(p), alpha)


def plain_cdam_attention(p: torch.Tensor, v: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    a = plain_cdam_map(p, alpha)
    return (a @ v.to(a.dtype)).to(v.dtype)


def plain_multiscale_cdam_map(sim: torch.Tensor, scales, tau: float = 0.1, alpha: float = 10.0) -> torch.Tensor:
    B, C, h, w = sim.shape
    sim = sim.to(_work_dtype(sim))
    total = None
    for s in scales:
        hs, ws = grid_at_scale(h, w, s)
        grid = sim if (hs, ws) == (h, w) else F.interpolate(sim, size=(hs, ws), mode="bilinear", align_corners=False)
        p = torch.softmax(grid.reshape(B, C, hs * ws).transpose(1, 2) / tau, dim=-1)
        j = plain_pairwise_jsd(p)
        if (hs, ws) != (h, w):
            j = upsample_pairs_batched(j, hs, ws, h, w)
        a = plain_normalise(j, alpha)
        total = a if total is None else total + a
    return total / len(scales)


def plain_multiscale_cdam_attention(sim, v, scales, tau: float = 0.1, alpha: float = 10.0) -> torch.Tensor:
    a = plain_multiscale_cdam_map(sim, scales, tau, alpha)
    return (a @ v.to(a.dtype)).to(v.dtype)


def plain_jsd_attention(p, v, tau: float = 0.1, q=None) -> torch.Tensor:
    j = plain_pairwise_jsd(p, q)
    return (torch.softmax(-j / tau, dim=-1) @ v.to(j.dtype)).to(v.dtype)


PUBLISHED = {
    "pairwise_jsd": published_pairwise_jsd,
    "cdam_map": published_cdam_map,
    "cdam_attention": published_cdam_attention,
    "multiscale_cdam_map": published_multiscale_cdam_map,
    "multiscale_cdam_attention": published_multiscale_cdam_attention,
    "jsd_attention": published_jsd_attention,
}

PLAIN = {
    "pairwise_jsd": plain_pairwise_jsd,
    "cdam_map": plain_cdam_map,
    "cdam_attention": plain_cdam_attention,
    "multiscale_cdam_map": plain_multiscale_cdam_map,
    "multiscale_cdam_attention": plain_multiscale_cdam_attention,
    "jsd_attention": plain_jsd_attention,
}

_compiled: dict = {}
# Every benchmarked shape is its own static specialisation; past dynamo's default limit of 8
# per function it would silently fall back to eager and the "compile" rows would lie.
_RECOMPILE_LIMIT = 1024


def _allow_many_specialisations() -> None:
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):  # the names differ between torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))


def compiled(op: str):
    """torch.compile of the plain formula for `op` (one compiled function per op, shapes static)."""
    if op not in _compiled:
        _allow_many_specialisations()
        _compiled[op] = torch.compile(PLAIN[op], dynamic=False)
    return _compiled[op]
