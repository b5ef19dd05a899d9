"""The CUDA C++ backend (csrc/cdam_cuda.cpp + cdam_cuda_kernels.cu), compiled just in time.

A fallback beside the Triton kernels: the same ops with lg2.approx divergences accumulated in
float32 and the products with v on the tensor cores (WMMA; float32 v is split into two bf16
parts). Built for sm_80 and sm_90, and only on a machine with a CUDA GPU. Multi-scale calls
always keep the smaller grids' divergences (at most 0.76 N^2 floats each); "recompute" only
avoids storing the full grid's N x N ones.
"""
from __future__ import annotations

import torch

from .cpu_backend import SUPPORTED_DTYPES, materialized_bytes, multiscale_inputs, use_materialize
from .extension_build import cuda_extension

MIN_CAPABILITY = (8, 0)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"it runs CUDA tensors only (got a {device.type} tensor)"
    if dtype == torch.float64:
        return "float64 inputs are computed by the reference backend"
    if dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {dtype}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return f"it needs compute capability 8.0 or newer (bf16 tensor cores); this GPU is sm_{cap[0]}{cap[1]}"
    return cuda_extension.failure()


def _ext():
    return cuda_extension.module()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def pairwise_jsd(p, q):
    return _ext().pairwise_jsd(_f32(p), _f32(q))


def cdam_map(p, alpha):
    return _ext().cdam_map(_f32(p), float(alpha))


def cdam_attention(p, v, alpha, mode, memory_budget):
    B, N, _ = p.shape
    materialize = use_materialize(mode, 4 * B * N * N, memory_budget)
    return _ext().cdam_attention(_f32(p), v.contiguous(), float(alpha), materialize).to(v.dtype)


def multiscale_cdam_map(sim, scales, tau, alpha):
    ps, idx, wts = multiscale_inputs(sim, scales, tau)
    return _ext().multiscale_cdam_map(ps, idx, wts, sim.shape[2] * sim.shape[3], float(alpha))


def multiscale_cdam_attention(sim, v, scales, tau, alpha, mode, memory_budget):
    ps, idx, wts = multiscale_inputs(sim, scales, tau)
    materialize = use_materialize(mode, materialized_bytes(ps), memory_budget)
    return _ext().multiscale_cdam_attention(ps, idx, wts, v.contiguous(), float(alpha), materialize).to(v.dtype)


def jsd_attention(p, v, tau, q):
    return _ext().jsd_attention(_f32(p), v.contiguous(), float(tau), _f32(q)).to(v.dtype)
