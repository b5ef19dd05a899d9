"""Host-side steps the fast backends take the same way, and the base of the extension backends."""
from __future__ import annotations

import torch

from .. import grids, memory
from .base import Backend


def multiscale_inputs(sim: torch.Tensor, scales, tau: float):
    """Per scale: the distributions P_s [B, n_s, C] (float32) and, for grids smaller than h x w,
    the bilinear taps (idx [N, 4] int32, weights [N, 4] float32) onto the full grid, else None."""
    _, _, h, w = sim.shape
    ps, idx, wts = [], [], []
    for s in scales:
        hs, ws = grids.scale_grid(h, w, s)
        ps.append(grids.class_distributions(sim, hs, ws, tau).to(torch.float32).contiguous())
        if (hs, ws) == (h, w):
            idx.append(None)
            wts.append(None)
        else:
            i, wt = grids.bilinear_taps_2d(h, w, hs, ws, device=sim.device)
            idx.append(i.contiguous())
            wts.append(wt.contiguous())
    return ps, idx, wts


def materialized_bytes(ps) -> int:
    """What materialize mode keeps for these per-scale distributions (cdam_fast.memory's rule)."""
    return memory.materialized_bytes(ps[0].shape[0], [p.shape[1] for p in ps])


class ExtensionBackend(Backend):
    """A backend whose forward kernels live in a JIT-built extension module (`extension`, an
    extension_build._Cached). `values` prepares v for it (the CPU kernels take float32, the CUDA
    ones any 16/32-bit float); divergence inputs always go in as float32."""

    extension = None

    def available(self, device, dtype):
        return self.extension.report()  # reports, never builds

    def not_supported_reasons(self, op, call):
        """A call it would run builds the extension on first use: a failed build is its reason."""
        if op in self.ops and self.unavailable_reason(call.device, call.compute_dtype) is None:
            failure = self.extension.failure()
            if failure:
                return [failure]
        return super().not_supported_reasons(op, call)

    def values(self, v):
        return v.contiguous()

    @staticmethod
    def _f32(t):
        return None if t is None else t.to(torch.float32).contiguous()

    def pairwise_jsd(self, p, q):
        return self.extension.module().pairwise_jsd(self._f32(p), self._f32(q))

    def cdam_map(self, p, alpha):
        return self.extension.module().cdam_map(self._f32(p), float(alpha))

    def cdam_attention(self, p, v, alpha, mode, memory_budget):
        B, N, _ = p.shape
        materialize = memory.materialize(mode, memory.materialized_bytes(B, [N]), memory_budget)
        return self.extension.module().cdam_attention(self._f32(p), self.values(v), float(alpha),
                                                      materialize).to(v.dtype)

    def multiscale_cdam_map(self, sim, scales, tau, alpha):
        ps, idx, wts = multiscale_inputs(sim, scales, tau)
        return self.extension.module().multiscale_cdam_map(ps, idx, wts, sim.shape[2] * sim.shape[3], float(alpha))

    def multiscale_cdam_attention(self, sim, v, scales, tau, alpha, mode, memory_budget):
        ps, idx, wts = multiscale_inputs(sim, scales, tau)
        materialize = memory.materialize(mode, materialized_bytes(ps), memory_budget)
        return self.extension.module().multiscale_cdam_attention(ps, idx, wts, self.values(v), float(alpha),
                                                                 materialize).to(v.dtype)

    def jsd_attention(self, p, v, tau, q):
        return self.extension.module().jsd_attention(self._f32(p), self.values(v), float(tau),
                                                     self._f32(q)).to(v.dtype)
