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
from .shared import ExtensionOps, dtype_reason

MIN_CAPABILITY = (8, 0)


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


ExtensionOps(cuda_extension.module, lambda v: v.contiguous()).export(globals())
