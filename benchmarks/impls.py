"""What gets timed for a case: the package's backends and the baselines beside them.

Backends ("triton", "cuda", "cpu") run through the public ops with validate=False (the value
checks are input validation, not the computation being compared). Baselines:

* "reference": the package's chunked pure-torch reference (backend="reference"),
* "published": the published implementation's order of operations (baselines.py),
* "compile": torch.compile of the plain broadcast formula (baselines.py),
* "keops": a pykeops LazyTensor form, when pykeops is installed (keops_baseline.py).
"""
from __future__ import annotations

from typing import Callable

import torch

import cdam_fast
from cdam_fast.grids import CDAM_SCALES

from . import baselines, keops_baseline
from .cases import MODE_OPS, MULTISCALE_OPS, Case
from .inputs import dtype_of

FAST_BACKENDS = ("triton", "cuda", "cpu")
BASELINES = ("reference", "published", "compile", "keops")


def usable_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """{fast backend: None if it will be benchmarked on `device`, else why not}.

    Triton on a CPU device would be Triton's numpy interpreter, a correctness tool that is
    orders of magnitude slower than anything else: it is never benchmarked.
    """
    reasons = cdam_fast.available_backends(device, dtype)
    out = {name: reasons.get(name, "unknown backend") for name in FAST_BACKENDS}
    if device.type != "cuda":
        out["triton"] = "Triton on CPU would be its interpreter, which is not benchmarked"
    return out


def op_callable(op: str, impl: str, mode: str | None) -> Callable[[tuple], object]:
    """f(inputs) running `op` with implementation `impl` on one input set."""
    scales = CDAM_SCALES
    if impl in FAST_BACKENDS or impl == "reference":
        fn = getattr(cdam_fast, op)
        kwargs = {"backend": impl, "validate": False}
        if op in MULTISCALE_OPS:
            kwargs["scales"] = scales
        if op in MODE_OPS and mode is not None:
            kwargs["mode"] = mode
        return lambda args: fn(*args, **kwargs)
    if impl == "published":
        fn = baselines.PUBLISHED[op]
    elif impl == "compile":
        fn = baselines.compiled(op)
    elif impl == "keops":
        fn = keops_baseline.FUNCTIONS[op]
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    if op in MULTISCALE_OPS:
        return lambda args: fn(*args, scales)
    return lambda args: fn(*args)


def baseline_skip_reason(case: Case, impl: str, quick_heavy_note: str | None = None) -> str | None:
    """Why baseline `impl` does not run for `case` (None: it runs)."""
    if impl == "keops":
        why = keops_baseline.unavailable_reason(case.op)
        if why:
            return why if why.startswith("n/a") else f"skipped: {why}"
    if impl in ("compile", "keops") and not case.heavy_baselines:
        return quick_heavy_note or "skipped: compiled baselines limited to one case in this set"
    return None


def estimated_bytes(case: Case, impl: str) -> int:
    """Rough peak working memory of a baseline (bytes): the CPU guard against swapping to death."""
    pairs = case.N * case.N
    if impl == "published":  # per crop: mixture, its x log x, and a few N x N maps
        item = 4  # fp32 on CPU
        return 3 * pairs * case.C * item + 4 * pairs * item
    if impl == "compile":  # in the worst case inductor keeps the broadcast tensor
        return case.B * pairs * case.C * 4 + 3 * case.B * pairs * 4
    if impl == "reference":  # J and A in full, plus a bounded chunk
        return 3 * case.B * pairs * max(4, dtype_of(case.dtype).itemsize) + (16 << 20)
    return 0
