"""jsd_attention: softmax_j(-J(p_i, q_j) / tau) @ v, the keys' distributions being q (default
p). Its specification, its pure-torch reference (with the row log-sum-exp its training forward
saves) and its backward formulas (docs/autograd.md, section 4)."""
from __future__ import annotations

import torch

from ..constants import LOG2E
from . import pairwise_jsd as jsd
from .spec import SCHEMA_TAIL, OpSpec, StatsFormat, compute_dtype, value_shape
from .vjp import product_vjp


def jsd_attention(p: torch.Tensor, v: torch.Tensor, tau: float = 0.1, q: torch.Tensor | None = None) -> torch.Tensor:
    """softmax_j(-J_ij / tau) @ v, the keys' distributions being q (default p)."""
    return jsd_attention_train(p, v, tau, q)[0]


def jsd_attention_train(p: torch.Tensor, v: torch.Tensor, tau: float = 0.1, q: torch.Tensor | None = None):
    """(jsd_attention(p, v, tau, q), lse): lse_i = log2 sum_j exp(-J_ij / tau), the softmax's row
    normaliser in base 2 as float32 [B, N] (what the training forward saves for the backward)."""
    j = jsd.pairwise_jsd(p, q)
    logits = -j / tau
    out = (torch.softmax(logits, dim=-1) @ v.to(j.dtype)).to(v.dtype)
    return out, (torch.logsumexp(logits, dim=-1) * LOG2E).to(torch.float32)


# Backward (docs/autograd.md, section 4).

def jsd_attention_backward(grad, p, v, tau, q=None, *, needs=None, stats=None, kernels=None):
    """(gp, gv, gq): FlashAttention's backward with the divergence as the score: w = softmax(-J / tau),
    dS_ij = w_ij (g_i . v_j - sum_k w_ik g_i . v_k), dJ = -dS / tau (the forward's row
    log-sum-exp is not needed: the full rows of w are at hand). needs (p, v, q) without p and q:
    gv = w^T g alone."""
    dt = compute_dtype(p, q, v, grad)
    j = jsd.pairwise_jsd(p.to(dt), None if q is None else q.to(dt))
    w = torch.softmax(-j / tau, dim=-1)
    need_pq = needs is None or needs[0] or (q is not None and needs[2])
    gw, gv = product_vjp(w, v, grad, need_pq)
    if not need_pq:
        return None, gv, None
    ds = w * (gw - (w * gw).sum(-1, keepdim=True))
    gp, gq = jsd.jsd_vjp(p, q, ds / -tau)
    return gp, gv, gq


def _row_shape(call):
    return (call.batch, call.tokens())


#: jsd_attention's training statistics: the row log-sum-exp lse_i = log2 sum_j 2^(-J_ij log2(e) / tau)
#: [B, N], base 2, as FlashAttention-2 saves it
ROW_LSE = StatsFormat("row_lse_base2", _row_shape, "row log-sum-exp of the logits, base 2")

SPECS = (
    OpSpec("jsd_attention", ("p", "v", "tau", "q"), "(Tensor p, Tensor v, float tau, Tensor? q, " + SCHEMA_TAIL,
           ("p", "q"), ("v",), value_shape, False, jsd_attention, jsd_attention_backward, has_q=True,
           tensor_names=("p", "v", "q"), stats_format=ROW_LSE, reference_train=jsd_attention_train),
)
