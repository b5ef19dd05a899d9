"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's numpy interpreter; it must be switched on
before triton is first imported, hence here. On a CUDA machine the real kernels run.
"""
import os

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads slow
# every small CPU op several-fold. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The text-embedding disk cache of the pipeline goes to a fresh folder: tests read nothing from
# (and leave nothing in) the user's ~/.cache.
import atexit, shutil, tempfile  # noqa: E401,E402

os.environ["CDAM_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="cdam-test-cache-")
atexit.register(shutil.rmtree, os.environ["CDAM_FAST_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

from cdam_fast.dispatch import unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
# Every backend under test. The reference appears too: run in float32 it is checked against
# itself in float64. Only absent hardware or an absent optional package skips a backend; one
# that is present but broken (an import error inside cdam_fast.kernels, a failed build) fails.
BACKENDS_UNDER_TEST = ("reference", "triton", "cpu", "cuda")


def backend_device(name: str) -> torch.device:
    return torch.device("cuda") if name == "cuda" else (torch.device("cpu") if name == "cpu" else DEVICE)


def absent_reason(name: str, dev: torch.device) -> str | None:
    """Why backend `name` legitimately cannot run on this machine (missing hardware, optional
    package or toolchain), else None: then it must work."""
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the optional package triton is not installed"
        if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "no GPU and TRITON_INTERPRET is not set"
    if name in ("cpu", "cuda"):
        from cdam_fast.backends import extension_build as eb

        if name == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA GPU"
            if torch.cuda.get_device_capability() < (8, 0):
                return "the GPU is older than sm_80"
        spec = eb.cpu_spec() if name == "cpu" else eb.cuda_spec()
        if eb.verify(eb.build_root() / spec.module_name, spec.module_name) is not None:
            if (why := eb.toolchain_problem(spec)) is not None:
                return f"no toolchain to build it: {why}"
    return None


def usable_backend(name: str) -> tuple[str, torch.device]:
    """(name, device) if backend `name` runs here; skips if it is absent, fails if it is broken."""
    dev = backend_device(name)
    why = unavailable_reason(name, dev, torch.float32)
    if why is None:
        return name, dev
    absent = absent_reason(name, dev)
    if absent is not None:
        pytest.skip(f"backend {name!r} absent on {dev}: {absent} ({why})")
    pytest.fail(f"backend {name!r} is present but broken on {dev}: {why}", pytrace=False)


@pytest.fixture(params=BACKENDS_UNDER_TEST)
def backend(request):
    """(name, device): a backend usable here and the device its inputs must live on."""
    return usable_backend(request.param)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs differ between tests but runs repeat."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, (1,)).item() if os.environ.get("CDAM_TEST_RANDOM") else 1234)


@pytest.fixture
def one_thread():
    """torch at one thread for the test (the CLI runs a result is compared with use one: other
    thread counts may sum floats in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Shared input generators. Every generator returns data that passes the ops' value checks.

# (random_distributions, random_values and random_similarities live in cdam_fast/testing.py, which
# scripts/fuzz_backward.py uses too; the tests import them from here.)
from cdam_fast.testing import random_distributions, random_similarities, random_values  # noqa: E402,F401

# Unit roundoff of each input dtype: the largest relative error of rounding one value to it.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
