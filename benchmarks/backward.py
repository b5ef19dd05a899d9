"""Forward + backward benchmarks (docs/autograd.md): ``cdam-fast bench --set backward``.

A case tagged "backward" times one training step of the op: the forward on fresh leaf tensors
that require grad, then ``out.backward(ones)`` (the gradient of out.sum()). Implementations:

* backends ("cpu", "triton", "cuda"): the public ops with their registered fused backward,
* "reference": torch autograd *through* the chunked pure-torch reference (cdam_fast.reference
  called directly, not the op; every chunk's intermediates are saved: N^2 C memory),
* "published": autograd through the published order of operations,
* "compile": torch.compile of the plain formula, forward and backward (AOTAutograd),
* "keops": the pykeops LazyTensor forms with KeOps' own autograd, when installed.
Peak memory is what the step adds (CUDA allocator peak, or RSS high-water growth on CPU).
"""
from __future__ import annotations

from typing import Callable

from cdam_fast import reference as ref
from cdam_fast.grids import CDAM_SCALES

from . import impls
# The cases live with the other case lists (cases.py); the names here are kept for callers.
from .cases import BACKWARD_OPS as OPS, MULTISCALE_OPS, Case
from .cases import backward_cases as cases, backward_quick_cases as quick_cases, is_backward  # noqa: F401


_REFERENCE = {
    "pairwise_jsd": lambda p: ref.pairwise_jsd(p),
    "cdam_attention": lambda p, v: ref.cdam_attention(p, v),
    "jsd_attention": lambda p, v: ref.jsd_attention(p, v),
    "multiscale_cdam_attention": lambda s, v: ref.multiscale_cdam_attention(s, v, CDAM_SCALES),
}


def op_callable(op: str, impl: str, mode: str | None) -> Callable[[tuple], object]:
    """f(inputs): one forward + backward step of `op` with implementation `impl`."""
    forward = (lambda args: _REFERENCE[op](*args)) if impl == "reference" else impls.op_callable(op, impl, mode)

    def step(args):
        leaves = [t.detach().requires_grad_(True) for t in args]
        out = forward(tuple(leaves))
        out.backward(out.new_ones(()).expand(out.shape))
        return [t.grad for t in leaves]

    if op not in _REFERENCE:
        raise ValueError(f"no backward benchmark for {op!r} (choose from {', '.join(OPS)})")
    return step


def estimated_bytes(case: Case, impl: str) -> int:
    """Rough peak of a baseline's fwd + bwd: autograd keeps the chunks' [rows, N, C] intermediates."""
    if impl in ("reference", "published", "compile"):
        scales = 1.07 * len(CDAM_SCALES) if case.op in MULTISCALE_OPS else 1
        return int(4 * case.B * case.N * case.N * case.C * 4 * scales) + impls.estimated_bytes(case, impl)
    return 0
