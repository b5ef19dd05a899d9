"""Host side of the fused CPU backward of pairwise_jsd, jsd_attention and cdam_attention
(csrc/cdam_cpu_backward.cpp), which the CPU backend (cpu_backend.py) runs; the composite
backward passes of cdam_map and the multi-scale ops run the op homes' formulas on the CPU
divergence and this fused pairwise_jsd backward.

Built just in time like the forward CPU extension (same flags, cache and failure handling,
cdam_fast.backends.extension_build), as its own small module so the forward's sources stay as
they are. If it cannot be built, the backward falls back to the reference formulas.
Host-side work here is O(N C) preparation: float32 copies, log terms, class-major padded keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import constants, memory
from ..centring import centring_weights, log_terms, row_terms
from . import extension_build as eb


def _spec() -> eb.ExtensionSpec:
    cpu = eb.cpu_spec()
    return eb.ExtensionSpec("cdam_fast_cpu_backward", (eb.SOURCE_DIR / "cdam_cpu_backward.cpp",), cflags=cpu.cflags,
                            ldflags=cpu.ldflags, label="CPU backward", headers=cpu.headers)


extension = eb._Cached(_spec)


def failure_reasons() -> list[str]:
    """Why the fused CPU backward cannot run: only a failed build (the kernels index with int64
    and loop over the batch, like the forward's)."""
    why = extension.failure()
    return [f"the CPU backward extension could not be built ({why})"] if why else []


def _lanes() -> int:
    return 32  # keys are padded to a multiple of two vectors of every at::vec float width (AVX2 8, AVX-512 16)


def _rows(p, w):
    return p.float().contiguous(), log_terms(p, w).contiguous()


def _keys(k, w):
    """class-major zero-padded keys [B, C, Mp], their log terms and row terms [B, Mp]."""
    pad = -k.shape[1] % _lanes()
    kT = F.pad(k.float().transpose(1, 2), (0, pad)).contiguous()
    lkT = F.pad(log_terms(k, w).transpose(1, 2), (0, pad)).contiguous()
    return kT, lkT, F.pad(row_terms(k, w), (0, pad)).contiguous()


def _finish(acc, p):
    """[B, n, C] sums -> gradient: (ln 2 / 2) acc, 0 where p = 0."""
    return torch.where(p > 0, constants.HALF_LN2 * acc, 0.0)


def pairwise_jsd_backward(grad, p, q, need_q=True):
    """(gp, gq); gq None when q is None or not needed (the key-side sums are then not formed)."""
    mod = extension.module()
    w = centring_weights(p, q)  # the forward's centring weights
    pp, lp = _rows(p, w)
    g = grad.float()
    if q is None:
        g = g + g.transpose(1, 2)  # p on both sides: one pass over G + G^T (constant diagonal)
        g.diagonal(dim1=-2, dim2=-1).zero_()
    kT, lkT, _ = _keys(p if q is None else q, w)
    g = F.pad(g, (0, kT.shape[2] - g.shape[2])).contiguous()
    keys_too = q is not None and need_q
    T, U = mod.jsd_class_grads(pp, lp, kT, lkT, w, g, keys_too, memory.resolve_budget(None))
    if not keys_too:
        return _finish(T, p), None
    return _finish(T, p), _finish(U[:, :, :q.shape[1]].transpose(1, 2), q)


def _attention(kind, param, grad, p, v, q, need_p=True, memory_budget=None):
    """(gp, gv, gq) of the attention ops (kind 0: jsd_attention, 1: cdam_attention); need_p
    False: gv alone (gp, gq None), the kernel then forms no score gradient or class sums.
    memory_budget (bytes; None: the policy's default) bounds the kernel's per-task buffers."""
    mod = extension.module()
    w = centring_weights(p, q)  # the forward's centring weights and row terms (cdam_fast/centring.py)
    pp, lp = _rows(p, w)
    keys = p if q is None else q
    kT, lkT, rk = _keys(keys, w)
    T, U, gv = mod.attention_backward(pp, lp, row_terms(p, w), kT, lkT, rk, w, v.float().contiguous(),
                                      grad.float().contiguous(), kind, float(param), q is None,
                                      memory.resolve_budget(memory_budget), need_p)
    if not need_p:
        return None, gv, None
    gk = _finish(U[:, :, :keys.shape[1]].transpose(1, 2), keys)
    if q is None:
        return _finish(T, p) + gk, gv, None
    return _finish(T, p), gv, gk


def jsd_attention_backward(grad, p, v, q, tau, need_p=True):
    """(gp, gv, gq). The forward's row log-sum-exp is not needed: a CPU row of weights fits in
    cache, so the softmax and Delta_i are summed exactly per row."""
    return _attention(0, tau, grad, p, v, q, need_p)


def cdam_attention_backward(grad, p, v, alpha, memory_budget=None, need_p=True):
    """(gp, gv), always in bounded row chunks (the forward's mode does not matter: the chunked
    recompute is as fast as keeping N x N here, the row statistics being local to each row, so
    the forward's are not needed either); memory_budget bounds the per-task buffers
    (csrc/cdam_cpu_backward.cpp)."""
    gp, gv, _ = _attention(1, alpha, grad, p, v, None, need_p, memory_budget)
    if gp is None:
        return None, gv
    return constants.unscale(gp, constants.gradient_exponent(alpha)), gv  # the kernel's G is scaled by 2^-e
