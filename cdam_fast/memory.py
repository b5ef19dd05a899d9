"""The one policy for materialize vs recompute and the memory budget, shared by every backend.

Rule: ``mode="auto"`` materialises exactly when what materialize mode keeps between the two
passes fits in the budget. What it keeps is the float32 divergences of every scale, summed over
the batch: ``4 * B * sum_s n_s^2`` bytes (one scale with n_s = N for ``cdam_attention``). Every
fused backend asks :func:`materialize` with that count, so a given call makes the same choice on
all of them; the reference backend sizes its row blocks to the budget instead.

The budget defaults to :data:`DEFAULT_MEMORY_BUDGET`, or to the environment variable
``CDAM_FAST_MEMORY_BUDGET`` (bytes), read at each call so that a bad value never breaks
``import cdam_fast`` and a changed value takes effect.
"""
from __future__ import annotations

import os

from . import grids
from .validation import CdamInputError, check_budget

#: Built-in budget (bytes) for ``memory_budget=None`` when CDAM_FAST_MEMORY_BUDGET is unset.
DEFAULT_MEMORY_BUDGET = 1 << 30
BUDGET_ENV = "CDAM_FAST_MEMORY_BUDGET"
MODES = ("auto", "materialize", "recompute")
FLOAT32_BYTES = 4


def default_budget() -> int:
    """CDAM_FAST_MEMORY_BUDGET if set (a non-negative integer of bytes), else DEFAULT_MEMORY_BUDGET."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_MEMORY_BUDGET
    try:
        value = int(raw)
    except ValueError:
        raise CdamInputError(f"environment variable {BUDGET_ENV} must be a non-negative integer number of "
                             f"bytes, got {raw!r}") from None
    return check_budget(value, f"environment variable {BUDGET_ENV}")


def resolve_budget(memory_budget) -> int:
    """The budget a call uses: its own (checked) or the default."""
    return default_budget() if memory_budget is None else check_budget(memory_budget)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise CdamInputError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def materialized_bytes(B: int, grid_sizes) -> int:
    """Bytes that materialize mode keeps: float32 divergences [B, n_s, n_s] of every scale."""
    return sum(FLOAT32_BYTES * B * n * n for n in grid_sizes)


def multiscale_grid_sizes(h: int, w: int, scales) -> list[int]:
    """n_s = h_s * w_s of each scale (spec 2.1)."""
    return [hs * ws for hs, ws in (grids.scale_grid(h, w, s) for s in scales)]


def materialize(mode: str, nbytes: int, memory_budget: int) -> bool:
    """Whether to keep the divergences between passes: `nbytes` is materialized_bytes of the call."""
    if mode == "materialize":
        return True
    if mode == "recompute":
        return False
    return nbytes <= memory_budget
