"""The one place that picks a backend for an op call.

A backend is a module under ``cdam_fast.backends`` exposing ``unavailable_reason(device,
dtype) -> str | None`` and one function per op, all taking batch-flattened, validated,
contiguous tensors. Modules are imported lazily, so a missing Triton or compiler only
matters to the calls that ask for it.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "CDAM_FAST_BACKEND"

_MODULES = {
    "reference": "cdam_fast.backends.reference_backend",
    "triton": "cdam_fast.backends.triton_backend",
    "cuda": "cdam_fast.backends.cuda_backend",
    "cpu": "cdam_fast.backends.cpu_backend",
}
# Preference of "auto" per device type; the reference runs everywhere and closes each list.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference")}
_AUTO_DEFAULT = ("cpu", "reference")

_loaded: dict = {}
_warned: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def _load(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as e:  # e.g. Triton not installed
            _loaded[name] = e
    return _loaded[name]


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend `name` can run tensors of this device and dtype, else why not."""
    mod = _load(name)
    if isinstance(mod, Exception):
        return f"it could not be imported ({mod})"
    return mod.unavailable_reason(device, dtype)


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """The backend module to run an op with; `backend` is a name from BACKENDS."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend != "auto":
        why = unavailable_reason(backend, device, dtype)
        if why is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {dtype} tensors on {device}: {why}")
        return _load(backend)
    order = _AUTO_ORDER.get(device.type, _AUTO_DEFAULT)
    for i, name in enumerate(order):
        why = unavailable_reason(name, device, dtype)
        if why is None:
            return _load(name)
        key = (name, device.type, why)
        # A preferred backend that should work but does not (no compiler, broken Triton) is worth
        # one line; float64 going to the reference is by design and stays quiet.
        if i == 0 and dtype != torch.float64 and key not in _warned:
            _warned.add(key)
            warnings.warn(f"cdam_fast: backend {name!r} unavailable on {device.type} ({why}); "
                          f"falling back to {order[i + 1]!r}", RuntimeWarning, stacklevel=3)
    raise AssertionError("the reference backend is always available")


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """{backend name: None if usable else the reason} for the given device and dtype."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device, dtype) for name in _MODULES}
