"""KeOps baseline (optional): the divergence as a symbolic LazyTensor, reduced without ever
storing an N x M matrix. KeOps computes reductions, so only the ops whose output is a
reduction over keys have a KeOps form: jsd_attention (a weighted soft-max sum) and
cdam_attention (a min / max pass, then a weighted sum).

Inputs are batch-flattened like the ops': p [B, N, C], q [B, M, C], v [B, M, D]. Batched
LazyTensors put the query index i at dim 1 and the key index j at dim 2.
"""
from __future__ import annotations

import math

import torch

OPS = ("cdam_attention", "jsd_attention")
_KEY_AXIS = 2  # one batch dimension, so j is reduction axis 1 + 1


def unavailable_reason(op: str) -> str | None:
    """None when KeOps can run `op`, else the explicit reason shown in the results table."""
    if op not in OPS:
        return "n/a: KeOps returns reductions, not dense N x N maps"
    try:
        import pykeops.torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install that fails on import
        return f"not installed (pykeops: {type(e).__name__})"
    return None


def _divergence(p: torch.Tensor, q: torch.Tensor):
    """Symbolic J[b, i, j] = H((p_i + q_j) / 2) - (H(p_i) + H(q_j)) / 2."""
    from pykeops.torch import LazyTensor

    hp = -torch.xlogy(p, p).sum(-1)
    hq = -torch.xlogy(q, q).sum(-1)
    m = (LazyTensor(p[:, :, None, :]) + LazyTensor(q[:, None, :, :])) * 0.5
    h_mix = -m.xlogx().sum(-1)  # sum over the class (vector) dimension, still symbolic
    return h_mix - (LazyTensor(hp[:, :, None, None]) + LazyTensor(hq[:, None, :, None])) * 0.5


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous() if t.dtype != torch.float64 else t.contiguous()


def jsd_attention(p, v, tau: float = 0.1, q=None) -> torch.Tensor:
    from pykeops.torch import LazyTensor

    p = _float(p)
    q = p if q is None else _float(q)
    j = _divergence(p, q)
    out = (-j / tau).sumsoftmaxweight(LazyTensor(_float(v)[:, None, :, :]), axis=_KEY_AXIS)
    return out.to(v.dtype)


def cdam_attention(p, v, alpha: float = 10.0) -> torch.Tensor:
    """Two passes over the pairs: the row max / min of J, then sum_j expm1(alpha X_ij) v_j."""
    from pykeops.torch import LazyTensor

    p = _float(p)
    j = _divergence(p, p)
    hi = j.max(axis=_KEY_AXIS)  # [B, N, 1]
    lo = j.min(axis=_KEY_AXIS)
    # Constant rows (span ~ 0) would divide by ~0; the clamp keeps them finite (benchmark only).
    inv_span = 1.0 / (hi - lo).clamp_min(1e-6)
    x = (LazyTensor(hi[:, :, None, :]) - j) * LazyTensor(inv_span[:, :, None, :])
    weight = ((x * alpha).exp() - 1.0) / math.expm1(alpha)
    out = (weight * LazyTensor(_float(v)[:, None, :, :])).sum(axis=_KEY_AXIS)
    return out.to(v.dtype)


FUNCTIONS = {"cdam_attention": cdam_attention, "jsd_attention": jsd_attention}
