"""Random backward cases shared by tests/test_autograd_fuzz.py and scripts/fuzz_backward.py.

A case is rebuilt from its seed alone (`draw`), so a seed the fuzzer reports is a regression
test. Shapes are small and not multiples of the 16-wide interpreter tiles; rows are flat or
peaky, with exact zeros and one-hot rows; values, incoming gradients and tau span decades.
"""
from __future__ import annotations

import torch

from conftest import random_distributions, random_values

OPS = ("jsd_attention", "pairwise_jsd", "cdam_attention")
from test_autograd import GRAD_TOL  # noqa: E402  (errors are reported as multiples of it)


def draw(seed: int, op: str, dtype: torch.dtype) -> dict:
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
    q = None
    if use_q:
        q = random_distributions(gen, B, M, C, dtype=dtype, sharpness=sharp, zeros=zeros, one_hot=one_hot)
    v = (random_values(gen, B, M, D, dtype=torch.float64) * case["vscale"]).to(dtype)
    out_shape = (B, N, M) if op == "pairwise_jsd" else (B, N, D)
    g = (random_values(gen, *out_shape, dtype=torch.float64) * case["gscale"]).to(dtype)
    case.update(p=p, q=q, v=v, g=g)
    return case


def describe(case: dict) -> str:
    keys = ("seed", "B", "N", "M", "C", "D", "sharp", "use_q", "tau", "alpha", "vscale", "gscale")
    return " ".join(f"{k}={case[k]}" for k in keys)


def grads(op: str, backend: str, case: dict, dtype: torch.dtype | None = None, device="cpu") -> dict:
    """The registered backward op of `backend` on the case (inputs cast to dtype, if given):
    {input name: gradient}, None for an absent q."""
    def t(x):
        return None if x is None else (x if dtype is None else x.to(dtype)).to(device)

    p, q, v, g = t(case["p"]), t(case["q"]), t(case["v"]), t(case["g"])
    ops = torch.ops.cdam_fast
    has_q = q is not None
    # (grad, the forward's arguments, backend, validate=False: the values are checked as
    # for a forward that did not, needs: every gradient, no saved statistics)
    if op == "pairwise_jsd":
        gp, gq = ops.pairwise_jsd_backward(g, p, q, backend, False, [True, has_q], None)
        return {"p": gp, "q": gq if has_q else None}
    if op == "jsd_attention":
        gp, gv, gq = ops.jsd_attention_backward(g, p, v, case["tau"], q, backend, False, [True, True, has_q], None)
        return {"p": gp, "v": gv, "q": gq if has_q else None}
    gp, gv = ops.cdam_attention_backward(g, p, v, case["alpha"], "recompute", 1 << 30, backend, False, [True, True],
                                         None)
    return {"p": gp, "v": gv}


def errors(got: dict, expected: dict, dtype: torch.dtype) -> dict:
    """{input name: max |got - expected| / max |expected| as a multiple of GRAD_TOL[dtype]}
    (inf for a non-finite gradient), as tests/test_autograd.py measures."""
    out = {}
    for k, e in expected.items():
        if e is None:
            continue
        e, x = e.double().cpu(), got[k].double().cpu()
        if not torch.isfinite(x).all():
            out[k] = float("inf")
            continue
        out[k] = (x - e).abs().max().item() / max(e.abs().max().item(), 1e-3) / GRAD_TOL[dtype]
    return out


def overflows(expected: dict, dtype: torch.dtype) -> bool:
    """The exact gradient does not fit the dtype (no backend can return it)."""
    top = float(torch.finfo(dtype).max) / 2
    return any(e is not None and e.abs().max().item() > top for e in expected.values())
