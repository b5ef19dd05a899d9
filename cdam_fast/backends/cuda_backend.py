"""The CUDA C++ backend (csrc/cdam_cuda.cpp + cdam_cuda_kernels.cu), compiled just in time.

A fallback beside the Triton kernels: the same ops with lg2.approx divergences accumulated in
float32 and the products with v on the tensor cores (WMMA; float32 v is split into two bf16
parts). Built for sm_80 and sm_90, and only on a machine with a CUDA GPU. Multi-scale calls
always keep the smaller grids' divergences (at most 0.76 N^2 floats each); "recompute" only
avoids storing the full grid's N x N ones. It has no backward of its own: the pure-torch
formulas run on its device.
"""
from __future__ import annotations

import torch

from .base import INT32_MAX, cdiv, limit_reason
from .extension_build import cuda_extension
from .shared import ExtensionBackend

MIN_CAPABILITY = (8, 0)
# From csrc/cdam_cuda_kernels.cu and cdam_cuda.h: query rows per block (grid y) and the scale slots.
ROWS_PER_BLOCK = 16
MAX_SCALES = 16


class CudaBackend(ExtensionBackend):
    """Limits of the current launches: one-dimensional grids of at most 2^31 - 1 blocks (the
    largest is the multi-scale map's, B x N x N/256), int32 row and class counts and tap
    indices, at most MAX_SCALES scales."""

    name = "cuda"
    devices = ("cuda",)
    extension = cuda_extension
    ops = ("pairwise_jsd", "cdam_map", "cdam_attention", "multiscale_cdam_map", "multiscale_cdam_attention",
           "jsd_attention")
    max_size = INT32_MAX
    max_scales = MAX_SCALES
    max_tap_entries = INT32_MAX

    def available(self, device, dtype):
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return f"it needs compute capability 8.0 or newer (bf16 tensor cores); this GPU is sm_{cap[0]}{cap[1]}"
        return self.extension.report()  # reports, never builds

    def limit_reasons(self, op, call):
        B, N, M, C = call.batch, call.tokens(), call.keys(), call.classes()
        blocks = B * cdiv(N, ROWS_PER_BLOCK) * cdiv(max(M, C, 1), ROWS_PER_BLOCK)
        if op == "multiscale_cdam_map":  # its own launch shape (csrc/cdam_cuda_kernels.cu)
            blocks = max(blocks, B * N * cdiv(N, 256))
        return limit_reason("launch blocks", blocks, INT32_MAX, "one-dimensional launch grid")
