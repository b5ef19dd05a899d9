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
from .shared import GRID_YZ_MAX, INT32_MAX, ExtensionOps, cdiv, dtype_reason, limit_reason

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
    return cuda_extension.failure()


def not_supported_reasons(call) -> list[str]:
    """Limits of the current launches: the batch on grid z (grid y for the upsampled row
    statistics), query-row blocks on grid y, N itself on grid y in the multi-scale map, int32
    row and class counts and tap indices, at most MAX_SCALES scales."""
    why = unavailable_reason(call.device, call.compute_dtype)
    if why:
        return [why]
    B, N, M, C = call.batch, call.tokens(), call.keys(), call.classes()
    reasons = limit_reason("batch", B, GRID_YZ_MAX, "launch-grid z")
    reasons += limit_reason("query-row blocks", cdiv(N, ROWS_PER_BLOCK), GRID_YZ_MAX, "launch-grid y")
    reasons += limit_reason("rows or classes", max(N, M, C), INT32_MAX, "int32 sizes")
    if call.tensors.get("sim") is not None:
        reasons += limit_reason("scales", len(call.grid_sizes()), MAX_SCALES, "fixed scale slots")
        reasons += limit_reason("tap-table entries", 4 * N, INT32_MAX, "int32 tap indices")
        if call.op == "multiscale_cdam_map":
            reasons += limit_reason("N", N, GRID_YZ_MAX, "the multi-scale map puts N on launch-grid y")
    return reasons


ExtensionOps(cuda_extension.module, lambda v: v.contiguous()).export(globals())
