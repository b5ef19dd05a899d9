"""The Backend base class: a backend is one object that declares what it supports (class
attributes), and owns its forward kernels and its backward.

A subclass sets

* ``name``: what ``backend=`` asks for;
* ``devices``: the device types it runs (None: any); ``dtypes``: the compute dtypes it runs;
* ``ops``: the ops it has a forward for, each a method of the same name taking the op's
  arguments in the spec's ``params`` order (batch-flattened, validated, contiguous tensors);
* ``backward_ops``: the ops whose backward it runs itself, each a method ``<op>_backward(grad,
  *args, needs, stats)`` -> one gradient (or None) per tensor input; ops in
  ``COMPOSITE_BACKWARD_OPS`` may instead run their formulas on this backend's kernels (see
  :meth:`backward`). An op it runs forward but lists here not gets the pure-torch formulas;
* ``saved_stats``: op -> the :class:`~cdam_fast.opdefs.spec.StatsFormat` its training forward
  ``<op>_train`` saves and its backward reads (as xformers' operators declare their LSE format);
* limits: ``max_scales``, ``max_tap_entries`` (4 N bilinear taps of a multi-scale call),
  ``max_size`` (rows, keys or classes), checked by the base class before the subclass adds its
  own (:meth:`limit_reasons`, :meth:`backward_limit_reasons`), and ``available()`` for what
  only the machine can tell (a compiler, a GPU).

``not_supported_reasons(op, call)`` is the list of reasons it cannot run a call (empty: it can);
an op it lacks gives "not supported: this backend has no <op>", forward or backward. Adding a
backend: docs/extending.md.
"""
from __future__ import annotations

import torch

from ..opspec import COMPOSITE_BACKWARD_OPS, OPS, Call

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA launch grids hold at most this many blocks (axis x; y and z: 65535); int32 indices.
INT32_MAX = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def limit_reason(what: str, value: int, limit: int | None, why: str) -> list[str]:
    """[reason] if value exceeds limit, else []."""
    return [f"{what} = {value} exceeds {limit} ({why})"] if limit is not None and value > limit else []


def lacks(op: str, backward: bool = False) -> str:
    """The reason of a backend that has no kernel for `op` (by design: "auto" passes it quietly)."""
    return f"not supported: this backend has no {op}{' backward' if backward else ''}"


class Backend:
    name: str = ""
    devices: tuple | None = ()
    dtypes: tuple = FAST_DTYPES
    ops: tuple = ()
    backward_ops: tuple = ()
    saved_stats: dict = {}
    max_scales: int | None = None
    max_tap_entries: int | None = None
    max_size: int | None = None

    def __init_subclass__(cls, **kwargs):
        """A declaration that cannot hold fails at import (TypeError), not at the first call."""
        super().__init_subclass__(**kwargs)
        # (a backend that overrides forward finds its kernels itself)
        finds_kernels = cls.forward is not Backend.forward
        for op in cls.ops:
            if op not in OPS:
                raise TypeError(f"{cls.__name__} declares {op}, which is not a registered op")
            if not finds_kernels and not callable(getattr(cls, op, None)):
                raise TypeError(f"{cls.__name__} declares {op} without a kernel (a method of that name)")
        for op in cls.backward_ops:
            if op not in cls.ops:
                raise TypeError(f"{cls.__name__} declares a backward of {op} without its forward")
            if not hasattr(cls, f"{op}_backward") and op not in COMPOSITE_BACKWARD_OPS:
                raise TypeError(f"{cls.__name__} declares a backward of {op} without {op}_backward")
        for op, fmt in cls.saved_stats.items():
            if fmt is not OPS[op].stats_format or not (finds_kernels or callable(getattr(cls, f"{op}_train", None))):
                raise TypeError(f"{cls.__name__}: the statistics of {op} must be its spec's stats_format, "
                                f"from an {op}_train method")

    # -- what it runs --------------------------------------------------------------------------

    def device_reason(self, device: torch.device) -> str | None:
        if self.devices is None or device.type in self.devices:
            return None
        kinds = " or ".join(d.upper() for d in self.devices)
        return f"it runs {kinds} tensors only (got a {device.type} tensor)"

    def dtype_reason(self, dtype: torch.dtype) -> str | None:
        if dtype in self.dtypes:
            return None
        if dtype == torch.float64:
            return "float64 inputs are computed by the reference backend"
        return f"unsupported dtype {dtype}"

    def available(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """What only the machine can tell (a compiler, a GPU): None if nothing is missing."""
        return None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if it can run tensors of this device and dtype at all, else why not."""
        return self.device_reason(device) or self.dtype_reason(dtype) or self.available(device, dtype)

    def not_supported_reasons(self, op: str, call: Call) -> list[str]:
        """Why it cannot run this call (empty: it can): the op, the device and dtype, the declared
        limits, then the subclass's own (limit_reasons)."""
        if op not in self.ops:
            return [lacks(op)]
        why = self.unavailable_reason(call.device, call.compute_dtype)
        if why:
            return [why]
        reasons = limit_reason("rows or classes", max(call.tokens(), call.keys(), call.classes()), self.max_size,
                               "int32 sizes")
        if call.tensors.get("sim") is not None:
            reasons += limit_reason("scales", len(call.grid_sizes()), self.max_scales, "fixed scale slots")
            reasons += limit_reason("tap-table entries", 4 * call.tokens(), self.max_tap_entries, "int32 tap indices")
        return reasons + self.limit_reasons(op, call)

    def limit_reasons(self, op: str, call: Call) -> list[str]:
        return []

    def backward_not_supported_reasons(self, op: str, call: Call) -> list[str]:
        """Why its own backward cannot take the backward of a call its forward ran (empty: it can);
        lacking one, the pure-torch formulas run."""
        if op not in self.backward_ops:
            return [lacks(op, backward=True)]
        return self.backward_limit_reasons(op, call)

    def backward_limit_reasons(self, op: str, call: Call) -> list[str]:
        return []

    # -- forward and backward ------------------------------------------------------------------

    def forward(self, op: str, call: Call, train: bool = False):
        """(out, statistics in saved_stats[op] or None): train asks for the statistics where this
        backend's training forward saves them."""
        args = call.args(OPS[op].params)
        if train and op in self.saved_stats:
            return getattr(self, f"{op}_train")(*args)
        return getattr(self, op)(*args), None

    def backward(self, op: str, grad: torch.Tensor, call: Call, needs: tuple, stats):
        """Its own backward of op (backward_ops): the `<op>_backward` method, or for a composite
        op without one, the op's formulas on this backend's kernels (its pairwise_jsd forward and
        backward)."""
        args = call.args(OPS[op].params)
        own = getattr(self, f"{op}_backward", None)
        if own is not None:
            return own(grad, *args, needs=needs, stats=stats)
        return OPS[op].backward(grad, *args, needs=needs, stats=None, kernels=self)

    def __repr__(self) -> str:
        return f"<cdam_fast backend {self.name!r}>"

