"""The C++ CPU backend (csrc/cdam_cpu.cpp), compiled just in time on first use.

The kernels use the entropy form of the divergence, one log2 per (row, key, class):
r_i = sum_c p_ic (log2 p_ic + 1), J_ij = (ln 2 / 2)(r_i + r'_j - sum_c s log2 s) with
s = p_ic + q_jc, accumulated in float32 (the reference uses the literal mixture-entropy
formula instead, so the two are independent). Inputs are converted to float32 here;
maps come back float32, attention outputs in v's dtype.
"""
from __future__ import annotations

import torch

from .extension_build import cpu_extension
from .shared import ExtensionOps, dtype_reason


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"it runs CPU tensors only (got a {device.type} tensor)"
    return dtype_reason(dtype) or cpu_extension.report()  # reports, never builds


def not_supported_reasons(call) -> list[str]:
    # The kernels index with int64 and loop over the batch: no size limits beyond memory.
    why = unavailable_reason(call.device, call.compute_dtype) or cpu_extension.failure()  # builds on first use
    return [why] if why else []


ExtensionOps(cpu_extension.module, lambda v: v.to(torch.float32).contiguous()).export(globals())
