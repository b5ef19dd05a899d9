"""Forward, backward and forward + backward of multiscale_cdam_attention on the cpu backend, side by
side in one process: the fused backward (csrc/cdam_cpu_multiscale_backward.cpp), the composite it
replaced (the op's formulas, cdam_fast/opdefs/multiscale.py, on the backend's divergence and its
fused pairwise_jsd backward, for the comparison only) and plain fp32 autograd through the broadcasting
formula (benchmarks/baselines.plain_multiscale_cdam_attention). Implementations alternate within
each repeat; medians. With --memory, the peak of one forward + backward per (implementation, N),
each in a fresh process (growth of ru_maxrss over the step, after a warm-up step).

    python -m cdam_fast.benchmarks.multiscale_backward [--grid 28] [--C 101] [--D 768] [--threads 2]
    python -m cdam_fast.benchmarks.multiscale_backward --memory [--grids 28 32 64]
    python -m cdam_fast.benchmarks.multiscale_backward --backend triton   # on a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import cdam_fast as cf
from cdam_fast import dispatch
from cdam_fast.grids import CDAM_SCALES

from .baselines import plain_multiscale_cdam_attention

IMPLS = ("fused", "composite", "plain autograd")


BACKENDS = ("cpu", "triton")


@contextlib.contextmanager
def _backward_of(impl: str, backend: str):
    """The backend's multi-scale attention backward as `impl` for the duration: "composite" takes
    its own method away, so Backend.backward runs the op's formulas on the backend's kernels."""
    cls = type(dispatch.backend(backend))
    fused = cls.multiscale_cdam_attention_backward
    if impl == "composite":
        cls.multiscale_cdam_attention_backward = None
    try:
        yield
    finally:
        cls.multiscale_cdam_attention_backward = fused


def _forward(impl: str, mode: str, backend: str):
    if impl == "plain autograd":
        return lambda s, v: plain_multiscale_cdam_attention(s, v, CDAM_SCALES)
    return lambda s, v: cf.multiscale_cdam_attention(s, v, CDAM_SCALES, mode=mode, backend=backend)


def _inputs(grid: int, C: int, D: int, backend: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda" if backend == "triton" else "cpu")
    return tuple(t.to(dev) for t in (torch.randn(1, C, grid, grid, generator=g) * 0.3,
                                     torch.randn(1, grid * grid, D, generator=g),
                                     torch.randn(1, grid * grid, D, generator=g)))


def _step(impl: str, mode: str, inputs, backend: str = "cpu") -> tuple[float, float]:
    sim, v, g = inputs
    sync = torch.cuda.synchronize if sim.is_cuda else (lambda: None)
    leaves = [sim.clone().requires_grad_(True), v.clone().requires_grad_(True)]
    with _backward_of(impl, backend):
        sync()
        t0 = time.perf_counter()
        out = _forward(impl, mode, backend)(*leaves)
        sync()
        t1 = time.perf_counter()
        out.backward(g)
        sync()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def timing(a) -> None:
    torch.set_num_threads(a.threads)
    inputs = _inputs(a.grid, a.C, a.D, a.backend)
    impls = [i for i in IMPLS if i != "plain autograd" or not a.no_plain]
    for impl in impls:  # warm-up (builds / loads the extensions, compiles the kernels)
        _step(impl, a.mode, inputs, a.backend)
    times = {i: [] for i in impls}
    for _ in range(a.repeats):
        for impl in impls:
            times[impl].append(_step(impl, a.mode, inputs, a.backend))
    n = a.grid * a.grid
    where = torch.cuda.get_device_name() if a.backend == "triton" else f"{a.threads} threads"
    print(f"multiscale_cdam_attention on {a.backend}, 7 scales, N = {n} ({a.grid} x {a.grid}), C' = {a.C}, "
          f"D = {a.D}, fp32, {where}, mode {a.mode}, {a.repeats} repeats (median ms, implementations alternating)")
    med = {i: tuple(statistics.median(x) * 1e3 for x in zip(*t)) for i, t in times.items()}
    step = {i: statistics.median(f + b for f, b in t) * 1e3 for i, t in times.items()}
    base = step.get("plain autograd")
    print("| implementation | forward | backward | forward + backward | backward / forward |"
          + (" speed-up of fwd + bwd vs plain autograd |" if base else ""))
    print("|---|---|---|---|---|" + ("---|" if base else ""))
    for impl in impls:
        f, b = med[impl]
        print(f"| {impl} | {f:.1f} | {b:.1f} | {step[impl]:.1f} | {b / f:.1f} |"
              + (f" {base / step[impl]:.1f}x |" if base else ""))


_MEMORY_CHILD = "--_memory-child"


def _memory_child(impl: str, mode: str, grid: int, C: int, D: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _step(impl, mode, _inputs(4, C, D))  # warm-up: extensions, allocator
    inputs = _inputs(grid, C, D)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(impl, mode, inputs)
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))


def memory(a) -> None:
    print(f"peak of one forward + backward (ru_maxrss growth, MiB, fresh process per cell), C' = {a.C}, "
          f"D = {a.D}, {a.threads} threads, 7 scales")
    impls = [tuple(x.split(":")) for x in a.cells]
    print("| N | " + " | ".join(f"{i} ({m})" for i, m in impls) + " |")
    print("|---|" + "---|" * len(impls))
    for grid in a.grids:
        cells = []
        for impl, mode in impls:
            out = subprocess.run([sys.executable, "-m", "cdam_fast.benchmarks.multiscale_backward", _MEMORY_CHILD,
                                  impl, mode, str(grid), str(a.C), str(a.D), str(a.threads)],
                                 capture_output=True, text=True)
            cells.append(f"{json.loads(out.stdout.strip().splitlines()[-1]):.0f}" if out.returncode == 0
                         else f"failed ({out.stderr.strip().splitlines()[-1][:60] if out.stderr.strip() else '?'})")
        print(f"| {grid * grid} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == _MEMORY_CHILD:
        impl, mode, grid, C, D, threads = argv[1:]
        return _memory_child(impl, mode, int(grid), int(C), int(D), int(threads))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=28, help="h = w; N = grid^2")
    ap.add_argument("--C", type=int, default=101)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="cpu", choices=BACKENDS, help="triton: CUDA tensors (timing only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mode", default="recompute", choices=("auto", "materialize", "recompute"))
    ap.add_argument("--no-plain", action="store_true", help="skip plain autograd (N^2 C' memory)")
    ap.add_argument("--memory", action="store_true", help="peak memory per (implementation, N) instead")
    ap.add_argument("--grids", type=int, nargs="+", default=[28, 32, 64], help="grids of --memory")
    ap.add_argument("--cells", nargs="+", default=["fused:recompute", "composite:recompute", "fused:auto"],
                    help="implementation:mode columns of --memory")
    a = ap.parse_args(argv)
    memory(a) if a.memory else timing(a)


if __name__ == "__main__":
    main()
