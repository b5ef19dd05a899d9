"""Benchmark cases and the named sets they are grouped into (``cdam-fast bench --set NAME``).

C values are C' = dataset classes + 80 augmented prompts: 21 (VOC21 without prompts), 101
(VOC21), 140 (Context60), 160 (COCO-Object), 251 (COCO-Stuff 171). N = h * w patches; the
paper's crop is 448 px at patch 16, i.e. 28 x 28 = 784.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cdam_fast.grids import CDAM_SCALES
from cdam_fast.memory import multiscale_grid_sizes
# the op lists come from the op specifications (cdam_fast.opspec), their one home
from cdam_fast.opspec import ATTENTION_OPS, MODE_OPS, MULTISCALE_OPS  # noqa: F401  (re-exported)
from cdam_fast.opspec import OP_NAMES as OPS
PIPELINE = "pipeline"
PAPER_N, PAPER_C = 784, 101
BACKWARD = "backward"  # the tag of a forward + backward case (benchmarks/backward.py times it)
BACKWARD_LABEL = "fwd+bwd"  # what Case.label() appends for such a case
BACKWARD_OPS = ("pairwise_jsd", "cdam_attention", "jsd_attention", "multiscale_cdam_attention")


@dataclass(frozen=True)
class Case:
    """One shape of one op. Backends run it once per mode in ``modes``; baselines once."""
    op: str
    B: int = 1
    N: int = PAPER_N
    C: int = PAPER_C
    D: int = 0  # value width; 0 for the ops that return maps
    dtype: str = "float32"
    modes: tuple = ("auto",)
    # torch.compile and KeOps compile per shape (tens of seconds on CPU); --quick limits them.
    heavy_baselines: bool = True
    image: tuple = (0, 0)  # pipeline cases: (height, width) of the image
    tags: tuple = ()  # "quick": the pipeline case reports itself skipped

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch grid; N must be a square for the multi-scale ops."""
        side = math.isqrt(self.N)
        return side, self.N // side if side else 0

    def label(self) -> str:
        if self.op == PIPELINE:
            return f"pipeline {self.image[0]}x{self.image[1]} C={self.C}"
        parts = [self.op, f"B={self.B}", f"N={self.N}", f"C={self.C}"]
        if self.D:
            parts.append(f"D={self.D}")
        if self.dtype != "float32":
            parts.append(self.dtype)
        if is_backward(self):
            parts.append(BACKWARD_LABEL)
        return " ".join(parts)


def is_backward(case: Case) -> bool:
    return BACKWARD in case.tags


def divergence_elements(case: Case, scales=CDAM_SCALES) -> int | None:
    """Pairs x classes the op evaluates the divergence over (N^2 C per scale, times B).

    This is the roofline's work count: every element needs one logarithm. None for the
    pipeline, whose cost is not only divergences.
    """
    if case.op == PIPELINE:
        return None
    if case.op in MULTISCALE_OPS:
        return case.B * case.C * sum(n * n for n in multiscale_grid_sizes(*case.grid, scales))
    return case.B * case.N * case.N * case.C


def _each_op(N, C=PAPER_C, B=1, D=64, **kw):
    return [Case(op, B=B, N=N, C=C, D=D if op in ATTENTION_OPS else 0, **kw) for op in OPS]


def _quick():
    cases = []
    for N in (64, 196):
        for case in _each_op(N, heavy_baselines=False):
            if case.op in MODE_OPS:
                case = replace(case, modes=("materialize", "recompute"))
            if case.op == "cdam_attention" and N == 64:
                # torch.compile / KeOps run on this one case only: compiling every shape would
                # take minutes on CPU; the other cases carry an explicit "skipped" row.
                case = replace(case, heavy_baselines=True)
            cases.append(case)
    cases.append(Case("cdam_attention", B=4, N=64, C=21, D=64, heavy_baselines=False))
    cases.append(Case(PIPELINE, C=21, image=(448, 448), tags=("quick",)))
    return cases + backward_quick_cases()


def _backward_case(op: str, N: int, D: int = 64, **kw) -> Case:
    return Case(op, N=N, D=D if op != "pairwise_jsd" else 0, tags=(BACKWARD,), **kw)


def backward_quick_cases() -> list[Case]:
    """Tiny fwd+bwd cases for --quick (compiled baselines skipped there, as for the forward)."""
    return [_backward_case(op, 64, heavy_baselines=False) for op in BACKWARD_OPS]


def backward_cases() -> list[Case]:
    """The paper's crop (N = 784, C' = 101, D = 768: the issue's CPU targets) and larger N."""
    out = [_backward_case(op, PAPER_N, 768, C=PAPER_C) for op in BACKWARD_OPS]
    out += [_backward_case("jsd_attention", 4096, 64),
            _backward_case("cdam_attention", 4096, 64, modes=("recompute",)),
            _backward_case("jsd_attention", 16384, 64, heavy_baselines=False)]
    return out


def _ops():
    return [c for N in (196, 784, 4096, 16384) for c in _each_op(N)]


def _sweep():
    cases = []
    for op in ("pairwise_jsd", "cdam_attention", "jsd_attention"):
        d = 64 if op in ATTENTION_OPS else 0
        for N in (784, 4096):
            for C in (21, 101, 160, 251):
                cases.append(Case(op, N=N, C=C, D=d))
        if d:
            for B in (1, 8, 64):
                for D in (64, 768):
                    cases.append(Case(op, B=B, N=784, D=D))
            cases.append(Case(op, N=4096, D=768))
            for dtype in ("float16", "bfloat16"):
                cases.append(Case(op, B=8, N=784, D=768, dtype=dtype))
    return cases


def _multiscale():
    cases = []
    for op in MULTISCALE_OPS:
        d = 768 if op == "multiscale_cdam_attention" else 0
        for B in (1, 16):
            cases.append(Case(op, B=B, N=PAPER_N, C=PAPER_C, D=d))
        cases.append(Case(op, B=1, N=PAPER_N, C=251, D=d))
        cases.append(Case(op, B=1, N=4096, C=PAPER_C, D=d))
    return cases


def _lowmem():
    both = ("materialize", "recompute")
    return [
        Case("cdam_attention", N=4096, D=64, modes=both),
        Case("cdam_attention", N=16384, D=64, modes=both),
        Case("cdam_attention", N=65536, D=64, modes=("recompute",)),
        Case("multiscale_cdam_attention", N=16384, D=64, modes=both),
        Case("multiscale_cdam_attention", N=65536, D=64, modes=("recompute",)),
        Case("jsd_attention", N=16384, D=64),
        Case("jsd_attention", N=65536, D=64),
    ]


def _pipeline():
    # 448 x 448 is one window; 480 x 640 (a typical VOC image) resizes to 448 x 597: 2 windows;
    # 1024 x 2048 (a Cityscapes frame, 19 classes) resizes to 448 x 896: 3 windows.
    return [Case(PIPELINE, C=21, image=(448, 448)), Case(PIPELINE, C=21, image=(480, 640)),
            Case(PIPELINE, C=19, image=(1024, 2048))]


def _dedupe(cases):
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


SETS = {
    "quick": (_quick, "every op at tiny sizes (N = 64, 196), for CPU smoke runs and the tests"),
    "ops": (_ops, "every op at N = 196, 784, 4096, 16384 (C' = 101, D = 64, batch 1)"),
    "sweep": (_sweep, "C' from 21 to 251, D = 64 / 768, batch 1 to 64, fp16 / bf16 inputs"),
    "multiscale": (_multiscale, "the seven-scale CDAM at the paper's crop (N = 784, C' = 101) and beyond"),
    "lowmem": (_lowmem, "materialize vs recompute up to N = 65536, where the baselines run out of memory"),
    "backward": (backward_cases, "forward + backward of the ops (N = 784, C' = 101, D = 768 and up) "
                 "against autograd through the reference, torch.compile and KeOps"),
    "pipeline": (_pipeline, "the whole pipeline per image (cdam_fast.pipeline.Segmenter)"),
    "gpu-full": (lambda: _dedupe(_ops() + _sweep() + _multiscale() + _lowmem() + _pipeline() + backward_cases()),
                 "everything above: the full GPU measurement"),
}


def build_cases(names) -> list[Case]:
    """The cases of the named sets, in order, without duplicates."""
    cases = []
    for name in names:
        if name not in SETS:
            raise ValueError(f"unknown benchmark set {name!r}; choose from {', '.join(SETS)}")
        cases += SETS[name][0]()
    return _dedupe(cases)
