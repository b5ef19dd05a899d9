"""cdam_map and cdam_attention: the single-scale CDAM map A = minmax_expm1(J(p, p), alpha)
(spec 2.3-2.6) and A @ v. Their specifications, pure-torch references (whole-map, and in
bounded blocks of query rows for the memory policy) and backward formulas (docs/autograd.md,
section 2). The min-max / expm1 transform and its adjoint also serve the multi-scale ops."""
from __future__ import annotations

import math

import torch

from ..constants import CONSTANT_ROW_EPS
from . import pairwise_jsd as jsd
from .spec import SCHEMA_TAIL, OpSpec, StatsFormat, compute_dtype, pair_shape, value_shape
from .vjp import product_vjp, scaled_vjp


def minmax_expm1(j: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spec 2.5-2.6: X = row min-max of (1 - J), A = expm1(alpha X) / expm1(alpha).

    Rows whose range is below CONSTANT_ROW_EPS get X = 1 (so A = 1) instead of 0/0. Evaluated
    as exp(-alpha t) * expm1(-alpha X) / expm1(-alpha) with X = (hi - J) / span and
    t = 1 - X = (J - lo) / span both taken directly (1 - X would round): the same value with
    every factor <= 1 and exponents <= 0, so nothing overflows for any alpha in the float
    range, the row minimum of J maps to exactly 1 (t = 0, X = span / span = 1), and expm1 keeps
    small alpha and small A accurate. NaN in J gives NaN rows.
    """
    alpha = min(float(alpha), torch.finfo(j.dtype).max)
    hi = j.amax(-1, keepdim=True)
    lo = j.amin(-1, keepdim=True)
    span = hi - lo
    flat = span < CONSTANT_ROW_EPS  # False for NaN: NaN rows stay NaN
    safe = torch.where(flat, torch.ones_like(span), span)
    x = torch.where(flat, torch.ones_like(j), (hi - j) / safe)
    t = torch.where(flat, torch.zeros_like(j), (j - lo) / safe)
    return torch.exp(-alpha * t) * torch.expm1(-alpha * x) / math.expm1(-alpha)


def cdam_map(p: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    return minmax_expm1(jsd.pairwise_jsd(p), alpha)


def cdam_attention(p: torch.Tensor, v: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    a = cdam_map(p, alpha)
    return (a @ v.to(a.dtype)).to(v.dtype)


# The reference under the memory policy (what the reference backend runs).

# Values of (query row, key) size a block holds at once: J, X, the map and the transform's
# temporaries, plus the four gathered tap rows of a small grid.
TEMPS_PER_PAIR = 12


def block_rows(N: int, itemsize: int, mode: str, memory_budget: int) -> int:
    """Query rows per block for one batch element (N: all of them)."""
    if mode == "materialize":
        return N
    return max(1, min(N, memory_budget // max(1, TEMPS_PER_PAIR * N * itemsize)))


def self_rows(p: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """Rows i0:i1 of J(p, p) for one batch element p [N, C], diagonal exactly 0 as in the reference."""
    j = jsd.pairwise_jsd(p[None, i0:i1], p[None])[0]
    rows = torch.arange(i0, i1, device=p.device)
    j[rows - i0, rows] = 0.0
    return j


def cdam_attention_bounded(p, v, alpha, mode, memory_budget):
    """cdam_attention under the memory policy: bounded blocks of query rows (every CDAM transform
    is row-local) unless the whole map fits (or mode is "materialize")."""
    B, N, _ = p.shape
    dt = compute_dtype(p)
    rows = block_rows(N, dt.itemsize, mode, memory_budget)
    if rows >= N:
        return cdam_attention(p, v, alpha)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for b in range(B):
        vb = v[b].to(dt)
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            a = minmax_expm1(self_rows(p[b], i0, i1), alpha)
            out[b, i0:i1] = (a @ vb).to(v.dtype)
    return out


# Backward (docs/autograd.md, section 2).

def _glue_rows(M: int) -> int:
    """Rows of an [rows, M] block of the min-max / expm1 adjoint: its ~TEMPS_PER_PAIR float64
    temporaries stay within the reference's chunk size (jsd._CHUNK_ELEMENTS values each)."""
    return max(1, jsd._CHUNK_ELEMENTS // (TEMPS_PER_PAIR * max(1, M)))


def _minmax_expm1_vjp_rows(j: torch.Tensor, ga: torch.Tensor, alpha: float) -> torch.Tensor:
    """minmax_expm1_vjp of a block of whole rows (j, ga [..., M], float64)."""
    hi = j.amax(-1, keepdim=True)
    lo = j.amin(-1, keepdim=True)
    span = hi - lo
    flat = span < CONSTANT_ROW_EPS
    inv = torch.where(flat, torch.zeros_like(span), 1.0 / torch.where(flat, torch.ones_like(span), span))
    at_hi = (j == hi) & ~flat
    at_lo = (j == lo) & ~flat
    # t = 1 - X = (J - lo) / span, taken exactly 0 / 1 at the row min / max, X = 1 - t
    t = torch.where(at_lo, 0.0, torch.where(at_hi, 1.0, ((j - lo) * inv).clamp(0.0, 1.0)))
    x = 1.0 - t
    # dA/dX = alpha exp(alpha X) / expm1(alpha) = alpha exp(-alpha t) / (1 - exp(-alpha)): no overflow
    gx = torch.where(flat, 0.0, ga * (alpha / -math.expm1(-alpha)) * torch.exp(-alpha * t))
    # X_ij = (hi - J_ij) / span: dX/dJ_ij = -1/span, dX/dhi = t/span, dX/dlo = X/span. At a min /
    # max position the direct term -gX and the position's own share of the sum through lo / hi
    # are of size alpha / span and cancel analytically for a single extremum: summing them as
    # separate terms loses everything else (and gives inf - inf = NaN once they overflow), so
    # the sum is split into the extremum positions' mean gX, taken first, and the rest.
    n_hi = at_hi.sum(-1, keepdim=True).clamp_min(1)
    n_lo = at_lo.sum(-1, keepdim=True).clamp_min(1)
    zero = torch.zeros_like(gx)
    at_lo_g = (torch.where(at_lo, gx, zero).sum(-1, keepdim=True) / n_lo - gx
               + torch.where(at_lo, zero, gx * x).sum(-1, keepdim=True) / n_lo)
    at_hi_g = (torch.where(at_hi, gx, zero).sum(-1, keepdim=True) / n_hi - gx
               + torch.where(at_hi, zero, gx * t).sum(-1, keepdim=True) / n_hi)
    return torch.where(at_lo, at_lo_g, torch.where(at_hi, at_hi_g, -gx)) * inv


def _rowwise(j: torch.Tensor, ga: torch.Tensor, alpha: float, zero_at_j0: bool) -> torch.Tensor:
    """The adjoint block of rows by block of rows (it is row-local: each row's max / min / ties)
    into one float64 output, so the temporaries are those of one block (_glue_rows), never of the
    whole [..., N, M] map (nor a copy of a broadcast ga, such as the expanded ones of .sum());
    each row's result is the whole-map evaluation's, bit for bit."""
    shape = torch.broadcast_shapes(j.shape, ga.shape)
    out = torch.empty(shape, dtype=torch.float64, device=j.device)
    rows_by_m = (shape[-2] if len(shape) > 1 else 1, shape[-1])
    j, ga, o = (t.expand(shape).reshape(-1, *rows_by_m) for t in (j, ga, out))  # views for [B, N, M]
    rows = _glue_rows(shape[-1])
    for b in range(o.shape[0]):
        for i in range(0, o.shape[1], rows):
            jb = j[b, i:i + rows].double()
            gb = _minmax_expm1_vjp_rows(jb, ga[b, i:i + rows].double(), alpha)
            if zero_at_j0:
                gb.masked_fill_(jb == 0, 0.0)
            o[b, i:i + rows] = gb
    return out


def minmax_expm1_vjp(j: torch.Tensor, ga: torch.Tensor, alpha: float) -> torch.Tensor:
    """Gradient with respect to J of sum_ij ga_ij A_ij, A = minmax_expm1(J, alpha), in float64.

    The row max and min pass their gradient to their positions, split evenly between ties (as
    torch.amax / amin do); rows that are constant (span < CONSTANT_ROW_EPS, X := 1) get zero.
    Evaluated in float64 whatever j's dtype (an N x N map, cheap next to the divergence): for
    huge alpha its entries can lie beyond the float32 range. Pass it on through scaled_vjp.
    Memory: the float64 output plus one bounded block of rows' temporaries (_rowwise).
    """
    return _rowwise(j, ga, alpha, zero_at_j0=False)


def divergence_grad(j: torch.Tensor, ga: torch.Tensor, alpha: float) -> torch.Tensor:
    """G = dL/dJ of the min-max / expm1 map (minmax_expm1_vjp, float64), zero where J = 0: the
    diagonal, identical rows, or rows so close that J rounds to 0. There the divergence is at its
    minimum, its exact gradient in p is 0, and G may be of size alpha / span (a tie with the row
    minimum): the fused kernels' approximate logs would turn G times a rounding error into
    gradients of size alpha * eps. The same rule everywhere keeps the backends comparable."""
    return _rowwise(j, ga, alpha, zero_at_j0=True)


def divergence_kernels(kernels):
    """(divergence(p) -> J, divergence_vjp(G, p) -> gp) of `kernels` (a backend: its own
    pairwise_jsd forward, so the row max / min positions are its forward's, and its
    pairwise_jsd backward), or the pure-torch ones for None."""
    if kernels is None:
        return jsd.pairwise_jsd, lambda g, p: jsd.jsd_vjp(p, None, g)[0]
    return (lambda p: kernels.pairwise_jsd(p, None)), (lambda g, p: kernels.pairwise_jsd_backward(g, p, None)[0])


def cdam_map_backward(grad, p, alpha, *, needs=None, stats=None, kernels=None):
    """(gp,): a composite over the divergence (kernels: see divergence_kernels)."""
    divergence, divergence_vjp = divergence_kernels(kernels)
    dt = compute_dtype(p, grad)
    gj = divergence_grad(divergence(p.to(dt)).to(dt), grad, alpha)  # J is not kept past this
    return (scaled_vjp(lambda g: divergence_vjp(g, p), gj, dt),)


def cdam_attention_backward(grad, p, v, alpha, mode=None, memory_budget=None, *, needs=None, stats=None,
                            kernels=None):
    """(gp, gv); gp None when needs says only v's gradient is wanted (then gv = A^T g alone).
    Follows the reference forward's memory policy (block_rows; mode None: the whole map): when
    the forward evaluated bounded blocks of query rows, so does this, and its extra memory is
    O(rows N) per block plus O(N (C + D)); else the whole-map formulas. (The forward's row
    statistics do not apply: J's rows are recomputed.)"""
    need_p = needs is None or needs[0]
    p = p.to(compute_dtype(p, v, grad))  # as the forward's Call promoted it: its blocks, its J's dtype
    if mode is not None:
        rows = block_rows(p.shape[1], p.dtype.itemsize, mode, memory_budget)
        if rows < p.shape[1]:
            return _cdam_attention_backward_rows(grad, p, v, alpha, rows, need_p)
    j = jsd.pairwise_jsd(p.to(compute_dtype(p, v, grad)))
    ga, gv = product_vjp(minmax_expm1(j, alpha), v, grad, need_p)
    if not need_p:
        return None, gv
    return scaled_vjp(lambda g: jsd.jsd_vjp(p, None, g)[0], divergence_grad(j, ga, alpha), j.dtype), gv


def _cdam_attention_backward_rows(grad, p, v, alpha, rows: int, need_p: bool = True):
    """The backward one block of `rows` query rows at a time, with the forward's blocks: J's rows
    are cdam_attention_bounded's (self_rows of the promoted p, same blocks, so the row max / min and
    their ties are the forward's bit for bit; diagonal 0). Per block: A's rows, ga = g v^T,
    gv += A^T g, G = divergence_grad, and the divergence's vector-Jacobian product of those rows
    against all keys (q given: the row side and the key side both land in gp)."""
    dt = compute_dtype(p, v, grad)
    B, N, _ = p.shape
    gp = torch.zeros(p.shape, dtype=torch.float64, device=p.device) if need_p else None
    gv = torch.zeros(v.shape, dtype=dt, device=v.device)
    for b in range(B):
        vb, gb, pb = v[b].to(dt), grad[b].to(dt), p[b:b + 1]
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            j = self_rows(p[b], i0, i1)
            ga, gv_rows = product_vjp(minmax_expm1(j, alpha).to(dt), vb, gb[i0:i1], need_p)
            gv[b] += gv_rows
            if not need_p:
                continue
            g_rows, g_keys = scaled_vjp(lambda g: jsd.jsd_vjp(pb[:, i0:i1], pb, g),
                                        divergence_grad(j, ga, alpha)[None], dt)
            gp[b, i0:i1] += g_rows[0]
            gp[b] += g_keys[0]
    return gp, gv


def _row_extremes_shape(call):
    """cdam_attention: per row the max and min of J and how many keys attain each (ties share the
    gradient), [4, B, N] in that order (the counts as floats)."""
    return (4, call.batch, call.tokens())


#: cdam_attention's training statistics: per row the max and min of J and how many keys attain
#: each (ties share the gradient), [4, B, N] in that order (the counts as floats)
ROW_EXTREMES = StatsFormat("row_extremes", _row_extremes_shape, "row max, min of J and their tie counts")

SPECS = (
    OpSpec("cdam_map", ("p", "alpha"), "(Tensor p, float alpha, " + SCHEMA_TAIL, ("p",), (), pair_shape, True,
           cdam_map, cdam_map_backward, tensor_names=("p",), composite_backward=True),
    OpSpec("cdam_attention", ("p", "v", "alpha", "mode", "memory_budget"),
           "(Tensor p, Tensor v, float alpha, str mode, int memory_budget, " + SCHEMA_TAIL, ("p",), ("v",),
           value_shape, False, cdam_attention, cdam_attention_backward, has_mode=True, tensor_names=("p", "v"),
           bounded=cdam_attention_bounded, stats_format=ROW_EXTREMES),
)
