"""Triton kernels, grouped by op family; installed as cdam_fast.kernels."""
import warnings

# Block pointers are deprecated in favour of tensor descriptors, but they work on every Triton
# this package supports (3.2+) and need no TMA allocator; keep users' logs clean of the notice.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)
