"""validate=False: one rule on every backend for inputs the checks would have refused.

* A row of p (or q) with a negative entry is a NaN row: its divergences are NaN (the forward's
  exact-0 diagonal aside), and so is everything computed from them; the other rows and batch
  elements are unchanged. (The CPU kernel used to return finite divergences above ln 2.)
* A -inf similarity (a masked class) is a class probability of exactly 0 at every scale: the
  multi-scale ops' outputs and gradients are finite and are those of a very negative finite
  similarity (they used to be NaN for the whole batch element).
"""
import math
import warnings

import pytest
import torch

import cdam_fast as cf
from conftest import random_distributions, random_similarities, random_values

F64 = torch.float64
BUDGET = cf.DEFAULT_MEMORY_BUDGET
MASKED = -1e4  # exp(MASKED / tau) underflows to 0 in float64: the same distributions as -inf


def _p_with_negative_row(gen):
    p = random_distributions(gen, 2, 6, 4, dtype=F64, zeros=False, one_hot=False)
    p[0, 2, 1] = -0.1
    return p


OPS = {  # name -> fn(backend, p, v, validate)
    "pairwise_jsd": lambda b, p, v, val: cf.pairwise_jsd(p, backend=b, validate=val),
    "pairwise_jsd_q": lambda b, p, v, val: cf.pairwise_jsd(p[:, :4], p[:, 1:], backend=b, validate=val),
    "pairwise_jsd_q_rows": lambda b, p, v, val: cf.pairwise_jsd(p, p[:, 3:], backend=b, validate=val),
    "cdam_map": lambda b, p, v, val: cf.cdam_map(p, backend=b, validate=val),
    "cdam_attention_materialize": lambda b, p, v, val: cf.cdam_attention(p, v, mode="materialize", backend=b,
                                                                         validate=val),
    "cdam_attention_recompute": lambda b, p, v, val: cf.cdam_attention(p, v, mode="recompute", memory_budget=0,
                                                                       backend=b, validate=val),
    "jsd_attention": lambda b, p, v, val: cf.jsd_attention(p, v, backend=b, validate=val),
    "jsd_attention_q_rows": lambda b, p, v, val: cf.jsd_attention(p, v[:, 3:], q=p[:, 3:], backend=b, validate=val),
}


@pytest.mark.parametrize("op", list(OPS))
def test_negative_entries_make_nan_rows_on_every_backend(backend, gen, op):
    """The backend's output is NaN exactly where the float64 reference's is with the negative
    row replaced by NaN, and equal to it (to float32 accuracy) everywhere else."""
    name, dev = backend
    p = _p_with_negative_row(gen)
    v = random_values(gen, 2, 6, 3, dtype=F64)
    nan_row = p.clone()
    nan_row[0, 2] = math.nan
    want = OPS[op]("reference", nan_row, v, False)
    got = OPS[op](name, p.float().to(dev), v.float().to(dev), False).double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{name} {op}: NaN where the rule has none, or none where it has"
    assert not want[1].isnan().any()  # the clean batch element is untouched
    ok = ~want.isnan()
    err = (got[ok] - want[ok]).abs().max().item()
    assert err <= 1e-4 * max(want[ok].abs().max().item(), 1.0), f"{name} {op}: off by {err:.3g}"


def test_negative_row_divergences_are_nan_not_impossible(backend, gen):
    """The issue's case: J of a row with a negative entry is NaN against every other row (on CPU
    it was finite and above ln 2, impossible for a divergence bounded by ln 2)."""
    name, dev = backend
    p = _p_with_negative_row(gen).float().to(dev)
    j = cf.pairwise_jsd(p, backend=name, validate=False)[0].cpu()
    others = [k for k in range(6) if k != 2]
    assert j[2, others].isnan().all() and j[others, 2].isnan().all() and j[2, 2] == 0
    assert (j[others][:, others] <= math.log(2) + 1e-6).all()


def _masked_inputs(gen):
    sim = random_similarities(gen, 2, 4, 3, 4, dtype=F64)
    sim[0, 1] = -math.inf  # a masked class
    sim[0, 2, 1, 1] = -math.inf  # and one masked pixel of another class
    return sim, random_values(gen, 2, 12, 3, dtype=F64)


@pytest.mark.parametrize("mode", ["materialize", "recompute"])
def test_masked_classes_give_finite_outputs_and_gradients(backend, gen, mode):
    name, dev = backend
    sim, v = _masked_inputs(gen)
    scales = (1.0, 0.5)  # 0.5: a 1 x 2 grid, resized from -inf taps

    def run(b, s, v):
        s, v = s.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = cf.multiscale_cdam_attention(s, v, scales, mode=mode, memory_budget=BUDGET, backend=b, validate=False)
        g = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
        return (out, *torch.autograd.grad(out, [s, v], g))

    want = run("reference", sim.masked_fill(sim.isneginf(), MASKED), v)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="cdam_fast")  # no "NaN gradients" warning: they have gradients
        got = run(name, sim.float().to(dev), v.float().to(dev))
    for what, g, w in zip(("output", "sim gradient", "v gradient"), got, want):
        g = g.double().cpu()
        assert torch.isfinite(g).all(), f"{name} {mode}: {what} not finite"
        err = (g - w).abs().max().item()
        assert err <= 1e-4 * max(w.abs().max().item(), 1e-3), f"{name} {mode}: {what} off by {err:.3g}"
    assert (got[1].cpu()[sim.isneginf()] == 0).all()  # a masked entry moves no probability



def test_a_position_with_every_class_masked_is_nan_in_its_batch_element_only(backend, gen):
    """Every class -inf at one position leaves it no distribution: its batch element is NaN (as
    for a NaN input), never a plausible finite map, and the other element is unchanged."""
    name, dev = backend
    sim, v = _masked_inputs(gen)
    sim[0, :, 2, 3] = -math.inf
    out = cf.multiscale_cdam_attention(sim.float().to(dev), v.float().to(dev), (1.0, 0.5), memory_budget=BUDGET,
                                       backend=name, validate=False).double().cpu()
    alone = cf.multiscale_cdam_attention(sim[1:].float().to(dev), v[1:].float().to(dev), (1.0, 0.5),
                                         memory_budget=BUDGET, backend=name, validate=False).double().cpu()
    assert torch.isnan(out[0]).any(), f"{name}: an all-masked position gave a finite map"
    assert torch.equal(out[1:], alone), f"{name}: the other batch element changed"
