"""The one place that picks a backend for an op call.

A backend is a module under ``cdam_fast.backends`` exposing

* ``unavailable_reason(device, dtype) -> str | None``: can it run at all here (for
  :func:`available_backends`);
* ``not_supported_reasons(call) -> list[str]``: why it cannot run this concrete call
  (:class:`cdam_fast.opspec.Call`: device, dtypes, sizes, launch-grid and index limits, number
  of scales...), empty when it can;
* one function per op (named as in :data:`cdam_fast.opspec.OPS`, arguments in the spec's
  ``params`` order), taking batch-flattened, validated, contiguous tensors.

``"auto"`` takes the first backend of its device's preference list with no reasons; an
explicitly requested backend that cannot run raises :class:`BackendUnavailableError` listing its
reasons. Modules are imported lazily, so a missing Triton or compiler only matters to the calls
that ask for it.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from .validation import CdamInputError

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "CDAM_FAST_BACKEND"

_MODULES = {
    "reference": "cdam_fast.backends.reference_backend",
    "triton": "cdam_fast.backends.triton_backend",
    "cuda": "cdam_fast.backends.cuda_backend",
    "cpu": "cdam_fast.backends.cpu_backend",
}
# Preference of "auto" per device type; the reference runs everything and closes each list.
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


def not_supported_reasons(name: str, call) -> list[str]:
    """Why backend `name` cannot run this call (empty list: it can)."""
    mod = _load(name)
    if isinstance(mod, Exception):
        return [f"it could not be imported ({mod})"]
    return list(mod.not_supported_reasons(call))


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise CdamInputError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _requested(backend: str) -> str:
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKENDS:
                raise CdamInputError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            return env
    return backend


def _pick(backend: str, device: torch.device, dtype: torch.dtype, reasons_of, what: str) -> str:
    """The name of the backend to run with; reasons_of(name) -> list of reasons it cannot."""
    backend = _requested(backend)
    if backend != "auto":
        why = reasons_of(backend)
        if why:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {what}: {'; '.join(why)}")
        return backend
    order = _AUTO_ORDER.get(device.type, _AUTO_DEFAULT)
    skipped = []
    for name in order:
        why = reasons_of(name)
        if not why:
            _warn_fallback(skipped, name, device, dtype)
            return name
        skipped.append((name, why))
    raise AssertionError("the reference backend runs every call")


def _warn_fallback(skipped, used: str, device: torch.device, dtype: torch.dtype) -> None:
    """A preferred backend that should work but does not (no compiler, broken Triton, a size it
    cannot launch) is worth one line naming the backend actually used; float64 going to the
    reference is by design and stays quiet."""
    if not skipped or dtype == torch.float64:
        return
    name, why = skipped[0]
    also = "".join(f"; {n!r} cannot either ({'; '.join(w)})" for n, w in skipped[1:])
    warn_once((name, used, device.type, tuple(why)),
              f"cdam_fast: backend {name!r} unavailable on {device.type} for this call ({'; '.join(why)}){also}; "
              f"falling back to {used!r}", stacklevel=5)


def warn_once(key: tuple, message: str, stacklevel: int) -> None:
    """One RuntimeWarning per distinct fallback (key) per process: the forward's backend choice
    and the backward's (cdam_fast/autograd/ops.py) share this record. stacklevel counts from the
    caller of warn_once."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def select_name(backend: str, call) -> str:
    """The name of the backend that runs `call` (a cdam_fast.opspec.Call): the forward's rule,
    which the backward reuses (cdam_fast/autograd/ops.py)."""
    return _pick(backend, call.device, call.compute_dtype, lambda n: not_supported_reasons(n, call),
                 f"{call.op} on these inputs")


def select(backend: str, call):
    """The backend module to run `call` (a cdam_fast.opspec.Call) with."""
    return _load(select_name(backend, call))


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """The backend module for tensors of this device and dtype, regardless of sizes."""
    return _load(_pick(backend, device, dtype, lambda n: [r for r in [unavailable_reason(n, device, dtype)] if r],
                       f"{dtype} tensors on {device}"))


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """{backend name: None if usable else the reason} for the given device and dtype."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device, dtype) for name in _MODULES}
