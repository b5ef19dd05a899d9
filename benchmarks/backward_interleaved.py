"""Forward + backward of a fast backend against autograd through the reference, calls interleaved.

    python -m cdam_fast.benchmarks.backward_interleaved [--op cdam_attention] [--pairs 9] [--impl cpu]

The same training step as `cdam-fast bench --set backward` (benchmarks/backward.py: forward on
leaf tensors, then backward of ones) at N = 784, C' = 101, D = 768, one thread, but the two
implementations alternate call by call on the same inputs, so that load from other processes
hits both alike; the bench times one implementation after the other, and on a shared machine
its ratios move by 2x between runs. Prints each side's median (IQR) and the median (IQR) of the
paired ratios reference / backend.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cdam_fast.benchmarks import backward
from cdam_fast.benchmarks.cases import PAPER_C, PAPER_N, Case
from cdam_fast.benchmarks.inputs import make_input_set


def _timed(step, inputs) -> float:
    t0 = time.perf_counter()
    step(inputs)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", action="append", default=None,
                    help="op(s) (default: cdam_attention, jsd_attention, pairwise_jsd)")
    ap.add_argument("--impl", default="cpu", help="the fast implementation (default: cpu)")
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--N", type=int, default=PAPER_N)
    ap.add_argument("--C", type=int, default=PAPER_C)
    ap.add_argument("--D", type=int, default=768)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for op in args.op or ["cdam_attention", "jsd_attention", "pairwise_jsd"]:
        case = Case(op, N=args.N, C=args.C, D=args.D if op != "pairwise_jsd" else 0)
        inputs = make_input_set(case, torch.device("cpu"), torch.Generator().manual_seed(0))
        fast, ref = backward.op_callable(op, args.impl, None), backward.op_callable(op, "reference", None)
        fast(inputs), ref(inputs)  # warm-up: builds / loads the kernels
        times = {"fast": [], "ref": []}
        for _ in range(args.pairs):
            times["fast"].append(_timed(fast, inputs))
            times["ref"].append(_timed(ref, inputs))
        ratios = [r / f for f, r in zip(times["fast"], times["ref"])]

        def summary(x, scale=1e3):
            q = statistics.quantiles(x, n=4)
            return f"{statistics.median(x) * scale:.3g} (IQR {(q[2] - q[0]) * scale:.2g})"

        q_ratios = statistics.quantiles(ratios, n=4)
        print(f"{op} N={args.N} C={args.C} D={case.D}: {args.impl} {summary(times['fast'])} ms, "
              f"reference (autograd) {summary(times['ref'])} ms, paired ratio reference / {args.impl} "
              f"{statistics.median(ratios):.3g} (IQR {q_ratios[0]:.3g}-{q_ratios[2]:.3g}), {args.pairs} pairs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
