"""The CUDA C++ backend (csrc/cdam_cuda.cpp + cdam_cuda_kernels.cu), compiled just in time.

A fallback beside the Triton kernels: the same ops with lg2.approx divergences accumulated in
float32 and the products with v on the tensor cores (WMMA; float32 v is split into two bf16
parts). Built for sm_80 and sm_90, and only on a machine with a CUDA GPU. Multi-scale calls
always keep the smaller grids' divergences (at most 0.76 N^2 floats each); "recompute" only
avoids storing the full grid's N x N ones.
"""
from __future__ import annotations

import torch

from .extension_build import cuda_extension
from .shared import INT32_MAX, ExtensionOps, cdiv, dtype_reason, limit_reason

MIN_CAPABILITY = (8, 0)
# From csrc/cdam_cuda_kernels.cu and cdam_cuda.h: query rows per block (grid y) and the scale slots.
ROWS_PER_BLOCK = 16
MAX_SCALES = 16


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"it runs CUDA tensors only (got a {device.type} tensor)"
    if why := dtype_reason(dtype):
        return why
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return f"it needs compute capability 8.0 or newer (bf16 tensor cores); this GPU is sm_{cap[0]}{cap[1]}"
    return cuda_extension.report()  # reports, never builds


def not_supported_reasons(call) -> list[str]:
    """Limits of the current launches: one-dimensional grids of at most 2^31 - 1 blocks (the
    largest is the multi-scale map's, B x N x N/256), int32 row and class counts and tap
    indices, at most MAX_SCALES scales."""
    why = unavailable_reason(call.device, call.compute_dtype) or cuda_extension.failure()  # builds on first use
    if why:
        return [why]
    B, N, M, C = call.batch, call.tokens(), call.keys(), call.classes()
    blocks = B * cdiv(N, ROWS_PER_BLOCK) * cdiv(max(M, C, 1), ROWS_PER_BLOCK)
    if call.op == "multiscale_cdam_map":
        blocks = max(blocks, B * N * cdiv(N, 256))
    reasons = limit_reason("launch blocks", blocks, INT32_MAX, "one-dimensional launch grid")
    reasons += limit_reason("rows or classes", max(N, M, C), INT32_MAX, "int32 sizes")
    if call.tensors.get("sim") is not None:
        reasons += limit_reason("scales", len(call.grid_sizes()), MAX_SCALES, "fixed scale slots")
        reasons += limit_reason("tap-table entries", 4 * N, INT32_MAX, "int32 tap indices")
    return reasons


ExtensionOps(cuda_extension.module, lambda v: v.contiguous()).export(globals())
