"""The centred form of the divergence, host side (shared by the reference and the Triton backend).

With s = p_i + q_j and any positive per-class weights w_c, the Jensen-Shannon divergence is
    J_ij = (ln 2 / 2) (r_i + r'_j - sum_c s_c log2(s_c w_c)),   r_i = sum_c p_ic log2(2 p_ic w_c).
The kernels take w_c = 1 / (2 u_c) with u the mean class distribution of the batch element
(`class_reference`): then s w is close to 1 for the flat distributions of CLIP, every term of
the sum is small and float32 accumulation keeps J accurate, where the entropy form (w = 1)
subtracts numbers near log2 C'. One multiply more per (i, j, c), still one logarithm.
The CUDA bindings compute the same terms in csrc/cdam_centring.h, the CPU extension in fused
loops (csrc/cdam_cpu.cpp).
"""
from __future__ import annotations

import torch

from .constants import LOG2E, TINY_MASS


def class_reference(p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """u [B, C], float64: the mean class distribution of the rows of p (and q) per batch element,
    over finite entries only (a NaN row stays NaN without spreading to the others), clamped at
    TINY_MASS so 1 / u is finite."""
    rows = (p if q is None else torch.cat([p, q], dim=1)).double()
    finite = torch.isfinite(rows)
    total = torch.where(finite, rows, torch.zeros_like(rows)).sum(1)
    return (total / finite.sum(1).clamp_min(1)).clamp_min(TINY_MASS)


def centring_weights(p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """w [B, C] = 1 / (2 u) in float32 (the kernels' multiplier)."""
    return (0.5 / class_reference(p, q)).float().contiguous()


def row_terms(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """r_i = sum_c p_ic log2(2 p_ic w_c) in float64 from the values the kernel reads (p in its
    own dtype, w as the float32 it is given), rounded to float32 once."""
    pd = p.double()
    return (torch.xlogy(pd, 2.0 * pd * w.double()[:, None, :]).sum(-1) * LOG2E).float().contiguous()


def log_terms(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """lp [B, n, C] = log2(2 p w) in float64, rounded to float32 once: the summands of r_i / p_ic,
    and the gradient's log(p_ic / m_ijc) = ln 2 (lp_ic - log2(s_ijc w_c)) with the same logarithm
    of s w the divergence takes (the fused backward passes). Exact for every p > 0 (float32
    subnormals are normal in float64); p = 0 reads TINY_MASS (finite; the gradient is 0 there)."""
    pd = p.double()
    pd = torch.where(pd > 0, pd, TINY_MASS)
    return torch.log2(2.0 * pd * w.double()[:, None, :]).float()
