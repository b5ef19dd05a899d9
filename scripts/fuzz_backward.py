"""Fuzz the fused backward passes against the float64 reference formulas.

Seeded random small shapes, scales and dtypes for jsd_attention (with and without q),
pairwise_jsd and cdam_attention; every backend that runs here (triton through the interpreter
without a GPU, cpu) and the reference evaluated at the input dtype are compared with the
float64 reference, gradient by gradient. The error of a gradient is max |got - expected| /
max |expected|, reported as a multiple of tests/test_autograd.py's GRAD_TOL for the dtype, so
"x1" is the edge of what the tests accept. Prints the worst cases (with the seed that rebuilds
them: `--seed S --cases 1`).

    TRITON_INTERPRET=1 python scripts/fuzz_backward.py --op jsd_attention --cases 200 --dtype fp16
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("CUDA_VISIBLE_DEVICES") else "1")
os.environ.setdefault("CDAM_FAST_INTERPRET_BLOCK", "16")

import torch  # noqa: E402

if torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import random_distributions, random_values  # noqa: E402

from cdam_fast import reference as ref  # noqa: E402
from cdam_fast.autograd import reference as bref  # noqa: E402

ops = torch.ops.cdam_fast
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# tests/test_autograd.py GRAD_TOL (the acceptance threshold), so results read as multiples of it
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2.5e-3, torch.bfloat16: 1.6e-2}


def draw(seed: int, op: str, dtype: torch.dtype) -> dict:
    """One random case: shapes not multiples of the 16-wide interpreter tiles, peaky or flat rows,
    value and gradient scales over decades, small and large tau."""
    gen = torch.Generator().manual_seed(seed)

    def pick(xs):
        return xs[torch.randint(len(xs), (1,), generator=gen).item()]

    B, N, M = pick([1, 2]), pick([1, 2, 3, 6, 9, 17, 23]), pick([1, 2, 3, 5, 9, 18, 33])
    C, D = pick([1, 2, 3, 5, 9, 21]), pick([1, 2, 3, 7, 20])
    sharp = pick([0.3, 1.0, 3.0, 6.0])
    zeros, one_hot = bool(pick([0, 1])), bool(pick([0, 1]))
    use_q = op in ("jsd_attention", "pairwise_jsd") and bool(pick([0, 1]))
    if not use_q:
        M = N
    case = dict(seed=seed, B=B, N=N, M=M, C=C, D=D, sharp=sharp, use_q=use_q, tau=pick([0.02, 0.1, 0.3, 1.0, 5.0]),
                alpha=pick([0.5, 3.0, 10.0, 40.0]), vscale=pick([1e-2, 1.0, 30.0]), gscale=pick([1e-2, 1.0, 30.0]))
    # CDAM: no one-hot rows (their ties at J = ln 2 are broken differently per precision)
    p = random_distributions(gen, B, N, C, dtype=dtype, sharpness=sharp, zeros=zeros,
                             one_hot=one_hot and op != "cdam_attention")
    q = random_distributions(gen, B, M, C, dtype=dtype, sharpness=sharp, zeros=zeros, one_hot=one_hot) if use_q else None
    v = (random_values(gen, B, M, D, dtype=torch.float64) * case["vscale"]).to(dtype)
    out_shape = (B, N, M) if op == "pairwise_jsd" else (B, N, D)
    g = (random_values(gen, *out_shape, dtype=torch.float64) * case["gscale"]).to(dtype)
    case.update(p=p, q=q, v=v, g=g)
    return case


def grads(op: str, backend: str, c: dict, dt: torch.dtype | None):
    """The backward op of `backend` on the case's inputs (cast to dt, or kept)."""
    dev = torch.device("cuda") if torch.cuda.is_available() and backend == "triton" else torch.device("cpu")

    def t(x):
        return None if x is None else (x if dt is None else x.to(dt)).to(dev)

    p, q, v, g = t(c["p"]), t(c["q"]), t(c["v"]), t(c["g"])
    if op == "pairwise_jsd":
        gp, gq = ops.pairwise_jsd_backward(g, p, q, backend)
        return {"p": gp, "q": gq if q is not None else None}
    if op == "jsd_attention":
        # the forward's output as the forward would return it: the exact output rounded to the
        # dtype (so the interpreter's broken bf16 tl.dot in the forward does not matter here)
        exact = ref.jsd_attention(c["p"].double(), c["v"].double(), c["tau"],
                                  None if c["q"] is None else c["q"].double())
        out = exact.to(v.dtype).to(dev)
        gp, gv, gq = ops.jsd_attention_backward(g, p, v, q, out, c["tau"], backend)
        return {"p": gp, "v": gv, "q": gq if q is not None else None}
    gp, gv = ops.cdam_attention_backward(g, p, v, c["alpha"], "recompute", 1 << 30, backend)
    return {"p": gp, "v": gv}


def errors(got: dict, expected: dict, dtype) -> dict:
    out = {}
    for k, e in expected.items():
        if e is None:
            continue
        e = e.double().cpu()
        g = got[k].double().cpu()
        if not torch.isfinite(g).all():
            out[k] = float("inf")
            continue
        scale = max(e.abs().max().item(), 1e-3)
        out[k] = (g - e).abs().max().item() / scale / GRAD_TOL[dtype]
    return out


def describe(c: dict, op: str) -> dict:
    keys = ("seed", "B", "N", "M", "C", "D", "sharp", "use_q", "tau", "vscale", "gscale")
    d = {k: c[k] for k in keys}
    if op == "cdam_attention":
        d["alpha"] = c["alpha"]
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=["jsd_attention", "pairwise_jsd", "cdam_attention"], default="jsd_attention")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--backends", default="triton,cpu", help="compared with the reference at the input dtype")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="first seed; case k uses seed + k")
    ap.add_argument("--worst", type=int, default=5)
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    backends = ["reference"] + [b for b in args.backends.split(",") if b and b != "reference"]
    top = float(torch.finfo(dtype).max) / 2
    rows, overflow = [], []
    for k in range(args.cases):
        c = draw(args.seed + k, args.op, dtype)
        expected = grads(args.op, "reference", c, torch.float64)
        if any(e is not None and e.abs().max().item() > top for e in expected.values()):
            overflow.append(c["seed"])  # the exact gradient does not fit the dtype
            continue
        row = {"case": c}
        for b in backends:
            row[b] = errors(grads(args.op, b, c, None), expected, dtype)
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
                print(f"    {describe(r['case'], args.op)}\n        {others}")
        if ill and b != "reference":
            ratio = max(max(r[b][k] / max(r["reference"][k], 1e-12) for k in r[b]) for r in ill)
            print(f"   {b}: worst error / reference's error over the ill-conditioned cases: {ratio:.3g}")


if __name__ == "__main__":
    main()
