"""Seeded random inputs and the gradient tolerances shared by the test-suite (tests/) and the
backward fuzzer (scripts/fuzz_backward.py).

Every generator returns data that passes the ops' value checks. A fuzz case is rebuilt from its
seed alone (`draw`), so a seed the fuzzer reports is a regression test: shapes are small and not
multiples of the 16-wide interpreter tiles; rows are flat or peaky, with exact zeros and one-hot
rows; values, incoming gradients and tau span decades.
"""
from __future__ import annotations

import torch

# ~4x the largest relative error (max abs error / max abs gradient) measured over seeds on every
# backend here: fp32 5.8e-6, fp16 5.5e-4 and bf16 4.2e-3 (the gradients' own rounding to the
# input dtype). Re-measured for cdam_map and the multi-scale ops over 8 seeds (cpu, triton and
# the fp32 reference): fp16 5.7e-4, bf16 4.6e-3, fp32 4.0e-6 for cdam_map but 9.5e-6 for the
# multi-scale ops (the fp32 reference itself 7.9e-6: their softmax / resize / pair-upsampling
# chain), hence their own fp32 tolerance in tests/test_autograd.py.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2.5e-3, torch.bfloat16: 1.6e-2}


def _quantize_rows(p: torch.Tensor, denom: int) -> torch.Tensor:
    """Round float64 rows to multiples of 1/denom that still sum to exactly 1 (largest remainder)."""
    scaled = p * denom
    counts = scaled.floor()
    missing = (denom - counts.sum(-1, keepdim=True)).long()
    rank = (scaled - counts).argsort(-1, descending=True).argsort(-1)
    return (counts + (rank < missing).to(p.dtype)) / denom


def random_distributions(gen: torch.Generator, *shape: int, dtype=torch.float32, sharpness: float = 3.0,
                         zeros: bool = True, one_hot: bool = True, device="cpu") -> torch.Tensor:
    """Rows of class distributions, shape [..., N, C], each summing to 1 within the dtype's rounding.

    softmax(sharpness * z) rows (a larger sharpness gives peakier rows, hence larger divergence
    ranges per row), with about a fifth of the entries set to exact zeros and, when N >= 4, row 1
    one-hot. bfloat16 cannot hold arbitrary probabilities within the 1e-3 row-sum check, so its
    rows are quantised to multiples of 1/256, which bfloat16 stores exactly.
    """
    *lead, n, c = shape
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64) * sharpness
    if zeros and c > 1:
        drop = torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.2
        drop[..., 0] = False  # keep every row non-empty
        logits = logits.masked_fill(drop, float("-inf"))
    p = torch.softmax(logits, -1)
    if one_hot and n >= 4:
        hot = torch.randint(0, c, (), generator=gen).item()
        p[..., 1, :] = 0.0
        p[..., 1, hot] = 1.0
    if dtype == torch.bfloat16:
        p = _quantize_rows(p, 256)
    return p.to(dtype=dtype, device=device)


def random_values(gen: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Signed values v, standard normal, rounded to dtype."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def random_similarities(gen: torch.Generator, *shape: int, dtype=torch.float32, spread: float = 0.3,
                        device="cpu") -> torch.Tensor:
    """Raw similarity grids sim [..., C, h, w]. With tau = 0.1 a spread of 0.3 gives logits of
    standard deviation 3: peaky class distributions whose divergences span a wide range per row."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * spread).to(dtype=dtype, device=device)


# --- backward fuzz cases ---------------------------------------------------------------------------

FUZZ_OPS = ("jsd_attention", "pairwise_jsd", "cdam_attention", "cdam_map", "multiscale_cdam_map",
            "multiscale_cdam_attention")
MULTISCALE_FUZZ_OPS = ("multiscale_cdam_map", "multiscale_cdam_attention")
# the paper's seven, one scale, a repeated full grid, unordered, and grids that shrink to 1 patch a side
FUZZ_SCALE_SETS = ((1.0, 0.25, 0.37, 0.5, 0.63, 0.75, 0.87), (1.0,), (0.5,), (1.0, 1.0, 0.6), (0.6, 1.0, 0.35),
                   (0.25, 0.3))


def draw(seed: int, op: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def pick(xs):
        return xs[torch.randint(len(xs), (1,), generator=gen).item()]

    if op in MULTISCALE_FUZZ_OPS:
        return _draw_multiscale(gen, pick, seed, op, dtype)
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
                             one_hot=one_hot and op not in ("cdam_attention", "cdam_map"))
    q = None
    if use_q:
        q = random_distributions(gen, B, M, C, dtype=dtype, sharpness=sharp, zeros=zeros, one_hot=one_hot)
    v = (random_values(gen, B, M, D, dtype=torch.float64) * case["vscale"]).to(dtype)
    out_shape = (B, N, M) if op in ("pairwise_jsd", "cdam_map") else (B, N, D)
    g = (random_values(gen, *out_shape, dtype=torch.float64) * case["gscale"]).to(dtype)
    case.update(p=p, q=q, v=v, g=g)
    return case


def _draw_multiscale(gen, pick, seed, op, dtype) -> dict:
    """Odd grids (h != w, down to 1 x 1), every scale set of FUZZ_SCALE_SETS."""
    B, h, w = pick([1, 2]), pick([1, 2, 3, 5, 7, 11]), pick([1, 2, 4, 6, 9])
    C, D = pick([1, 2, 3, 5, 9, 21]), pick([1, 2, 3, 7])
    case = dict(seed=seed, B=B, N=h * w, M=h * w, C=C, D=D, h=h, w=w, scales=pick(list(FUZZ_SCALE_SETS)),
                spread=pick([0.03, 0.1, 0.3]), tau=pick([0.05, 0.1, 0.3]), alpha=pick([0.5, 3.0, 10.0, 40.0]),
                vscale=pick([1e-2, 1.0, 30.0]), gscale=pick([1e-2, 1.0, 30.0]), q=None)
    case["sim"] = random_similarities(gen, B, C, h, w, dtype=dtype, spread=case["spread"])
    case["v"] = (random_values(gen, B, h * w, D, dtype=torch.float64) * case["vscale"]).to(dtype)
    out_shape = (B, h * w, h * w) if op == "multiscale_cdam_map" else (B, h * w, D)
    case["g"] = (random_values(gen, *out_shape, dtype=torch.float64) * case["gscale"]).to(dtype)
    return case


def describe(case: dict) -> str:
    keys = ("seed", "B", "N", "M", "C", "D", "sharp", "use_q", "h", "w", "scales", "tau", "alpha", "vscale", "gscale")
    return " ".join(f"{k}={case[k]}" for k in keys if k in case)


def _public_grads(op: str, backend: str, inputs: dict, g: torch.Tensor, case: dict) -> dict:
    """Gradients through the public op's registered autograd (the backward its forward selects)."""
    import cdam_fast as cf
    leaves = {k: x.detach().requires_grad_() for k, x in inputs.items()}
    if op == "cdam_map":
        out = cf.cdam_map(leaves["p"], case["alpha"], backend=backend)
    elif op == "multiscale_cdam_map":
        out = cf.multiscale_cdam_map(leaves["sim"], case["scales"], case["tau"], case["alpha"], backend=backend)
    else:
        out = cf.multiscale_cdam_attention(leaves["sim"], leaves["v"], case["scales"], case["tau"], case["alpha"],
                                           mode="recompute", backend=backend)
    got = torch.autograd.grad(out, list(leaves.values()), g)
    return dict(zip(leaves, got))


def grads(op: str, backend: str, case: dict, dtype: torch.dtype | None = None, device="cpu") -> dict:
    """The registered backward op of `backend` on the case (inputs cast to dtype, if given):
    {input name: gradient}, None for an absent q."""
    def t(x):
        return None if x is None else (x if dtype is None else x.to(dtype)).to(device)

    if op in MULTISCALE_FUZZ_OPS:
        names = ("sim",) if op == "multiscale_cdam_map" else ("sim", "v")
        return _public_grads(op, backend, {k: t(case[k]) for k in names}, t(case["g"]), case)
    p, q, v, g = t(case["p"]), t(case["q"]), t(case["v"]), t(case["g"])
    if op == "cdam_map":
        return _public_grads(op, backend, {"p": p}, g, case)
    ops = torch.ops.cdam_fast
    has_q = q is not None
    # (grad, the forward's arguments, backend, validate=False: the values are checked as for a
    # forward that did not, needs: every gradient, no saved statistics)
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
