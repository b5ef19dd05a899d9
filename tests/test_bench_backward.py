"""The forward + backward benchmark set (benchmarks/backward.py): every implementation times a
real training step, and their gradients agree with each other."""
import torch

from cdam_fast.benchmarks import backward, impls
from cdam_fast.benchmarks.cases import build_cases
from cdam_fast.benchmarks.inputs import make_input_set


def test_backward_set_is_registered_and_in_quick():
    assert all(backward.is_backward(c) for c in build_cases(["backward"]))
    paper = {(c.op, c.N, c.C, c.D) for c in build_cases(["backward"])}
    assert ("cdam_attention", 784, 101, 768) in paper and ("jsd_attention", 784, 101, 768) in paper
    quick = [c for c in build_cases(["quick"]) if backward.is_backward(c)]
    assert {c.op for c in quick} == set(backward.OPS)
    assert all(c.label().endswith("fwd+bwd") for c in quick)


def test_steps_return_matching_gradients():
    """The 'reference' baseline (autograd through the reference) and the registered backward of
    the reference backend compute the same gradients: both time the same mathematics."""
    for case in backward.quick_cases():
        small = type(case)(case.op, N=16, C=5, D=3 if case.D else 0, tags=case.tags)
        inputs = make_input_set(small, torch.device("cpu"), torch.Generator().manual_seed(0))
        inputs = tuple(t.double() for t in inputs)
        via_autograd = backward.op_callable(case.op, "reference", None)(inputs)
        mode = "recompute" if case.op in ("cdam_attention", "multiscale_cdam_attention") else None
        fwd = impls.op_callable(case.op, "reference", mode)
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fwd(tuple(leaves))
        out.backward(torch.ones_like(out))
        for a, b in zip(via_autograd, leaves):
            assert torch.allclose(a, b.grad, rtol=1e-9, atol=1e-9), case.op
