"""The C++ CPU backend (csrc/cdam_cpu.cpp forward, csrc/cdam_cpu_backward.cpp backward), compiled
just in time on first use.

The kernels use the entropy form of the divergence, one log2 per (row, key, class):
r_i = sum_c p_ic (log2 p_ic + 1), J_ij = (ln 2 / 2)(r_i + r'_j - sum_c s log2 s) with
s = p_ic + q_jc, accumulated in float32 (the reference uses the literal mixture-entropy
formula instead, so the two are independent). Inputs are converted to float32 here;
maps come back float32, attention outputs in v's dtype. The kernels index with int64 and loop
over the batch: no size limits beyond memory. Its backward is fused for every op
(cpu_backward.py); it saves no statistics (the backward recomputes each row's, cheaply, in cache).
"""
from __future__ import annotations

import torch

from . import cpu_backward
from .extension_build import cpu_extension
from .shared import ExtensionBackend

class CpuBackend(ExtensionBackend):
    name = "cpu"
    devices = ("cpu",)
    extension = cpu_extension
    ops = ("pairwise_jsd", "cdam_map", "cdam_attention", "multiscale_cdam_map", "multiscale_cdam_attention",
           "jsd_attention")
    backward_ops = ("pairwise_jsd", "cdam_map", "cdam_attention", "multiscale_cdam_map", "multiscale_cdam_attention",
                    "jsd_attention")

    def values(self, v):
        return v.to(torch.float32).contiguous()

    def backward_limit_reasons(self, op, call):
        return cpu_backward.failure_reasons(op)

    def pairwise_jsd_backward(self, grad, p, q, *, needs=None, stats=None):
        return cpu_backward.pairwise_jsd_backward(grad, p, q, need_q=needs is None or needs[1])

    def cdam_attention_backward(self, grad, p, v, alpha, mode, memory_budget, *, needs=None, stats=None):
        return cpu_backward.cdam_attention_backward(grad, p, v, alpha, memory_budget,
                                                    need_p=needs is None or needs[0])

    def cdam_map_backward(self, grad, p, alpha, *, needs=None, stats=None):
        return (cpu_backward.cdam_map_backward(grad, p, alpha),)

    def multiscale_cdam_map_backward(self, grad, sim, scales, tau, alpha, *, needs=None, stats=None):
        return (cpu_backward.multiscale_cdam_map_backward(grad, sim, scales, tau, alpha),)

    def multiscale_cdam_attention_backward(self, grad, sim, v, scales, tau, alpha, mode, memory_budget, *, needs=None,
                                           stats=None):
        return cpu_backward.multiscale_cdam_attention_backward(grad, sim, v, scales, tau, alpha,
                                                               memory_budget=memory_budget)

    def jsd_attention_backward(self, grad, p, v, tau, q, *, needs=None, stats=None):
        need_pq = needs is None or needs[0] or (q is not None and needs[2])
        return cpu_backward.jsd_attention_backward(grad, p, v, q, tau, need_p=need_pq)
