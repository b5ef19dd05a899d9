"""The backward alone of cdam_attention / jsd_attention with only v requiring grad, against the
full backward (p and v), side by side on one backend, in one process, alternating.

    python -m cdam_fast.benchmarks.v_only_backward [--N 784] [--C 101] [--D 768] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import cdam_fast as cf


def _backward_seconds(fn, p, v, grad_p: bool) -> float:
    leaf_p = p.clone().requires_grad_(grad_p)
    leaf_v = v.clone().requires_grad_(True)
    out = fn(leaf_p, leaf_v)
    sync = torch.cuda.synchronize if out.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out.backward(torch.ones_like(out))
    sync()
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=784)
    ap.add_argument("--C", type=int, default=101)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="cpu", choices=("cpu", "triton", "reference"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, a.N, a.C, generator=g) * 3, -1).to(dev)
    v = torch.randn(1, a.N, a.D, generator=g).to(dev)
    cases = {"cdam_attention": lambda p, v: cf.cdam_attention(p, v, backend=a.backend),
             "jsd_attention": lambda p, v: cf.jsd_attention(p, v, backend=a.backend)}
    for op, fn in cases.items():
        _backward_seconds(fn, p, v, True)  # warm-up (and the extension build)
        times = {"full": [], "v only": []}
        for _ in range(a.repeats):
            for kind in times:
                times[kind].append(_backward_seconds(fn, p, v, kind == "full"))
        full, only = (statistics.median(times[k]) for k in ("full", "v only"))
        print(f"{op} N={a.N} C={a.C} D={a.D} {a.backend} threads={a.threads}: "
              f"full {full:.3f} s, v only {only:.3f} s (median of {a.repeats}; {full / only:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
