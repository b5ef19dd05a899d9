"""The pure-torch reference for every op: the definition the fast backends are tested against.

Written for clarity and the spec's formulas (the divergence in a centred KL form that is
algebraically the spec's entropy form, F.interpolate for the grids), not for speed. It never builds an [N, N, C] tensor:
the pairwise divergence is evaluated in row chunks whose size is bounded. Inputs are
batch-flattened: p [B, N, C], v [B, N, D], sim [B, C, h, w]. It computes in float64 for
float64 input and in float32 otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .centring import class_reference
from .constants import CONSTANT_ROW_EPS, LOG2E
from .grids import class_distributions, scale_grid

# Largest [rows, M, C] block the chunked divergence materialises at once.
_CHUNK_ELEMENTS = 1 << 22


def compute_dtype(*ts) -> torch.dtype:
    """The one dtype rule (cdam_fast/opspec.py): float64 if any tensor is float64, else float32
    whatever the 16/32-bit dtypes (None entries are absent optional tensors)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def pairwise_jsd(p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """J[b, i, j] = H((p_i + q_j) / 2) - (H(p_i) + H(q_j)) / 2 in nats, clamped at 0.

    With q None the divergence is of p against itself and the diagonal is exactly 0, as is J
    between any two identical rows.
    Evaluated in the centred form J = (KL(p_i || u) + KL(q_j || u)) / 2 - KL(m || u),
    m = (p_i + q_j) / 2, with u = class_reference(p, q) shared by the batch element: the same
    value as the entropy form, but for the flat distributions of CLIP (where H is close to
    ln C and J ~ 1e-3) it sums small terms instead of cancelling numbers near ln C, so float32
    keeps ~100x more of J. The per-row KL terms are computed once in float64.
    """
    dt = compute_dtype(p)
    pp = p.to(dt)
    qq = pp if q is None else q.to(dt)
    B, N, C = pp.shape
    M = qq.shape[1]
    u = class_reference(pp, None if q is None else qq)
    kp = _kl_to(pp, u).to(dt)
    kq = kp if q is None else _kl_to(qq, u).to(dt)
    inv_u = (1.0 / u).to(dt)
    out = torch.empty(B, N, M, dtype=dt, device=p.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, M * C))
    for b in range(B):
        for i in range(0, N, rows):
            pi, qj = pp[b, i:i + rows, None, :], qq[b, None, :, :]
            m = 0.5 * (pi + qj)
            out[b, i:i + rows] = 0.5 * (kp[b, i:i + rows, None] + kq[b, None, :]) - torch.xlogy(m, m * inv_u[b]).sum(-1)
            # identical rows: exactly 0 (the row terms and the pair sum round differently otherwise)
            out[b, i:i + rows].masked_fill_((pi == qj).all(-1), 0.0)
    out.clamp_(min=0.0)
    if q is None:
        out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


def _kl_to(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """KL(p_i || u) in nats, float64, per row (0 log 0 = 0)."""
    pd = p.double()
    return torch.xlogy(pd, pd / u[:, None, :]).sum(-1)


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
    return minmax_expm1(pairwise_jsd(p), alpha)


def cdam_attention(p: torch.Tensor, v: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    a = cdam_map(p, alpha)
    return (a @ v.to(a.dtype)).to(v.dtype)


def _upsample_pairs(j: torch.Tensor, hs: int, ws: int, h: int, w: int) -> torch.Tensor:
    """[B, n_s, n_s] -> [B, N, N]: bilinear along the key axis, then along the query axis."""
    B, n, _ = j.shape
    up = lambda t: F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)  # noqa: E731
    keys = up(j.reshape(B * n, 1, hs, ws)).reshape(B, n, h * w)
    both = up(keys.transpose(1, 2).reshape(B * h * w, 1, hs, ws)).reshape(B, h * w, h * w)
    return both.transpose(1, 2)  # [query, key] order: row i belongs to full-grid query i


def multiscale_cdam_map(sim: torch.Tensor, scales=None, tau: float = 0.1, alpha: float = 10.0) -> torch.Tensor:
    from .grids import CDAM_SCALES

    scales = CDAM_SCALES if scales is None else scales
    B, C, h, w = sim.shape
    total = None
    for s in scales:
        hs, ws = scale_grid(h, w, s)
        j = pairwise_jsd(class_distributions(sim, hs, ws, tau))
        if (hs, ws) != (h, w):
            j = _upsample_pairs(j, hs, ws, h, w)
        a = minmax_expm1(j, alpha)
        total = a if total is None else total + a
    return total / len(scales)


def multiscale_cdam_attention(sim, v, scales=None, tau: float = 0.1, alpha: float = 10.0) -> torch.Tensor:
    a = multiscale_cdam_map(sim, scales, tau, alpha)
    return (a @ v.to(a.dtype)).to(v.dtype)


def jsd_attention(p: torch.Tensor, v: torch.Tensor, tau: float = 0.1, q: torch.Tensor | None = None) -> torch.Tensor:
    """softmax_j(-J_ij / tau) @ v, the keys' distributions being q (default p)."""
    return jsd_attention_train(p, v, tau, q)[0]


def jsd_attention_train(p: torch.Tensor, v: torch.Tensor, tau: float = 0.1, q: torch.Tensor | None = None):
    """(jsd_attention(p, v, tau, q), lse): lse_i = log2 sum_j exp(-J_ij / tau), the softmax's row
    normaliser in base 2 as float32 [B, N] (what the training forward saves for the backward)."""
    j = pairwise_jsd(p, q)
    logits = -j / tau
    out = (torch.softmax(logits, dim=-1) @ v.to(j.dtype)).to(v.dtype)
    return out, (torch.logsumexp(logits, dim=-1) * LOG2E).to(torch.float32)
