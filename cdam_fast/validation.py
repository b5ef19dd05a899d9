"""Argument checks: every error names the argument it is about.

Structural checks (type, rank, shapes, dtype, device) run in the Python wrappers, where they
cost nothing and are visible to torch.compile as plain Python. Value checks (finite values,
probabilities) read the data, so they run inside the ops, where a compiled graph treats them
as opaque; ``validate=False`` skips them.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROW_SUM_TOL = 1e-3
# bfloat16 keeps 8 significant bits: rounding a softmax row to it moves the sum by up to ~4e-3,
# so a bf16 row is held to twice that instead of rejecting every bf16 softmax output.
ROW_SUM_TOL_BF16 = 8e-3


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


def check_positive(name: str, x: float) -> float:
    # a chained comparison rather than math.isfinite: dynamo can evaluate it on a traced float
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not (0.0 < x < math.inf):
        raise CdamInputError(f"{name} must be a positive finite number, got {x!r}")
    return float(x)


def check_scales(scales) -> tuple:
    try:
        out = tuple(float(s) for s in scales)
    except TypeError:
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
