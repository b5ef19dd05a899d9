"""Autograd for the cdam_fast ops: one backward custom op per op (backward_ops.py), which runs
the backward of the backend the forward ran on, and their registration (register.py). The
formulas live with each op (cdam_fast/opdefs); docs/autograd.md has the mathematics."""
from .register import register_autograd

__all__ = ["register_autograd"]
