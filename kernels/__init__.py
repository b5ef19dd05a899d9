"""Triton kernels, grouped by op family; installed as cdam_fast.kernels."""
