"""torch.library registration of the ops (namespace ``cdam_fast``), generated from cdam_fast.opspec.

Each op takes batch-flattened tensors plus the backend name and runs the value checks, the
empty-input shortcut and the dispatch inside the op, so torch.compile sees one opaque node per
call. The fake implementation is the spec's output rule (shape, dtype, contiguous), and the
eager path returns exactly what it promises.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from . import dispatch
from .opspec import OPS, TRAINING_OPS, OpSpec


def _contiguous(call):
    for k, t in call.tensors.items():
        if t is not None and not t.is_contiguous():
            call.tensors[k] = t.contiguous()
    return call


def autocast_off(fn):
    """fn run with autocast disabled on every device type: the ops compute in the dtype their
    contract states (float32 / float64) whether or not the caller is inside torch.autocast,
    which would otherwise reach the aten matmuls of some backends and paths only."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), _cuda_autocast_off():
            return fn(*args, **kwargs)
    return run


def _cuda_autocast_off():
    return torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()


def _make_impl(spec: OpSpec, train: bool = False):
    """The eager implementation; train: the private training variant (spec.stats_format), which
    returns (out, stats): the statistics the chosen backend's training forward saves where it
    declares them (Backend.saved_stats), else zeros (its backward is told by that declaration,
    not by the values: cdam_fast/autograd/register.py)."""
    @autocast_off
    def impl(*args):
        call, backend, validate = spec.bind(args)
        spec.check_structure(call)
        spec.check_options(call)
        if validate:
            spec.check_values(call)
        else:
            call = spec.unchecked_values(call)
        if spec.is_empty(call):
            out = spec.new_output(call, fill_zero=True)
            return (out, spec.new_stats(call, zero=True)) if train else out
        call = _contiguous(spec.promote(call))
        chosen = dispatch.select(backend, call)
        out, stats = chosen.forward(spec.name, call, train)
        if train:
            if stats is None:
                stats = spec.new_stats(call, zero=True)
            else:
                _check_output(chosen, spec.train_name, stats, spec.stats_format.shape(call), torch.float32)
                stats = stats.contiguous()
        _check_output(chosen, spec.name, out, spec.shape(call), spec.out_dtype(call))
        return (out.contiguous(), stats) if train else out.contiguous()

    impl.__name__ = spec.train_name if train else spec.name
    return impl


def _check_output(chosen, name, out, shape, dtype):
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:  # a backend bug, never the caller's
        raise AssertionError(f"backend {chosen.name!r} returned {out.dtype} {tuple(out.shape)} for "
                             f"{name}; the spec says {dtype} {tuple(shape)}")


def _make_fake(spec: OpSpec, train: bool = False):
    def fake(*args):
        call = spec.bind(args)[0]
        out = spec.new_output(call)
        return (out, spec.new_stats(call)) if train else out

    return fake


def _register(spec: OpSpec, train: bool = False):
    name, schema = (spec.train_name, spec.train_schema) if train else (spec.name, spec.schema)
    op = torch.library.custom_op(f"cdam_fast::{name}", _make_impl(spec, train), mutates_args=(), schema=schema)
    op.register_fake(_make_fake(spec, train))
    return op


#: name -> the registered custom op (callable with the schema's positional arguments)
REGISTERED = {name: _register(spec) for name, spec in OPS.items()}
#: name -> its private training variant (ops with a spec.stats_format): (out, per-row statistics,
#: float32), called by the public wrappers when a gradient is needed; its autograd formula hands
#: the statistics to the backward (cdam_fast/autograd/register.py)
TRAINING = {name: _register(OPS[name], train=True) for name in TRAINING_OPS}


def __getattr__(name: str):
    """lib.<op> is the registered op, lib.<op>_train its training variant."""
    if name in REGISTERED:
        return REGISTERED[name]
    if name.endswith("_train") and name[:-len("_train")] in TRAINING:
        return TRAINING[name[:-len("_train")]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
