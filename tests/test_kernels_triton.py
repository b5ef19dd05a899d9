"""Properties specific to the Triton kernels' tiling (the values are checked in test_ops_correctness)."""
import pytest
import torch

from conftest import DEVICE, random_distributions

import cdam_fast as cf
from cdam_fast import reference
from cdam_fast.dispatch import unavailable_reason

_WHY = unavailable_reason("triton", DEVICE, torch.float32)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton unavailable: {_WHY}")


def test_self_divergence_mirrors_tiles_exactly(gen):
    # N = 70 spans several tiles (interpreted tiles are 32), so off-diagonal tiles are written
    # through the mirrored store; the result must equal its transpose bit for bit
    p = random_distributions(gen, 2, 70, 9, device=DEVICE)
    j = cf.pairwise_jsd(p, backend="triton").cpu()
    assert torch.equal(j, j.transpose(-1, -2))
    assert torch.equal(j.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 70))
    torch.testing.assert_close(j.double(), reference.pairwise_jsd(p.double()).cpu(), atol=1e-5, rtol=0)
