"""The backward alone of cdam_map / multiscale_cdam_attention on one backend, side by side: the
backend's registered backward (the column named "composite"; since the fused multi-scale backward,
csrc/cdam_cpu_multiscale_backward.cpp / kernels/multiscale_backward.py, that is the fused one:
benchmarks/multiscale_backward.py compares it with the composite) against the reference formulas
on the same forward (the ops taken out of that backend's backward_ops), in one process,
alternating.

    python -m cdam_fast.benchmarks.composite_backward [--grid 28] [--C 101] [--D 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

import cdam_fast as cf
from cdam_fast import dispatch
from cdam_fast.opspec import COMPOSITE_BACKWARD_OPS
from cdam_fast.grids import CDAM_SCALES


def _backward_seconds(fn, inputs) -> float:
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    sync = torch.cuda.synchronize if out.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out.square().sum().backward()
    sync()
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=28, help="h = w; N = grid^2")
    ap.add_argument("--C", type=int, default=101)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="cpu", choices=("cpu", "triton"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(0)
    n = a.grid * a.grid
    sim = (torch.randn(1, a.C, a.grid, a.grid, generator=g) * 0.3).to(dev)
    v = torch.randn(1, n, a.D, generator=g).to(dev)
    p = torch.softmax(torch.randn(1, n, a.C, generator=g) * 3, -1).to(dev)
    cases = {"cdam_map": (lambda p: cf.cdam_map(p, backend=a.backend), [p]),
             "multiscale_cdam_attention": (lambda s, v: cf.multiscale_cdam_attention(s, v, CDAM_SCALES,
                                                                                     backend=a.backend), [sim, v])}
    cls = type(dispatch.backend(a.backend))
    fused = cls.backward_ops
    without = tuple(op for op in fused if op not in COMPOSITE_BACKWARD_OPS)
    try:
        for op, (fn, inputs) in cases.items():
            best = {}
            for _ in range(a.repeats):
                for kind, declared in (("composite", fused), ("reference formulas", without)):
                    cls.backward_ops = declared
                    best[kind] = min(best.get(kind, float("inf")), _backward_seconds(fn, inputs))
            print(f"{op} N={n} C={a.C}" + (f" D={a.D}" if op != "cdam_map" else ""),
                  ", ".join(f"{k}: {t:.3f} s" for k, t in best.items()),
                  f"({best['reference formulas'] / best['composite']:.1f}x)")
    finally:
        cls.backward_ops = fused


if __name__ == "__main__":
    main()
