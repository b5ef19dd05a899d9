"""torch.library registration of the ops (namespace ``cdam_fast``), generated from cdam_fast.opspec.

Each op takes batch-flattened tensors plus the backend name and runs the value checks, the
empty-input shortcut and the dispatch inside the op, so torch.compile sees one opaque node per
call. The fake implementation is the spec's output rule (shape, dtype, contiguous), and the
eager path returns exactly what it promises.
"""
from __future__ import annotations

import torch

from . import dispatch
from .opspec import OPS, OpSpec


def _contiguous(call):
    for k, t in call.tensors.items():
        if t is not None and not t.is_contiguous():
            call.tensors[k] = t.contiguous()
    return call


def _make_impl(spec: OpSpec):
    def impl(*args):
        call, backend, validate = spec.bind(args)
        spec.check_structure(call)
        spec.check_options(call)
        if validate:
            spec.check_values(call)
        if spec.is_empty(call):
            return spec.new_output(call, fill_zero=True)
        call = _contiguous(spec.promote(call))
        module = dispatch.select(backend, call)
        out = getattr(module, spec.name)(*call.args())
        shape, dtype = spec.shape(call), spec.out_dtype(call)
        if tuple(out.shape) != shape or out.dtype != dtype:  # a backend bug, never the caller's
            raise AssertionError(f"backend {module.__name__} returned {out.dtype} {tuple(out.shape)} for "
                                 f"{spec.name}; the spec says {dtype} {shape}")
        return out.contiguous()

    impl.__name__ = spec.name
    return impl


def _make_fake(spec: OpSpec):
    def fake(*args):
        return spec.new_output(spec.bind(args)[0])

    return fake


def _register(spec: OpSpec):
    op = torch.library.custom_op(f"cdam_fast::{spec.name}", _make_impl(spec), mutates_args=(), schema=spec.schema)
    op.register_fake(_make_fake(spec))
    return op


#: name -> the registered custom op (callable with the schema's positional arguments)
REGISTERED = {name: _register(spec) for name, spec in OPS.items()}

pairwise_jsd = REGISTERED["pairwise_jsd"]
cdam_map = REGISTERED["cdam_map"]
cdam_attention = REGISTERED["cdam_attention"]
multiscale_cdam_map = REGISTERED["multiscale_cdam_map"]
multiscale_cdam_attention = REGISTERED["multiscale_cdam_attention"]
jsd_attention = REGISTERED["jsd_attention"]
