"""Reference backward passes (pure torch): the vector-Jacobian products of every op.

Derivations are in docs/autograd.md. Like the forward reference, nothing here builds an
[N, N, C] tensor: the divergence's gradient is evaluated in row chunks of bounded size, and so
is the min-max / expm1 adjoint (row-local), so the extra memory is a few N x N maps (what the
reference forward holds anyway) plus O(N C); the cdam_attention backward follows the reference
forward's mode / memory_budget row blocks, O(rows N) per block, when that forward does.
Inputs are batch-flattened (p [B, N, C], v [B, N, D], sim [B, C, h, w]); results are in the
compute dtype (float64 for float64 inputs, else float32), except those of the CDAM ops, which
come back in float64 (their min-max gradient is formed in float64: docs/autograd.md, "Large
alpha"); callers cast to the input dtypes.

The composite backward passes (cdam_map and the multi-scale ops) are written once here and
take the backend's divergence as two callables: ``divergence(p) -> J`` (the backend's own
pairwise_jsd forward, so the row max / min positions are the forward's) and
``divergence_vjp(G, p, q) -> (gp, gq)`` (the backend's pairwise_jsd backward; the N^2 C logs
are all there). The remaining glue is O(N^2) elementwise work on output-sized maps. These
defaults are the pure-torch versions; cpu_backward.py and triton_backward.py bind their own.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import reference as ref
from ..backends import reference_backend as rb
from ..grids import class_distributions, scale_grid


compute_dtype = ref.compute_dtype  # the one dtype rule


def _log_or_zero(x: torch.Tensor) -> torch.Tensor:
    """log x where x > 0, else 0 (those entries are discarded or multiplied by zero)."""
    return torch.where(x > 0, x, torch.ones_like(x)).log()


def jsd_vjp(p: torch.Tensor, q: torch.Tensor | None, g: torch.Tensor):
    """Gradients of sum_ij g_ij J(p_i, q_j) with respect to p and q (q None: q is p, and the
    two sides are summed into the p gradient; the returned q gradient is None).

    dJ_ij / dp_ic = (1/2) log(p_ic / m_ijc), m = (p_i + q_j) / 2, so
    grad p_ic = (1/2) (log p_ic sum_j g_ij - sum_j g_ij log m_ijc), and 0 where p_ic = 0
    (the convention of docs/autograd.md: the one-sided derivative there is -inf).
    """
    dt = compute_dtype(p, q, g)
    pp = p.to(dt)
    qq = pp if q is None else q.to(dt)
    g = g.to(dt)
    if q is None and (g.diagonal(dim1=-2, dim2=-1) != 0).any():  # the diagonal is exactly 0 whatever p is
        g = g.clone()
        g.diagonal(dim1=-2, dim2=-1).zero_()
    B, N, C = pp.shape
    M = qq.shape[1]
    t = torch.zeros(B, N, C, dtype=dt, device=p.device)  # sum_j g_ij log m_ijc
    u = torch.zeros(B, M, C, dtype=dt, device=p.device)  # sum_i g_ij log m_ijc
    rows = max(1, ref._CHUNK_ELEMENTS // max(1, M * C))
    for b in range(B):
        for i in range(0, N, rows):
            # log m = log(p + q) - ln 2: halving a subnormal sum would round it (p = 2^-149, q = 0: m = 0)
            logm = _log_or_zero(pp[b, i:i + rows, None, :] + qq[b, None, :, :]) - math.log(2.0)  # [r, M, C]
            gb = g[b, i:i + rows]
            t[b, i:i + rows] = torch.einsum("rm,rmc->rc", gb, logm)
            u[b] += torch.einsum("rm,rmc->mc", gb, logm)
    gp = torch.where(pp > 0, 0.5 * (_log_or_zero(pp) * g.sum(-1, keepdim=True) - t), 0.0)
    gq = torch.where(qq > 0, 0.5 * (_log_or_zero(qq) * g.sum(-2).unsqueeze(-1) - u), 0.0)
    if q is None:
        return gp + gq, None
    return gp, gq


def _glue_rows(M: int) -> int:
    """Rows of an [rows, M] block of the min-max / expm1 adjoint: its ~TEMPS_PER_PAIR float64
    temporaries stay within the reference's chunk size (ref._CHUNK_ELEMENTS values each)."""
    return max(1, ref._CHUNK_ELEMENTS // (rb.TEMPS_PER_PAIR * max(1, M)))


def _minmax_expm1_vjp_rows(j: torch.Tensor, ga: torch.Tensor, alpha: float) -> torch.Tensor:
    """minmax_expm1_vjp of a block of whole rows (j, ga [..., M], float64)."""
    hi = j.amax(-1, keepdim=True)
    lo = j.amin(-1, keepdim=True)
    span = hi - lo
    flat = span < ref.CONSTANT_ROW_EPS
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
    """Gradient with respect to J of sum_ij ga_ij A_ij, A = ref.minmax_expm1(J, alpha), in float64.

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


# Exponents of the power-of-two scale in scaled_vjp whose 2^e and 2^-e are both finite doubles.
_MIN_SCALE_EXPONENT, _MAX_SCALE_EXPONENT = -1022, 1023


def scaled_vjp(vjp, g: torch.Tensor, dtype: torch.dtype):
    """vjp(g) for a map `vjp` that is linear in g and acts on each batch element (dim 0) alone,
    evaluated in `dtype` on g scaled per batch element by a power of two (max |g| in [1/2, 1)),
    and scaled back in float64 (exact). g may come from minmax_expm1_vjp in float64 with entries
    beyond the float32 range: gradients beyond it then come out +-inf, not NaN (inf - inf), and
    one batch element's scale never flushes another's. Returns vjp's tensor(s) in float64."""
    if dtype == torch.float64:
        return vjp(g.double())
    flat = g.flatten(1)
    m = torch.maximum(flat.amax(1), -flat.amin(1)).double()  # max |g| without an |g| map
    e = torch.where(torch.isfinite(m) & (m > 0), torch.frexp(m)[1], 0)
    # 2^-e and 2^e must both be finite float64 powers of two: an element whose whole gradient is
    # subnormal (e < -1021) would get 2^-e = inf and inf * 0 = NaN. Clamped, its scaled g keeps
    # every bit (a subnormal times a power of two is exact) and the result underflows as it must.
    e = e.clamp(_MIN_SCALE_EXPONENT, _MAX_SCALE_EXPONENT).double()
    # rounded to `dtype` as it is stored: no float64 copy of g (the product is exact)
    scaled = torch.mul(g, torch.exp2(-e).view(-1, *[1] * (g.dim() - 1)), out=torch.empty(g.shape, dtype=dtype,
                                                                                         device=g.device))
    out = vjp(scaled)
    scale = lambda t: t.double() * torch.exp2(e).view(-1, *[1] * (t.dim() - 1))  # noqa: E731
    return tuple(None if t is None else scale(t) for t in out) if isinstance(out, tuple) else scale(out)


def gradient_exponent(alpha: float) -> int:
    """e = max(0, floor(log2 alpha)): the fused cdam_attention backward kernels scale dA/dX, and
    so the score gradient G, by 2^-e (G is then at most a few |g.v| / span whatever alpha) and
    their callers multiply the p gradient back by 2^e with unscale (csrc/cdam_cpu_backward.cpp
    computes the same e as max(0, ilogb(alpha)))."""
    return max(0, math.frexp(alpha)[1] - 1)


def unscale(g: torch.Tensor, e: int) -> torch.Tensor:
    """g 2^e in float64 (exact; +-inf once the caller casts a value beyond float32 back)."""
    return g.double() * 2.0 ** e


def pairwise_jsd_backward(grad, p, q):
    return jsd_vjp(p, q, grad)


def cdam_map_backward(grad, p, alpha, divergence=ref.pairwise_jsd, divergence_vjp=pairwise_jsd_backward):
    dt = compute_dtype(p, grad)
    gj = divergence_grad(divergence(p.to(dt)).to(dt), grad, alpha)  # J is not kept past this
    return scaled_vjp(lambda g: divergence_vjp(g, p, None)[0], gj, dt)


def _product_vjp(a: torch.Tensor, v: torch.Tensor, grad: torch.Tensor):
    """out = a @ v: (grad of a, grad of v)."""
    g = grad.to(a.dtype)
    return g @ v.to(a.dtype).transpose(-1, -2), a.transpose(-1, -2) @ g


def cdam_attention_backward(grad, p, v, alpha, mode=None, memory_budget=None, stats=None):
    """Follows the reference forward's memory policy (reference_backend.block_rows; mode None:
    the whole map): when the forward evaluated bounded blocks of query rows, so does this, and
    its extra memory is O(rows N) per block plus O(N (C + D)); else the whole-map formulas. (The
    forward's row statistics do not apply: J's rows are recomputed.)"""
    p = p.to(compute_dtype(p, v, grad))  # as the forward's Call promoted it: its blocks, its J's dtype
    if mode is not None:
        rows = rb.block_rows(p.shape[1], p.dtype.itemsize, mode, memory_budget)
        if rows < p.shape[1]:
            return _cdam_attention_backward_rows(grad, p, v, alpha, rows)
    j = ref.pairwise_jsd(p.to(compute_dtype(p, v, grad)))
    ga, gv = _product_vjp(ref.minmax_expm1(j, alpha), v, grad)
    return scaled_vjp(lambda g: jsd_vjp(p, None, g)[0], divergence_grad(j, ga, alpha), j.dtype), gv


def _cdam_attention_backward_rows(grad, p, v, alpha, rows: int):
    """The backward one block of `rows` query rows at a time, with the forward's blocks: J's rows
    are reference_backend's (_self_rows of the promoted p, same blocks, so the row max / min and their
    ties are the forward's bit for bit; diagonal 0). Per block: A's rows, ga = g v^T, gv += A^T g,
    G = divergence_grad, and the divergence's vector-Jacobian product of those rows against all
    keys (q given: the row side and the key side both land in gp)."""
    dt = compute_dtype(p, v, grad)
    B, N, _ = p.shape
    gp = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
    gv = torch.zeros(v.shape, dtype=dt, device=v.device)
    for b in range(B):
        vb, gb, pb = v[b].to(dt), grad[b].to(dt), p[b:b + 1]
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            j = rb._self_rows(p[b], i0, i1)
            ga, gv_rows = _product_vjp(ref.minmax_expm1(j, alpha).to(dt), vb, gb[i0:i1])
            gv[b] += gv_rows
            g_rows, g_keys = scaled_vjp(lambda g: jsd_vjp(pb[:, i0:i1], pb, g),
                                        divergence_grad(j, ga, alpha)[None], dt)
            gp[b, i0:i1] += g_rows[0]
            gp[b] += g_keys[0]
    return gp, gv


def jsd_attention_backward(grad, p, v, q, tau, lse=None):
    """FlashAttention's backward with the divergence as the score: w = softmax(-J / tau),
    dS_ij = w_ij (g_i . v_j - sum_k w_ik g_i . v_k), dJ = -dS / tau (the forward's row
    log-sum-exp `lse` is not needed: the full rows of w are at hand)."""
    dt = compute_dtype(p, q, v, grad)
    j = ref.pairwise_jsd(p.to(dt), None if q is None else q.to(dt))
    w = torch.softmax(-j / tau, dim=-1)
    gw, gv = _product_vjp(w, v, grad)
    ds = w * (gw - (w * gw).sum(-1, keepdim=True))
    gp, gq = jsd_vjp(p, q, ds / -tau)
    return gp, gv, gq


def _resize_vjp(g: torch.Tensor, in_hw: tuple[int, int]) -> torch.Tensor:
    """Adjoint of F.interpolate(x, size=g.shape[-2:], mode="bilinear", align_corners=False)."""
    n, c, h, w = g.shape
    return torch.ops.aten.upsample_bilinear2d_backward(g.contiguous(), [h, w], [n, c, *in_hw], False, None, None)


def _multiscale_map_vjp(sim: torch.Tensor, ga: torch.Tensor, scales, tau: float, alpha: float, divergence,
                        divergence_vjp) -> torch.Tensor:
    """Gradient wrt sim of sum ga * multiscale_cdam_map(sim) (float64). Per scale, in reverse:
    min-max / expm1 (in float64), then the divergence (divergence_vjp), the adjoints of the pair
    upsampling (separable bilinear, transposed), of softmax(. / tau) over classes and of the grid
    resize. Everything after min-max / expm1 is linear in its gradient and runs in the compute
    dtype under one power-of-two scale per scale and batch element (scaled_vjp).
    Memory: a few [B, N, N] maps at a time (J upsampled, its gradient, the adjoint's transposes)."""
    B, C, h, w = sim.shape
    n_full = h * w
    dt = ga.dtype
    gsim = torch.zeros(sim.shape, dtype=torch.float64, device=sim.device)
    ga = ga / len(scales)
    x = sim.to(dt)
    for s in scales:
        hs, ws = scale_grid(h, w, s)
        n = hs * ws
        ps = class_distributions(x, hs, ws, tau)  # [B, n, C]
        js = divergence(ps).to(dt)
        same = (hs, ws) == (h, w)
        gju = divergence_grad(js if same else ref._upsample_pairs(js, hs, ws, h, w), ga, alpha)  # [B, N, N]

        def chain(gju, ps=ps, hs=hs, ws=ws, n=n, same=same):
            if same:
                gjs = gju
            else:
                # forward: keys = up(js rows) [B, n, N]; both = up(keys^T rows) [B, N(key), N(query)]; out = both^T
                g_both = gju.transpose(1, 2).reshape(B * n_full, 1, h, w)
                g_keys = _resize_vjp(g_both, (hs, ws)).reshape(B, n_full, n).transpose(1, 2)  # [B, n, N]
                gjs = _resize_vjp(g_keys.reshape(B * n, 1, h, w), (hs, ws)).reshape(B, n, n)
            gps = divergence_vjp(gjs, ps, None)[0].to(gjs.dtype)
            # softmax over classes of the resized grid / tau
            gz = ps * (gps - (ps * gps).sum(-1, keepdim=True)) / tau  # [B, n, C]
            gz = gz.transpose(1, 2).reshape(B, C, hs, ws)
            return gz if same else _resize_vjp(gz, (h, w))

        gsim += scaled_vjp(chain, gju, dt)
    return gsim


def multiscale_cdam_map_backward(grad, sim, scales, tau, alpha, divergence=ref.pairwise_jsd,
                                 divergence_vjp=pairwise_jsd_backward):
    return _multiscale_map_vjp(sim, grad.to(compute_dtype(sim, grad)), scales, tau, alpha, divergence, divergence_vjp)


def multiscale_cdam_attention_backward(grad, sim, v, scales, tau, alpha, divergence=ref.pairwise_jsd,
                                       divergence_vjp=pairwise_jsd_backward, cdam_map=ref.multiscale_cdam_map):
    """cdam_map(sim, scales, tau, alpha) -> A: the backend's multi-scale map forward, for gv = A^T g."""
    dt = compute_dtype(sim, v, grad)
    a = cdam_map(sim.to(dt), scales, tau, alpha).to(dt)
    ga, gv = _product_vjp(a, v, grad)
    del a  # one N x N map fewer during the map's backward
    return _multiscale_map_vjp(sim, ga, scales, tau, alpha, divergence, divergence_vjp), gv


# The ops whose backward is the composite above (the fast backends bind their divergence to it).
COMPOSITE_OPS = ("cdam_map", "multiscale_cdam_map", "multiscale_cdam_attention")


def bind_composites(forward, pairwise_jsd_vjp) -> tuple:
    """(cdam_map_backward, multiscale_cdam_map_backward, multiscale_cdam_attention_backward) on a
    fast backend: `forward` is its backend module (pairwise_jsd recomputes J as its forward does,
    multiscale_cdam_map gives A for gv), `pairwise_jsd_vjp` its fused pairwise_jsd backward."""
    divergence = functools.partial(forward.pairwise_jsd, q=None)
    bound = dict(divergence=divergence, divergence_vjp=pairwise_jsd_vjp)
    return (functools.partial(cdam_map_backward, **bound), functools.partial(multiscale_cdam_map_backward, **bound),
            functools.partial(multiscale_cdam_attention_backward, **bound, cdam_map=forward.multiscale_cdam_map))
