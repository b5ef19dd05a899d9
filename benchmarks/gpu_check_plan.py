"""What ``scripts/gpu_check.sh`` runs, in order of value, and the tiny forms its ``--dry-run`` uses.

The one home of the GPU check's stages, time limits, named pytest selections and headline
benchmark cases. A GPU machine is lent for at most 15 minutes of device time (its start and a
possible rerun included), so the check aims at ~6 minutes of work:

1. ``versions``: device, driver, clocks, library versions, commit (in the orchestrating process).
2. ``build`` (in the background from the start): the device's compiled extension (``cuda`` on a
   GPU, ``cpu`` in a CPU dry run), timed; abandoned with the reason past BUILD_LIMIT_S.
3. ``tests:*``: small named pytest selections (below), not the suite.
4. ``speed``: the headline table (HEADLINE), through the benchmark suite's runner; its forward
   cases first, then forward + backward (training step) pairs, then the torch.compile baselines.
5. ``profile``: torch.profiler's kernel table for the paper's crop.

Backward tests join by file name: any ``tests/test_*backward*.py``, ``test_*autograd*.py`` or
``test_*grad*.py`` is run by the ``tests:backward`` stage.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .cases import BACKWARD, PIPELINE, Case

# ------------------------------------------------------------------ time (seconds)

BUDGET_S = 390.0  # the whole check on a GPU; the device run's timeout_s must leave room above it
DRY_BUDGET_S = 170.0  # the CPU dry run (CI): the limit is 3 minutes
BUILD_LIMIT_S = 180.0  # the issue: skip the compiled backend if its build takes longer
MIN_STAGE_S = 10.0  # a stage that would get less than this is not started
# Time the earlier stages leave to these later ones, whatever they need themselves (the speed
# table is worth more than the last test selection).
RESERVED_S = {"speed": (100.0, 30.0), "profile": (20.0, 10.0)}  # (GPU, dry run)
STAGE_LIMITS_S = {  # (GPU, dry run); each stage also gets no more than the budget left
    "build": (BUILD_LIMIT_S, 150.0),
    "speed": (180.0, 60.0),  # torch.compile of two baselines comes last in it: ~30-60 s each
    "profile": (30.0, 25.0),
}


# ------------------------------------------------------------------ correctness: pytest selections

@dataclass(frozen=True)
class Selection:
    """A named subset of the pytest suite. ``{native}`` in args stands for the device's compiled
    backend ("cuda" on a GPU, "cpu" in a CPU dry run)."""
    name: str
    what: str
    args: tuple  # on a GPU
    dry_args: tuple  # in a dry run (CPU: Triton interpreted, reduced shapes)
    limit_s: tuple  # (GPU, dry run)
    needs_build: bool = False  # run only after the compiled extension built
    globs: tuple = ()  # test files found by name at run time (tests/<glob>)
    none_ok: bool = False  # an empty selection is "nothing to run yet", not a failure
    workers: int = 1  # pytest-xdist processes on a GPU, when xdist is installed


# One case per op and input dtype, at the production tiles and full shapes (N = 130, C' = 512,
# D = 1024 on a GPU: tests/test_ops_correctness.py shrinks shapes only under the interpreter),
# batched, the cross (q != p) forms and the extreme alphas that lg2.approx stresses.
OPS_KEYWORDS = "(c512 or batched or dtypes or extreme_alpha or q-big)"

GPU_ONLY = ("tests/test_kernels_triton.py", "tests/test_kernels_poly.py",
            "tests/test_ops_errors.py::test_cuda_and_cpu_mixed",
            "tests/test_ops_compile.py::test_compile_fullgraph",
            "tests/test_pipeline_segmenter.py::test_fp16_autocast_close_to_fp32",
            "tests/test_pipeline_segmenter.py::test_backends_agree_with_reference_pipeline")

SELECTIONS = (
    Selection("triton", "every op on the triton backend vs the float64 reference: full shapes, fp32/fp16/bf16, batched",
              args=("tests/test_ops_correctness.py", "-k", f"triton and {OPS_KEYWORDS}"),
              dry_args=("tests/test_ops_correctness.py", "-k", "triton and batched"),
              limit_s=(120.0, 60.0), workers=4),
    Selection("gpu-only", "GPU-only cases: mirrored tiles, polynomial logs, mixed devices, "
              "torch.compile, fp16 pipeline",
              args=GPU_ONLY, dry_args=("--collect-only", *GPU_ONLY), limit_s=(75.0, 30.0), workers=2),
    # (tests/test_cpu_backend.py's cuda cases are left to the full suite: its fixture builds the
    # CPU extension first, a minute of the lease for one backend the CPU machines test anyway.)
    Selection("native", "every op on the compiled backend ({native}) vs the float64 reference; cuda vs triton",
              args=("tests/test_ops_correctness.py", "tests/test_cuda_compile.py",
                    "-k", f"({{native}} and {OPS_KEYWORDS}) or matches_triton or auto_on_gpu"),
              dry_args=("tests/test_ops_correctness.py", "-k", "{native} and batched"),
              limit_s=(75.0, 40.0), needs_build=True, workers=2),
    Selection("backward", "backward passes (tests/test_*backward*.py, test_*autograd*.py, test_*grad*.py)",
              args=(), dry_args=("--collect-only",),
              globs=("test_*backward*.py", "test_*autograd*.py", "test_*grad*.py"),
              limit_s=(60.0, 20.0), none_ok=True, workers=2),
)


# ------------------------------------------------------------------ speed: the headline table

@dataclass(frozen=True)
class Headline:
    """One benchmark case of the headline table, its dry-run form and what runs beside it.

    group names the report's table: "sfu" (divergence kernels vs the SFU limit), "modes"
    (materialize vs recompute), "baselines" (fused vs published / torch.compile / reference),
    "lowmem" (N = 65536), "pipeline" (images/s), "backward" (each shape's forward and its
    forward + backward, paired in the report).
    """
    group: str
    case: Case
    dry: Case | None  # None: not run in the dry run (dry_note says why)
    baselines: tuple = ()
    fast: bool = True  # False: baselines only (torch.compile, run last: it compiles for tens of seconds)
    dry_note: str = ""
    triton_only: bool = False  # heavy cases: the cuda fallback backend is left out (time)


BOTH = ("materialize", "recompute", "auto")
CROP = Case("multiscale_cdam_attention", B=16, N=784, C=101, D=768, modes=BOTH)  # the paper's crop, 7 scales
DRY_CROP = Case("multiscale_cdam_attention", B=2, N=49, C=101, D=16, modes=BOTH)
JSD_4096 = Case("jsd_attention", N=4096, C=101, D=768)
DRY_JSD = Case("jsd_attention", N=64, C=101, D=32)
COMPILE_NOTE = "skipped: dry run (torch.compile of the formula takes tens of seconds on CPU)"
PIPELINE_MODEL, DRY_PIPELINE_MODEL = "ViT-B-16", "ViT-S-32"

# The training step: backward time (forward + backward minus forward) over the forward time.
BACKWARD_RATIO_TARGET = 2.5
BACKWARD_RATIO_TARGETS = {"multiscale_cdam_attention": 3.0}  # per op, where it differs


def _forward_and_backward(case: Case, dry: Case) -> tuple:
    """The forward and the forward + backward (benchmarks/backward.py: the case tagged BACKWARD) of
    one shape, beside autograd through the reference (the baseline "reference" times that)."""
    return tuple(Headline("backward", replace(case, tags=tags), replace(dry, tags=tags), baselines=("reference",))
                 for tags in ((), (BACKWARD,)))


# After the forward cases, before the compile baselines: losing them to the time limit costs less
# than losing a forward row, more than losing torch.compile. The crop at B = 4, not 16: autograd
# through the reference keeps ~N^2 C' x 7.5 scales floats per image (~30 GB at B = 4).
BACKWARD_HEADLINE = (
    *_forward_and_backward(replace(CROP, B=4, modes=("auto",)), replace(DRY_CROP, B=1, modes=("auto",))),
    *_forward_and_backward(Case("cdam_attention", N=4096, C=101, D=64), Case("cdam_attention", N=64, C=101, D=16)),
    *_forward_and_backward(Case("jsd_attention", N=4096, C=101, D=64), Case("jsd_attention", N=64, C=101, D=16)),
)

HEADLINE = (
    Headline("sfu", Case("pairwise_jsd", N=4096, C=101), Case("pairwise_jsd", N=64, C=101)),
    Headline("sfu", Case("cdam_attention", N=4096, C=101, D=64, modes=BOTH),
             Case("cdam_attention", N=64, C=101, D=16, modes=BOTH)),
    Headline("sfu", Case("jsd_attention", N=4096, C=101, D=64), Case("jsd_attention", N=64, C=101, D=16),
             baselines=("published",)),
    Headline("baselines", CROP, DRY_CROP, baselines=("published", "reference")),
    Headline("baselines", JSD_4096, DRY_JSD, baselines=("published",)),
    Headline("modes", Case("cdam_attention", N=4096, C=101, D=768, modes=BOTH),
             Case("cdam_attention", N=64, C=101, D=32, modes=BOTH)),
    Headline("lowmem", Case("cdam_attention", N=65536, C=101, D=64, modes=("recompute",)),
             Case("cdam_attention", N=256, C=101, D=16, modes=("recompute",)), baselines=("published",),
             triton_only=True),
    Headline("lowmem", Case("jsd_attention", N=65536, C=101, D=64), Case("jsd_attention", N=256, C=101, D=16),
             triton_only=True),
    Headline("pipeline", Case(PIPELINE, C=21, image=(480, 640)), Case(PIPELINE, C=21, image=(448, 448)),
             baselines=("published",), triton_only=True),
    *BACKWARD_HEADLINE,
    Headline("baselines", CROP, None, baselines=("compile",), fast=False, dry_note=COMPILE_NOTE),
    Headline("baselines", JSD_4096, None, baselines=("compile",), fast=False, dry_note=COMPILE_NOTE),
)

# torch.profiler's kernel table: the paper's crop on the first fast backend, a few calls.
PROFILE_CASE, DRY_PROFILE_CASE = CROP, DRY_CROP
PROFILE_CALLS = 3
PROFILE_ROWS = 15
