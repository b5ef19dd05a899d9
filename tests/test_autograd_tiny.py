"""Gradients at tiny probabilities: every p > 0 gets its exact partial derivative on every
backend, float32 subnormals included (docs/autograd.md, section 1). The fused backward passes
took log2(max(s w, 1e-30)), O(1) wrong once both sides of a sum were below 1e-30, and the
float32 reference halved subnormal sums (p = 2^-149, q = 0 gave m = 0)."""
import warnings

import pytest
import torch

import cdam_fast as cf
from conftest import random_values

F64 = torch.float64
TINY_VALUES = (1e-45, 1e-38, 1e-31, 1e-25)  # 1e-45 rounds to 2^-149, the smallest float32 subnormal


def _p(t):
    """Rows with a tiny entry in class 1 (two of them: the sum of both sides is tiny too), a zero
    and a normal entry in the same class."""
    return torch.tensor([[[0.6, t, 0.4], [0.3, 3 * t, 0.7], [0.5, 0.0, 0.5], [0.2, 0.8, 0.0]]])


def _exact(p, q, g):
    """Gradient of sum_ij g_ij J(p_i, q_j) in float64 from docs/autograd.md, section 1:
    (1/2) sum_j g_ij log(p_ic / m_ijc), 0 where p_ic = 0; q None: both sides into p."""
    pp = p.double()
    qq = pp if q is None else q.double()
    m = 0.5 * (pp[:, :, None, :] + qq[:, None, :, :])
    logm = torch.where(m > 0, m, 1.0).log()
    log = lambda x: torch.where(x > 0, x, 1.0).log()  # noqa: E731
    gp = torch.where(pp > 0, 0.5 * (g[..., None] * (log(pp)[:, :, None, :] - logm)).sum(2), 0.0)
    gq = torch.where(qq > 0, 0.5 * (g[..., None] * (log(qq)[:, None, :, :] - logm)).sum(1), 0.0)
    return (gp + gq,) if q is None else (gp, gq)


def _grads(fn, inputs, g):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows summing to 1 - 1e-45 need validate=False; nothing else warns
        return torch.autograd.grad(fn(*leaves), leaves, g)


def _check(got, expected, what):
    for i, (a, e) in enumerate(zip(got, expected)):
        err = (a.double().cpu() - e).abs().max().item()
        # the log terms are ~100 in float32 (ulp 8e-6): a few ulps of them, never the O(1) of a clamp
        assert err <= 1e-4 * max(e.abs().max().item(), 1.0), f"{what}: gradient {i} off by {err:.3g}"


@pytest.mark.parametrize("t", TINY_VALUES)
def test_pairwise_jsd_gradient_at_tiny_p(backend, gen, t):
    name, dev = backend
    p = _p(t)
    q = _p(t)[:, [1, 3, 0]]
    g = torch.randn(1, 4, 4, generator=gen, dtype=F64)
    gq = torch.randn(1, 4, 3, generator=gen, dtype=F64)
    for what, fn, ins, grad, want in (
            ("q=None", lambda p: cf.pairwise_jsd(p, backend=name, validate=False), [p], g, _exact(p, None, g)),
            ("q given", lambda p, q: cf.pairwise_jsd(p, q, backend=name, validate=False), [p, q], gq,
             _exact(p, q, gq))):
        got = _grads(fn, [x.to(dev) for x in ins], grad.float().to(dev))
        _check(got, want, f"{name} pairwise_jsd {what} at p = {t:g}")


@pytest.mark.parametrize("t", TINY_VALUES)
def test_attention_gradients_at_tiny_p(backend, gen, t):
    """The fused attention backward passes (their own logs of s w) against the float64 reference."""
    name, dev = backend
    p, v = _p(t), random_values(gen, 1, 4, 2)
    g = torch.randn(1, 4, 2, generator=gen)
    for op, fn in (("jsd_attention", lambda b: lambda p, v: cf.jsd_attention(p, v, backend=b, validate=False)),
                   ("cdam_attention", lambda b: lambda p, v: cf.cdam_attention(p, v, backend=b, validate=False))):
        want = _grads(fn("reference"), [p.double(), v.double()], g.double())
        got = _grads(fn(name), [p.to(dev), v.to(dev)], g.to(dev))
        _check(got, want, f"{name} {op} at p = {t:g}")


@pytest.mark.parametrize("t", TINY_VALUES)
def test_cdam_map_gradient_at_tiny_p(backend, gen, t):
    """The fused cdam_map backward (its own logs of s w, one pass over the rows) against the
    float64 reference."""
    name, dev = backend
    p = _p(t)
    g = torch.randn(1, 4, 4, generator=gen)
    fn = lambda b: lambda p: cf.cdam_map(p, alpha=10.0, backend=b, validate=False)  # noqa: E731
    want = _grads(fn("reference"), [p.double()], g.double())
    got = _grads(fn(name), [p.to(dev)], g.to(dev))
    _check(got, want, f"{name} cdam_map at p = {t:g}")
