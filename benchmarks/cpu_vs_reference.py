"""Side-by-side timing of the C++ CPU backend against the chunked pure-torch reference.

Runs both backends through the public API on the same inputs in one process, at the paper's
working size (N = 784 patches, C = 101 classes incl. the 80 ATP prompts, D = 768) and at
N = 2304 (a 48 x 48 grid), and prints the median seconds and the speed-up per op.

    python benchmarks/cpu_vs_reference.py                 # both sizes, default repeats
    python benchmarks/cpu_vs_reference.py --sizes 784 --repeats 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import cdam_fast
from cdam_fast.dispatch import available_backends


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, lazy imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(n: int, classes: int, width: int, gen: torch.Generator):
    side = math.isqrt(n)
    if side * side != n:
        raise SystemExit(f"--sizes must be perfect squares (grid side^2), got {n}")
    p = torch.softmax(torch.randn(1, n, classes, generator=gen) / 0.1, -1)
    v = torch.randn(1, n, width, generator=gen)
    sim = torch.randn(1, classes, side, side, generator=gen) * 0.05 + 0.2  # cosine-like similarities
    return {
        "pairwise_jsd": lambda b: cdam_fast.pairwise_jsd(p, backend=b, validate=False),
        "cdam_map": lambda b: cdam_fast.cdam_map(p, backend=b, validate=False),
        "cdam_attention": lambda b: cdam_fast.cdam_attention(p, v, backend=b, validate=False),
        "multiscale_cdam_attention": lambda b: cdam_fast.multiscale_cdam_attention(sim, v, backend=b, validate=False),
        "jsd_attention": lambda b: cdam_fast.jsd_attention(p, v, backend=b, validate=False),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[784, 2304], help="token counts N (perfect squares)")
    ap.add_argument("--classes", type=int, default=101, help="C (VOC21 + 80 ATP = 101)")
    ap.add_argument("--width", type=int, default=768, help="D, the value width")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per backend and op (median reported)")
    ap.add_argument("--ops", nargs="+", default=None, help="subset of ops to time")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (refuses to overwrite)")
    args = ap.parse_args(argv)
    if args.json is not None and args.json.exists():
        print(f"error: --json {args.json} exists; not overwriting it", file=sys.stderr)
        return 2
    why = available_backends("cpu", torch.float32)["cpu"]
    if why is not None:
        print(f"error: the cpu backend is unavailable: {why}", file=sys.stderr)
        return 1

    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, C = {args.classes}, D = {args.width}")
    rows = []
    # The product with v that every attention op pays (both backends): a floor for their times.
    floors = {}
    for n in args.sizes:
        a, v = torch.rand(1, n, n, generator=gen), torch.randn(1, n, args.width, generator=gen)
        floors[n] = median_seconds(lambda: torch.bmm(a, v), args.repeats)
    jobs = [(n, op, fn) for n in args.sizes for op, fn in cases(n, args.classes, args.width, gen).items()
            if args.ops is None or op in args.ops]
    for n, op, fn in tqdm(jobs, desc="benchmark", file=sys.stderr):
        fast = median_seconds(lambda: fn("cpu"), args.repeats)
        ref = median_seconds(lambda: fn("reference"), args.repeats)
        rows.append({"N": n, "op": op, "cpu_s": fast, "reference_s": ref, "speedup": ref / fast})

    print(f"{'N':>5}  {'op':<27} {'cpu (s)':>10} {'reference (s)':>14} {'speed-up':>9}")
    for r in rows:
        print(f"{r['N']:>5}  {r['op']:<27} {r['cpu_s']:>10.4f} {r['reference_s']:>14.4f} {r['speedup']:>8.1f}x")
    for n, t in floors.items():
        print(f"{n:>5}  product with v alone (torch.bmm, N x N x D): {t:.4f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "v_product_s": floors}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
