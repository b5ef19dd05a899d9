"""Autograd for the cdam_fast ops: backward formulas (reference.py), backward custom ops with
fused kernels where a backend has them (ops.py) and their registration (register.py).
See docs/autograd.md for the mathematics."""
from .register import register_autograd

__all__ = ["register_autograd"]
