"""The pure-torch reference as a backend: any device, any float dtype."""
from __future__ import annotations

from .. import reference as ref


def unavailable_reason(device, dtype):
    return None


pairwise_jsd = ref.pairwise_jsd
cdam_map = ref.cdam_map
multiscale_cdam_map = ref.multiscale_cdam_map
jsd_attention = ref.jsd_attention


def cdam_attention(p, v, alpha, mode, memory_budget):
    return ref.cdam_attention(p, v, alpha)


def multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget):
    return ref.multiscale_cdam_attention(sim, v, scales, tau, alpha)
