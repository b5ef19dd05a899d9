"""Argument checks: every error names the argument it is about.

Structural checks (type, rank, shapes, dtype, device) run in the Python wrappers, where they
cost nothing and are visible to torch.compile as plain Python. Value checks (finite values,
probabilities) read the data, so they run inside the ops, where a compiled graph treats them
as opaque; ``validate=False`` skips them.
"""
from __future__ import annotations

import math
import numbers

import torch

from .constants import FLOAT32_MAX

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROW_SUM_TOL = 1e-3
# bfloat16 keeps 8 significant bits: rounding a softmax row to it moves the sum by up to ~4e-3,
# so a bf16 row is held to twice that instead of rejecting every bf16 softmax output.
ROW_SUM_TOL_BF16 = 8e-3


# The kernels take alpha and tau as float32 numbers and clamp what they derive from them
# (alpha log2 e, 1 / tau) to the float32 range, so any alpha / tau that float32 represents is
# computed safely (constants.py); beyond that range a parameter would become inf or 0.
ALPHA_MAX = FLOAT32_MAX
TAU_MIN = 2.0 ** -149  # the smallest positive float32 (a subnormal)
# memory_budget travels as a torch.library int (int64)
INT64_MAX = 2**63 - 1


class CdamInputError(ValueError):
    """Raised for arguments the ops cannot accept."""


def check_tensor(name: str, t, min_dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise CdamInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise CdamInputError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise CdamInputError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    for k, t in items[1:]:
        if t.device != items[0][1].device:
            raise CdamInputError(f"{k} is on {t.device} but {items[0][0]} is on {items[0][1].device}")


def check_batch(name: str, t: torch.Tensor, ref_name: str, ref_batch: tuple, dims: int) -> None:
    if tuple(t.shape[:-dims]) != tuple(ref_batch):
        raise CdamInputError(
            f"{name} has leading (batch) dimensions {tuple(t.shape[:-dims])} but {ref_name} has {tuple(ref_batch)}"
        )


def check_dim(name: str, size: int, what: str, expected: int, ref_name: str) -> None:
    if size != expected:
        raise CdamInputError(f"{name} has {what} {size} but {ref_name} implies {expected}")


def check_positive(name: str, x: float, lo: float = 0.0, hi: float = math.inf) -> float:
    """A positive finite number; `lo` / `hi` (inclusive) narrow it to the range the kernels support."""
    if isinstance(x, torch.Tensor):
        raise CdamInputError(f"{name} must be a Python number, not a tensor (a gradient cannot flow into it; "
                             f"pass float({name}) or {name}.item()), got {x!r}")
    if isinstance(x, numbers.Real) and not isinstance(x, (int, float, bool)):
        x = float(x)  # numpy scalars and other real number types
    # a chained comparison rather than math.isfinite: dynamo can evaluate it on a traced float
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not (0.0 < x < math.inf):
        raise CdamInputError(f"{name} must be a positive finite number, got {x!r}")
    if x < lo:
        raise CdamInputError(f"{name} must be at least {lo:.4g} (the float32 range the kernels compute in), got {x!r}")
    if x > hi:
        raise CdamInputError(f"{name} must be at most {hi:.4g} (the float32 range the kernels compute in), got {x!r}")
    return float(x)


def check_alpha(alpha) -> float:
    return check_positive("alpha", alpha, hi=ALPHA_MAX)


def check_tau(tau) -> float:
    return check_positive("tau", tau, lo=TAU_MIN)


def check_budget(x, name: str = "memory_budget") -> int:
    """A byte count: a non-negative int (not a bool) that fits in int64."""
    if not isinstance(x, int) or isinstance(x, bool) or not (0 <= x <= INT64_MAX):
        raise CdamInputError(f"{name} must be a non-negative integer number of bytes below 2**63, got {x!r}")
    return x


def check_scales(scales) -> tuple:
    if isinstance(scales, (str, bytes, torch.Tensor)) or not hasattr(scales, "__iter__"):
        raise CdamInputError(f"scales must be a sequence of numbers, got {scales!r}")
    items = list(scales)
    if any(isinstance(s, torch.Tensor) for s in items):
        raise CdamInputError(f"scales must be Python numbers, not tensors (no gradient flows into them), got {scales!r}")
    try:
        if any(isinstance(s, (bool, str, bytes)) for s in items):
            raise TypeError
        out = tuple(float(s) for s in items)
    except (TypeError, ValueError):
        raise CdamInputError(f"scales must be a sequence of numbers, got {scales!r}") from None
    if not out:
        raise CdamInputError("scales must not be empty")
    for s in out:
        if not (0.0 < s <= 1.0):
            raise CdamInputError(f"scales must lie in (0, 1], got {s}")
    return out


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise CdamInputError(f"{name} contains NaN or infinite values")


def check_distribution(name: str, p: torch.Tensor) -> None:
    """Rows of p must be probability distributions: finite, >= 0, summing to 1 (+-1e-3)."""
    if p.numel() == 0:
        return
    check_finite(name, p)
    if bool((p < 0).any()):
        raise CdamInputError(f"{name} has negative entries: rows must be probability distributions")
    tol = ROW_SUM_TOL_BF16 if p.dtype == torch.bfloat16 else ROW_SUM_TOL
    err = (p.float().sum(-1) - 1.0).abs().max().item()
    if err > tol:
        raise CdamInputError(
            f"rows of {name} must sum to 1 (tolerance {tol}); the worst row is off by {err:.3g}. "
            "Pass softmax probabilities, not logits or similarities"
        )


def negative_rows_as_nan(p: torch.Tensor) -> torch.Tensor:
    """validate=False: rows of distributions with a negative entry have no entropy, so every
    backend sees them as NaN rows (their divergences are NaN, and so is everything computed from
    them) instead of each backend's own arithmetic on logs of negatives. No host sync."""
    return torch.where((p < 0).any(-1, keepdim=True), math.nan, p)
