"""Fuzz the fused backward passes against the float64 reference formulas.

Seeded random small shapes, scales and dtypes for jsd_attention (with and without q),
pairwise_jsd, cdam_attention, cdam_map and the multi-scale ops (odd grids, scale sets
shrinking to one patch); every backend that runs here (triton through the interpreter
without a GPU, cpu) and the reference evaluated at the input dtype are compared with the
float64 reference, gradient by gradient. The error of a gradient is max |got - expected| /
max |expected|, reported as a multiple of the tests' GRAD_TOL (cdam_fast/testing.py) for the
dtype, so "x1" is the edge of what the tests accept. Prints the worst cases (with the seed that rebuilds
them: `--seed S --cases 1`).

    python scripts/fuzz_backward.py --op jsd_attention --cases 200 --dtype fp16
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("CDAM_FAST_INTERPRET_BLOCK", "16")  # small shapes span several interpreter tiles

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton through its interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cdam_fast.testing import FUZZ_OPS as OPS, describe, draw, errors, grads, overflows  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def device(backend: str) -> torch.device:
    on_gpu = torch.cuda.is_available() and backend in ("triton", "cuda")
    return torch.device("cuda" if on_gpu else "cpu")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=OPS, default="jsd_attention")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--backends", default="triton,cpu", help="compared with the reference at the input dtype")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="first seed; case k uses seed + k")
    ap.add_argument("--worst", type=int, default=5)
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    backends = ["reference"] + [b for b in args.backends.split(",") if b and b != "reference"]
    rows, overflow = [], []
    for k in range(args.cases):
        c = draw(args.seed + k, args.op, dtype)
        expected = grads(args.op, "reference", c, torch.float64)
        if overflows(expected, dtype):
            overflow.append(c["seed"])  # the exact gradient does not fit the dtype
            continue
        row = {"case": c}
        for b in backends:
            row[b] = errors(grads(args.op, b, c, device=device(b)), expected, dtype)
        rows.append(row)
    # Ill-conditioned: the reference formulas, computing in fp32 from the same inputs, already
    # miss the tolerance (gradients many orders below the terms that cancel into them); there
    # only the ratio to the reference's own error says something about a kernel.
    good = [r for r in rows if max(r["reference"].values()) <= 1.0]
    ill = [r for r in rows if max(r["reference"].values()) > 1.0]
    print(f"== {args.op} {args.dtype}: {len(rows)} cases, {len(ill)} ill-conditioned (reference > 1x), "
          f"{len(overflow)} whose gradient overflows the dtype (seeds {overflow[:10]})")
    for b in backends:
        if good:
            worst = sorted(good, key=lambda r: -max(r[b].values()))
            print(f"-- {b}: worst error {max(worst[0][b].values()):.3g} x GRAD_TOL over the well-conditioned cases")
            for r in worst[:args.worst]:
                others = "  ".join(f"{o}:" + ",".join(f"{k}={v:.2g}" for k, v in r[o].items()) for o in backends)
                print(f"    {describe(r['case'])}\n        {others}")
        if ill and b != "reference":
            ratio = max(max(r[b][k] / max(r["reference"][k], 1e-12) for k in r[b]) for r in ill)
            print(f"   {b}: worst error / reference's error over the ill-conditioned cases: {ratio:.3g}")


if __name__ == "__main__":
    main()
