"""The one place that picks a backend for an op call.

A backend is one object, an instance of a :class:`cdam_fast.backends.base.Backend` subclass,
that declares what it supports (devices, dtypes, ops, limits) and owns its forward kernels and
its backward. :data:`PRIORITY` lists them: the order ``"auto"`` tries them in, and where each
class lives. ``"auto"`` takes the first backend (of those it tries on the device type) with no
reasons (``not_supported_reasons``); an explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` listing its reasons. A backend that lacks the op or does not
run this device type is passed over quietly; one that should work but cannot (no compiler, a
size it cannot launch) is named in one RuntimeWarning. Classes are imported lazily, so a missing
Triton or compiler only matters to the calls that ask for it. Adding a backend: one module with
its class and one line here (docs/extending.md).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from .validation import CdamInputError

# (name, "module:Class" or the class itself, device types "auto" tries it on (None: every one)),
# in the order "auto" tries them; the reference runs everything and closes the list.
PRIORITY = (
    ("triton", "cdam_fast.backends.triton_backend:TritonBackend", ("cuda",)),
    ("cuda", "cdam_fast.backends.cuda_backend:CudaBackend", ("cuda",)),
    ("cpu", "cdam_fast.backends.cpu_backend:CpuBackend", None),
    ("reference", "cdam_fast.backends.reference_backend:ReferenceBackend", None),
)
BACKENDS = ("auto",) + tuple(name for name, _, _ in PRIORITY)
ENV_VAR = "CDAM_FAST_BACKEND"

_loaded: dict = {}
_warned: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def backend_names() -> tuple:
    """The names backend= accepts (PRIORITY's, read at each call), "auto" first."""
    return ("auto",) + tuple(name for name, _, _ in PRIORITY)


def _load(name: str):
    """The backend object named `name`, or the ImportError that kept it from loading."""
    if name not in _loaded:
        target = next(t for n, t, _ in PRIORITY if n == name)
        try:
            if isinstance(target, str):
                module, cls = target.split(":")
                target = getattr(importlib.import_module(module), cls)
            _loaded[name] = target()
        except ImportError as e:  # e.g. Triton not installed
            _loaded[name] = e
    return _loaded[name]


def backend(name: str):
    """The backend object named `name` (a forward's choice, handed to its backward)."""
    check_backend_name(name)
    obj = _load(name)
    if isinstance(obj, Exception):
        raise BackendUnavailableError(f"backend {name!r} could not be imported ({obj})")
    return obj


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend `name` can run tensors of this device and dtype, else why not."""
    obj = _load(name)
    if isinstance(obj, Exception):
        return f"it could not be imported ({obj})"
    return obj.unavailable_reason(device, dtype)


def not_supported_reasons(name: str, call) -> list[str]:
    """Why backend `name` cannot run this call (empty list: it can)."""
    obj = _load(name)
    if isinstance(obj, Exception):
        return [f"it could not be imported ({obj})"]
    return list(obj.not_supported_reasons(call.op, call))


def _by_design(name: str, device: torch.device, op: str | None) -> bool:
    """Backend `name` lacks the op or does not run this device type: "auto" passes it quietly."""
    obj = _load(name)
    if isinstance(obj, Exception):
        return False
    return (op is not None and op not in obj.ops) or obj.device_reason(device) is not None


def check_backend_name(backend: str) -> None:
    names = backend_names()
    if backend not in names:
        raise CdamInputError(f"backend must be one of {names}, got {backend!r}")


def _requested(backend: str) -> str:
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in backend_names():
                raise CdamInputError(f"environment variable {ENV_VAR} must be one of {backend_names()}, got {env!r}")
            return env
    return backend


def _pick(backend: str, device: torch.device, dtype: torch.dtype, reasons_of, what: str, op: str | None = None):
    """The backend object to run with; reasons_of(name) -> list of reasons it cannot."""
    backend = _requested(backend)
    if backend != "auto":
        why = reasons_of(backend)
        if why:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {what}: {'; '.join(why)}")
        return _load(backend)
    skipped = []
    for name, _, devices in PRIORITY:
        if devices is not None and device.type not in devices:
            continue
        why = reasons_of(name)
        if not why:
            _warn_fallback(skipped, name, device, dtype)
            return _load(name)
        if not _by_design(name, device, op):
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
    and the backward's (cdam_fast/autograd/backward_ops.py) share this record. stacklevel counts from the
    caller of warn_once."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def select(backend: str, call):
    """The backend object that runs `call` (a cdam_fast.opspec.Call)."""
    return _pick(backend, call.device, call.compute_dtype, lambda n: not_supported_reasons(n, call),
                 f"{call.op} on these inputs", call.op)


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """The backend object for tensors of this device and dtype, regardless of op and sizes."""
    return _pick(backend, device, dtype, lambda n: [r for r in [unavailable_reason(n, device, dtype)] if r],
                 f"{dtype} tensors on {device}")


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """{backend name: None if usable else the reason} for the given device and dtype."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device, dtype) for name, _, _ in PRIORITY}
