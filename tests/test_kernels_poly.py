"""The FMA-polynomial log2 that can take part of the divergence's logarithms off the SFU."""
import math

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE, random_distributions

from cdam_fast import reference
from cdam_fast.dispatch import unavailable_reason
from cdam_fast.kernels.common import log2_poly

pytestmark = pytest.mark.skipif(unavailable_reason("triton", DEVICE, torch.float32) is not None,
                                reason=f"triton unavailable: {unavailable_reason('triton', DEVICE, torch.float32)}")


@triton.jit
def _log2_poly_kernel(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, log2_poly(tl.load(x + offs, mask=offs < n, other=1.0)), mask=offs < n)


def test_log2_poly_matches_log2_across_the_float_range():
    # every binade the divergence can meet (s = p + q in [1e-30, 2]) and the mantissa edges
    x = torch.cat([torch.logspace(-30, math.log10(2.0), 3000, dtype=torch.float64),
                   torch.tensor([0.75, 0.7499999, 1.0, 1.4999999, 1.5, 2.0 ** -100, 1e-30], dtype=torch.float64)])
    x32 = x.float().to(DEVICE)
    y = torch.empty_like(x32)
    _log2_poly_kernel[(triton.cdiv(x32.numel(), 1024),)](x32, y, x32.numel(), BLOCK=1024)
    err = (y.double().cpu() - torch.log2(x32.double().cpu())).abs()
    # 2.7e-6 from the fit plus fp32 rounding of the exponent sum (|log2 x| <= 100)
    assert err.max().item() < 2.7e-6 + 100 * 2.0 ** -23


@pytest.mark.parametrize("poly", [1, 4])
def test_divergence_with_polynomial_logs(monkeypatch, gen, poly):
    monkeypatch.setenv("CDAM_FAST_POLY_LOGS", str(poly))
    import cdam_fast as cf

    p = random_distributions(gen, 2, 19, 11, device=DEVICE)  # 11 classes: 2 groups of 4 and a tail of 3
    q = random_distributions(gen, 2, 23, 11, device=DEVICE)
    got = cf.pairwise_jsd(p, q, backend="triton")
    want = reference.pairwise_jsd(p.double(), q.double())
    # J error <= (ln2 / 2) * sum_c s_c * 2.7e-6 <= 2e-6 nats with every log polynomial
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=3e-6, rtol=0)


def test_poly_setting_is_validated(monkeypatch):
    from cdam_fast.kernels.common import poly_logs

    monkeypatch.setenv("CDAM_FAST_POLY_LOGS", "5")
    with pytest.raises(ValueError, match="CDAM_FAST_POLY_LOGS"):
        poly_logs()
