"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's numpy interpreter; it must be switched on
before triton is first imported, hence here. On a CUDA machine the real kernels run.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cdam_fast.dispatch import unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
# Every backend under test. The reference appears too: run in float32 it is checked against
# itself in float64. Backends this machine cannot run are reported as skips with their reason.
BACKENDS_UNDER_TEST = ("reference", "triton", "cpu", "cuda")


def backend_device(name: str) -> torch.device:
    return torch.device("cuda") if name == "cuda" else (torch.device("cpu") if name == "cpu" else DEVICE)


@pytest.fixture(params=BACKENDS_UNDER_TEST)
def backend(request):
    """(name, device): a backend usable here and the device its inputs must live on."""
    name = request.param
    dev = backend_device(name)
    why = unavailable_reason(name, dev, torch.float32)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable on {dev}: {why}")
    return name, dev


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs differ between tests but runs repeat."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, (1,)).item() if os.environ.get("CDAM_TEST_RANDOM") else 1234)
