"""Forward + backward benchmark cases (docs/autograd.md): ``cdam-fast bench --set backward``.

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
from .cases import MULTISCALE_OPS, PAPER_C, PAPER_N, Case

TAG = "backward"
OPS = ("pairwise_jsd", "cdam_attention", "jsd_attention", "multiscale_cdam_attention")


def is_backward(case: Case) -> bool:
    return TAG in case.tags


def _case(op: str, N: int, D: int = 64, **kw) -> Case:
    return Case(op, N=N, D=D if op != "pairwise_jsd" else 0, tags=(TAG,), **kw)


def quick_cases() -> list[Case]:
    """Tiny fwd+bwd cases for --quick (compiled baselines skipped there, as for the forward)."""
    return [_case(op, 64, heavy_baselines=False) for op in OPS]


def cases() -> list[Case]:
    """The paper's crop (N = 784, C' = 101, D = 768: the issue's CPU targets) and larger N."""
    out = [_case(op, PAPER_N, 768, C=PAPER_C) for op in OPS]
    out += [_case("jsd_attention", 4096, 64), _case("cdam_attention", 4096, 64, modes=("recompute",)),
            _case("jsd_attention", 16384, 64, heavy_baselines=False)]
    return out


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
