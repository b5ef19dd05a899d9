"""pairwise_jsd: J[b, i, j], the Jensen-Shannon divergence (nats) between every row of p and of
q (default p). Its specification, its pure-torch reference and its backward formula (the
divergence's vector-Jacobian product, which every other op's backward ends in)."""
from __future__ import annotations

import math

import torch

from ..centring import class_reference
from .spec import SCHEMA_TAIL, OpSpec, compute_dtype, pair_shape

# Largest [rows, M, C] block the chunked divergence materialises at once.
_CHUNK_ELEMENTS = 1 << 22


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


# Backward (docs/autograd.md, section 1).

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
    rows = max(1, _CHUNK_ELEMENTS // max(1, M * C))
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


def pairwise_jsd_backward(grad, p, q, *, needs=None, stats=None, kernels=None):
    """(gp, gq): the divergence's vector-Jacobian product (gq None when q is None)."""
    return jsd_vjp(p, q, grad)


SPECS = (
    OpSpec("pairwise_jsd", ("p", "q"), "(Tensor p, Tensor? q, " + SCHEMA_TAIL, ("p", "q"), (), pair_shape, True,
           pairwise_jsd, pairwise_jsd_backward, has_q=True, tensor_names=("p", "q")),
)
