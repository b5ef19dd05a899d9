"""One specification per op, in one registry (:data:`OPS`), that everything else reads.

An :class:`OpSpec` holds what is true of an op whatever computes it: its torch.library schema,
which inputs are probability rows and which only need to be finite, the value checks, the
output's shape and dtype (the fake implementation *is* this rule, so eager and compiled calls
cannot disagree), the reference implementation, and the shapes of its test and benchmark
inputs. ``_library.py`` registers every op from it; ``dispatch.py`` asks backends about a
:class:`Call`; the tests and ``benchmarks/`` take the op lists and input shapes from it.

Adding an op: write its reference in ``reference.py``, add an OpSpec below, a public wrapper in
``ops.py`` and one function of the same name and argument order (``params``) per backend. A
backend that lacks the op says so from ``not_supported_reasons``. Gradients are registered on
the generated ops by name (``cdam_fast/autograd/register.py``).

The dtype rule, once: the divergences are computed in float64 if any tensor input is float64
(only the reference backend does that; float64 distributions are promoted to it), else in
float32 whatever the 16/32-bit input dtypes. Maps come back in that compute dtype; attention
outputs in v's dtype. Outputs are always contiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from . import reference, validation
from .memory import check_mode, multiscale_grid_sizes

# The scalar parameters' checks, by parameter name: the public wrappers run them up front (so
# they surface while tracing), the registered ops again (direct torch.ops calls skip the wrappers).
OPTION_CHECKS = {"alpha": validation.check_alpha, "tau": validation.check_tau, "scales": validation.check_scales,
                 "mode": check_mode, "memory_budget": validation.check_budget}


@dataclass
class Call:
    """One concrete call as the library and the backends see it: batch-flattened tensors
    (p, q [B, N|M, C]; v [B, N, D]; sim [B, C, h, w]; absent optional ones are None) and options."""

    op: str
    tensors: dict
    options: dict

    @property
    def spec(self) -> "OpSpec":
        return OPS[self.op]

    def present(self) -> list:
        return [t for t in self.tensors.values() if t is not None]

    @cached_property  # metadata only: unchanged when tensors are made contiguous
    def device(self) -> torch.device:
        return self.present()[0].device

    @cached_property
    def compute_dtype(self) -> torch.dtype:
        return reference.compute_dtype(*self.present())

    @cached_property
    def batch(self) -> int:
        return self.present()[0].shape[0]

    def tokens(self) -> int:
        """N: query rows (h * w for the multi-scale ops)."""
        sim = self.tensors.get("sim")
        return sim.shape[2] * sim.shape[3] if sim is not None else self.tensors["p"].shape[1]

    def keys(self) -> int:
        """M: key rows (q's rows when q is given, else N)."""
        q = self.tensors.get("q")
        return q.shape[1] if q is not None else self.tokens()

    def classes(self) -> int:
        sim = self.tensors.get("sim")
        return sim.shape[1] if sim is not None else self.tensors["p"].shape[2]

    def width(self) -> int:
        """D: value width (0 for the map ops)."""
        v = self.tensors.get("v")
        return v.shape[2] if v is not None else 0

    def grid_sizes(self) -> list[int]:
        """n_s of every scale (one entry, N, for the single-scale ops)."""
        sim = self.tensors.get("sim")
        if sim is None:
            return [self.tokens()]
        return multiscale_grid_sizes(sim.shape[2], sim.shape[3], self.options["scales"])

    def args(self) -> tuple:
        """The backend function's positional arguments, in the spec's `params` order."""
        return tuple(self.tensors[k] if k in self.tensors else self.options[k] for k in self.spec.params)


# The training ops' statistics are -inf ("nothing accumulated") where the backend's forward does
# not compute them (its backward does not need them: CPU, CUDA C++); a backward that does need
# them computes its own then. Computed statistics are finite for the finite p the backward accepts
# (-inf, unlike NaN, compares equal, so torch.library.opcheck passes on every backend).
STATS_NOT_SAVED = -math.inf


def stats_saved(stats: torch.Tensor | None) -> bool:
    """Whether a backward received statistics computed by the forward (a host sync, like the
    backward's input checks)."""
    return stats is not None and stats.numel() > 0 and not bool(torch.isneginf(stats).any())


_RANKS = {"p": 3, "q": 3, "v": 3, "sim": 4}  # batch-flattened tensor ranks of the registered ops


@dataclass(frozen=True)
class OpSpec:
    name: str
    #: the op's arguments (without backend / validate), in schema and backend-function order
    params: tuple
    #: torch.library schema of the registered op (backend and validate last)
    schema: str
    #: tensor arguments holding probability rows (value check: distributions; float64 promotion)
    distributions: tuple
    #: tensor arguments that must only be finite
    finite: tuple
    #: output shape from the call
    shape: Callable[[Call], tuple]
    #: True: a map in the compute dtype; False: an attention output in v's dtype
    returns_map: bool
    #: the reference implementation (batch-flattened inputs, cdam_fast.reference)
    reference: Callable
    #: the public wrapper takes mode= and memory_budget=
    has_mode: bool = False
    #: the input is a similarity grid sim [..., C, h, w] rather than distributions p [..., N, C]
    multiscale: bool = False
    #: q is an optional second set of distributions
    has_q: bool = False
    tensor_names: tuple = field(default=())
    #: shape [.., B, N] of the per-row statistics that the private training variant
    #: cdam_fast::_<name>_train (same arguments and checks) returns besides the output, for the
    #: backward to reuse; None: the op has no training variant (see STATS_NOT_SAVED).
    saved_stats: Callable[[Call], tuple] | None = None

    @property
    def train_name(self) -> str:
        return f"_{self.name}_train"

    @property
    def train_schema(self) -> str:
        return self.schema.replace(") -> Tensor", ") -> (Tensor, Tensor)")

    def new_stats(self, call: Call, fill: float | None = None) -> torch.Tensor:
        """The training op's statistics output (float32, contiguous); fill=STATS_NOT_SAVED when the
        backend's forward does not compute them."""
        shape = self.saved_stats(call)
        if fill is None:
            return torch.empty(shape, dtype=torch.float32, device=call.device)
        return torch.full(shape, fill, dtype=torch.float32, device=call.device)

    def bind(self, args: tuple) -> tuple[Call, str, bool]:
        """(Call, backend, validate) from the registered op's positional arguments."""
        *own, backend, validate = args
        values = dict(zip(self.params, own))
        tensors = {k: values.pop(k) for k in self.tensor_names}
        return Call(self.name, tensors, values), backend, validate

    def out_dtype(self, call: Call) -> torch.dtype:
        return call.compute_dtype if self.returns_map else call.tensors["v"].dtype

    def check_structure(self, call: Call) -> None:
        """Ranks, dtypes, devices and matching sizes of the batch-flattened tensors. The public
        wrappers check these on the caller's shapes; a direct call of the registered op gets them
        here, before any kernel reads the data."""
        tensors = {k: t for k, t in call.tensors.items() if t is not None}
        for k, t in tensors.items():
            validation.check_tensor(k, t, _RANKS[k])
            if t.dim() != _RANKS[k]:
                raise validation.CdamInputError(f"{k} must have {_RANKS[k]} dimensions (batch-flattened) in a direct "
                                                f"call of cdam_fast::{self.name}, got shape {tuple(t.shape)}")
        validation.check_same_device(**tensors)
        first = self.tensor_names[0]
        for k, t in tensors.items():
            validation.check_dim(k, t.shape[0], "batch size (dim 0)", call.batch, first)
        if "q" in tensors:
            validation.check_dim("q", tensors["q"].shape[2], "class count (last dim)", call.classes(), first)
        if "v" in tensors:
            rows, source = (call.keys(), "q" if "q" in tensors else first) if self.name == "jsd_attention" \
                else (call.tokens(), first)
            validation.check_dim("v", tensors["v"].shape[1], "token count (dim 1)", rows, source)

    def check_options(self, call: Call) -> None:
        for k, value in call.options.items():
            OPTION_CHECKS[k](value)

    def check_values(self, call: Call) -> None:
        """The value checks (validate=True): they read the data."""
        for k in self.distributions:
            if call.tensors.get(k) is not None:
                validation.check_distribution(k, call.tensors[k])
        for k in self.finite:
            validation.check_finite(k, call.tensors[k])

    def unchecked_values(self, call: Call) -> Call:
        """validate=False: distributions' rows with a negative entry become NaN rows (one rule
        for every backend, docs/autograd.md)."""
        tensors = dict(call.tensors)
        for k in self.distributions:
            if tensors.get(k) is not None:
                tensors[k] = validation.negative_rows_as_nan(tensors[k])
        return Call(call.op, tensors, call.options)

    def new_output(self, call: Call, fill_zero: bool = False) -> torch.Tensor:
        """A contiguous output of the right shape, dtype and device (the fake, and empty calls)."""
        make = torch.zeros if fill_zero else torch.empty
        return make(self.shape(call), dtype=self.out_dtype(call), device=call.device)

    def is_empty(self, call: Call) -> bool:
        """No work: the output or an input has no elements (the output is then all zeros)."""
        return math.prod(self.shape(call)) == 0 or any(t.numel() == 0 for t in call.present())

    def promote(self, call: Call) -> Call:
        """The dtype rule: float64 anywhere promotes the distributions / similarities to float64."""
        if call.compute_dtype != torch.float64:
            return call
        tensors = dict(call.tensors)
        for k in self.distributions + (("sim",) if self.multiscale else ()):
            if tensors.get(k) is not None:
                tensors[k] = tensors[k].to(torch.float64)
        return Call(call.op, tensors, call.options)

    def example_args(self, *, B: int, N: int, C: int, D: int, M: int | None = None, grid=None,
                     distributions, values, similarities) -> dict:
        """Keyword arguments of the public op for one test or benchmark case, made by the
        caller's factories (each takes a shape): B batch, N tokens (h * w = N for the multi-scale
        ops, `grid` = (h, w) then), C classes, D value width, M keys (q is passed when given)."""
        kw = {}
        if self.multiscale:
            h, w = grid if grid is not None else (N, 1)
            kw["sim"] = similarities((B, C, h, w))
            n = h * w
        else:
            kw["p"] = distributions((B, N, C))
            n = N
        keys = n
        if self.has_q and M is not None:
            kw["q"] = distributions((B, M, C))
            keys = M
        if not self.returns_map:
            kw["v"] = values((B, keys, D))
        return kw


def _pair_shape(call):
    return (call.batch, call.tokens(), call.keys())


def _value_shape(call):
    return (call.batch, call.tokens(), call.width())


def _row_shape(call):
    """jsd_attention: the row log-sum-exp lse_i = log2 sum_j 2^(-J_ij log2(e) / tau) [B, N]."""
    return (call.batch, call.tokens())


def _row_extremes_shape(call):
    """cdam_attention: per row the max and min of J and how many keys attain each (ties share the
    gradient), [4, B, N] in that order (the counts as floats)."""
    return (4, call.batch, call.tokens())


_SCHEMA_TAIL = "str backend, bool validate) -> Tensor"

OPS: dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("pairwise_jsd", ("p", "q"), "(Tensor p, Tensor? q, " + _SCHEMA_TAIL, ("p", "q"), (), _pair_shape, True,
           reference.pairwise_jsd, has_q=True, tensor_names=("p", "q")),
    OpSpec("cdam_map", ("p", "alpha"), "(Tensor p, float alpha, " + _SCHEMA_TAIL, ("p",), (), _pair_shape, True,
           reference.cdam_map, tensor_names=("p",)),
    OpSpec("cdam_attention", ("p", "v", "alpha", "mode", "memory_budget"),
           "(Tensor p, Tensor v, float alpha, str mode, int memory_budget, " + _SCHEMA_TAIL, ("p",), ("v",),
           _value_shape, False, reference.cdam_attention, has_mode=True, tensor_names=("p", "v"),
           saved_stats=_row_extremes_shape),
    OpSpec("multiscale_cdam_map", ("sim", "scales", "tau", "alpha"),
           "(Tensor sim, float[] scales, float tau, float alpha, " + _SCHEMA_TAIL, (), ("sim",), _pair_shape, True,
           reference.multiscale_cdam_map, multiscale=True, tensor_names=("sim",)),
    OpSpec("multiscale_cdam_attention", ("sim", "v", "scales", "tau", "alpha", "mode", "memory_budget"),
           "(Tensor sim, Tensor v, float[] scales, float tau, float alpha, str mode, int memory_budget, "
           + _SCHEMA_TAIL, (), ("sim", "v"), _value_shape, False, reference.multiscale_cdam_attention,
           has_mode=True, multiscale=True, tensor_names=("sim", "v")),
    OpSpec("jsd_attention", ("p", "v", "tau", "q"), "(Tensor p, Tensor v, float tau, Tensor? q, " + _SCHEMA_TAIL,
           ("p", "q"), ("v",), _value_shape, False, reference.jsd_attention, has_q=True,
           tensor_names=("p", "v", "q"), saved_stats=_row_shape),
)}

OP_NAMES = tuple(OPS)
MULTISCALE_OPS = tuple(n for n, s in OPS.items() if s.multiscale)
ATTENTION_OPS = tuple(n for n, s in OPS.items() if not s.returns_map)
MODE_OPS = tuple(n for n, s in OPS.items() if s.has_mode)
