"""Host side of the fused CPU backward (the CPU backend, cpu_backend.py, runs it): pairwise_jsd,
jsd_attention and cdam_attention (csrc/cdam_cpu_backward.cpp), cdam_map and the multi-scale ops
(csrc/cdam_cpu_multiscale_backward.cpp).

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
from ..grids import bilinear_taps_2d, class_distributions, scale_grid
from ..opdefs.multiscale import resize_vjp
from . import extension_build as eb
from .extension_build import cpu_extension


def _spec() -> eb.ExtensionSpec:
    cpu = eb.cpu_spec()
    return eb.ExtensionSpec("cdam_fast_cpu_backward", (eb.SOURCE_DIR / "cdam_cpu_backward.cpp",), cflags=cpu.cflags,
                            ldflags=cpu.ldflags, label="CPU backward", headers=cpu.headers)


extension = eb._Cached(_spec)


def _multiscale_spec() -> eb.ExtensionSpec:
    cpu = eb.cpu_spec()
    return eb.ExtensionSpec("cdam_fast_cpu_multiscale_backward", (eb.SOURCE_DIR / "cdam_cpu_multiscale_backward.cpp",),
                            cflags=cpu.cflags, ldflags=cpu.ldflags, label="CPU multi-scale backward",
                            headers=cpu.headers)


multiscale_extension = eb._Cached(_multiscale_spec)
MULTISCALE_OPS = ("cdam_map", "multiscale_cdam_map", "multiscale_cdam_attention")


def failure_reasons(op: str) -> list[str]:
    """Why the fused CPU backward of op cannot run: only a failed build (the kernels index with
    int64 and loop over the batch, like the forward's)."""
    ext = multiscale_extension if op in MULTISCALE_OPS else extension
    why = ext.failure()
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


def _full_grid(p):
    """The prepared operands of a full-grid scale's self-divergence for the row pass."""
    w = centring_weights(p, None)
    pp, lp = _rows(p, w)
    kT, lkT, rk = _keys(p, w)
    return [pp, lp, row_terms(p, w), kT, lkT, rk, w]


def _self_divergence_grad(G, p, budget=-1):
    """Gradient of sum_ij G_ij J(p_i, p_j) in p (float32; the diagonal passes none), each
    unordered pair's logarithms taken once (G_ij + G_ji above the diagonal, formed in the kernel).
    budget: bytes for the kernel's per-worker buffers (negative: no bound)."""
    w = centring_weights(p, None)
    pp, lp = _rows(p, w)
    kT, lkT, _ = _keys(p, w)
    T, U = multiscale_extension.module().jsd_self_class_grads(pp, lp, kT, lkT, w, G.contiguous(), budget)
    return _finish(T + U[:, :, :p.shape[1]].transpose(1, 2), p)


def _softmax_vjp(ps, gps, tau):
    """Adjoint of softmax over classes of (S - max S) / tau, given P = ps and its gradient."""
    return ps * (gps - (ps * gps).sum(-1, keepdim=True)) / tau


# Rows per chunk of the kernel's pass, when set (tests: several chunks at small N); None: its own bound.
MAX_CHUNK_ROWS = None


def _multiscale(sim, scales, tau, alpha, gmap=None, g=None, v=None, memory_budget=None):
    """(gradient of sim in float64, gv or None) of the multi-scale map with incoming map gradient
    gmap, or of the attention op with g and v. One pass over the full grid's rows (the kernel);
    then per smaller scale the divergence, softmax and resize adjoints on its small grid.
    memory_budget (bytes; None: the policy's default) bounds the kernels' per-worker buffers."""
    budget = memory.resolve_budget(memory_budget)
    mod = multiscale_extension.module()
    x = sim.float()
    B, C, h, w = x.shape
    N = h * w
    grids_s = [scale_grid(h, w, s) for s in scales]
    n_full = sum(1 for hw in grids_s if hw == (h, w))  # identical scales: one pass, weight n_full / S
    small = [hw for hw in grids_s if hw != (h, w)]
    p1 = class_distributions(x, h, w, tau) if n_full else None
    ps = [class_distributions(x, hs, ws, tau) for hs, ws in small]
    js = [cpu_extension.module().pairwise_jsd(p.float().contiguous(), None) for p in ps]  # the forward's, small grids
    taps = [bilinear_taps_2d(h, w, hs, ws) for hs, ws in small]
    T, U, djs, gv = mod.multiscale_rows_backward(
        _full_grid(p1) if n_full else [], n_full / len(scales), js, [t[0].contiguous() for t in taps],
        [t[1].contiguous() for t in taps], 1.0 / len(scales), None if gmap is None else gmap.float().contiguous(),
        None if g is None else g.float().contiguous(), None if v is None else v.float().contiguous(), B, N,
        float(alpha), MAX_CHUNK_ROWS or 0, budget)
    del js  # the smaller grids' divergences are not needed past the row pass
    gsim = torch.zeros(x.shape, dtype=torch.float64)
    if n_full:
        gp1 = _finish(T, p1) + _finish(U[:, :, :N].transpose(1, 2), p1)
        gsim += _softmax_vjp(p1, gp1, tau).transpose(1, 2).reshape(B, C, h, w).double()
    for k, ((hs, ws), p) in enumerate(zip(small, ps)):
        gp, djs[k] = _self_divergence_grad(djs[k], p, budget), None
        gz = _softmax_vjp(p, gp, tau).transpose(1, 2).reshape(B, C, hs, ws)
        gsim += resize_vjp(gz, (h, w)).double()
    return constants.unscale(gsim, constants.gradient_exponent(alpha)), (gv if v is not None else None)


def cdam_map_backward(grad, p, alpha):
    T, U, _, _ = multiscale_extension.module().multiscale_rows_backward(
        _full_grid(p), 1.0, [], [], [], 1.0, grad.float().contiguous(), None, None, p.shape[0], p.shape[1],
        float(alpha), MAX_CHUNK_ROWS or 0, memory.resolve_budget(None))
    gp = _finish(T, p) + _finish(U[:, :, :p.shape[1]].transpose(1, 2), p)
    return constants.unscale(gp, constants.gradient_exponent(alpha))


def multiscale_cdam_map_backward(grad, sim, scales, tau, alpha):
    return _multiscale(sim, scales, tau, alpha, gmap=grad)[0]


def multiscale_cdam_attention_backward(grad, sim, v, scales, tau, alpha, mode=None, memory_budget=None):
    """mode does not matter: the pass is always in bounded row chunks, holding only the smaller
    grids' divergences and their gradients besides O(N (C + D)); memory_budget bounds the
    per-worker buffers (threads x C x N floats without a bound)."""
    return _multiscale(sim, scales, tau, alpha, g=grad, v=v, memory_budget=memory_budget)
