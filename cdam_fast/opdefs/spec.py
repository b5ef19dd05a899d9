"""The language the op homes (cdam_fast/opdefs/*.py) are written in: :class:`OpSpec`, one op's
specification, and :class:`Call`, one concrete call as the library and the backends see it.

An OpSpec holds what is true of an op whatever computes it: its torch.library schema, which
inputs are probability rows and which only need to be finite, the value checks, the output's
shape and dtype (the fake implementation *is* this rule, so eager and compiled calls cannot
disagree), its reference, its backward formulas, the statistics its training variant saves and
the shapes of its test and benchmark inputs. Nothing here names an op.

The dtype rule, once (:func:`compute_dtype`): the divergences are computed in float64 if any
tensor input is float64 (only the reference backend does that; float64 distributions are
promoted to it), else in float32 whatever the 16/32-bit input dtypes. Maps come back in that
compute dtype; attention outputs in v's dtype. Outputs are always contiguous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from .. import validation
from ..memory import check_mode, multiscale_grid_sizes

# The scalar parameters' checks, by parameter name: the public wrappers run them up front (so
# they surface while tracing), the registered ops again (direct torch.ops calls skip the wrappers).
OPTION_CHECKS = {"alpha": validation.check_alpha, "tau": validation.check_tau, "scales": validation.check_scales,
                 "mode": check_mode, "memory_budget": validation.check_budget}


#: the end of every op's schema: the backend name and the value-check switch
SCHEMA_TAIL = "str backend, bool validate) -> Tensor"


def pair_shape(call: "Call") -> tuple:
    """[B, N, M]: one value per (query, key) pair, the maps' output."""
    return (call.batch, call.tokens(), call.keys())


def value_shape(call: "Call") -> tuple:
    """[B, N, D]: one value row per query, the attention ops' output."""
    return (call.batch, call.tokens(), call.width())


def compute_dtype(*ts) -> torch.dtype:
    """The one dtype rule: float64 if any tensor is float64, else float32 whatever the 16/32-bit
    dtypes (None entries are absent optional tensors)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


@dataclass
class Call:
    """One concrete call as the library and the backends see it: batch-flattened tensors
    (p, q [B, N|M, C]; v [B, N, D]; sim [B, C, h, w]; absent optional ones are None) and options."""

    op: str
    tensors: dict
    options: dict

    def present(self) -> list:
        return [t for t in self.tensors.values() if t is not None]

    @cached_property  # metadata only: unchanged when tensors are made contiguous
    def device(self) -> torch.device:
        return self.present()[0].device

    @cached_property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(*self.present())

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

    def args(self, params: tuple) -> tuple:
        """The backend function's positional arguments, in the spec's `params` order."""
        return tuple(self.tensors[k] if k in self.tensors else self.options[k] for k in params)


_RANKS = {"p": 3, "q": 3, "v": 3, "sim": 4}  # batch-flattened tensor ranks of the registered ops


@dataclass(frozen=True)
class StatsFormat:
    """What a training forward saves per row for its backward (as xformers' backward operators
    declare the LSE format they read): a backend's forward that saves statistics and its backward
    that reads them name the same format (Backend.saved_stats)."""

    name: str
    #: shape [.., B, N] of the statistics (float32) for a call
    shape: Callable[["Call"], tuple]
    what: str = ""


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
    #: the reference: the definition the backends are tested against (batch-flattened inputs)
    reference: Callable
    #: backward(grad, *args in params order, needs, stats, kernels) -> one gradient (or None) per
    #: tensor_names entry: the pure-torch formulas (docs/autograd.md). needs: which gradients
    #: are wanted; kernels: whose pairwise_jsd forward / backward (and multi-scale map) a
    #: composite formula runs on (None: the pure-torch ones)
    backward: Callable
    #: the public wrapper takes mode= and memory_budget=
    has_mode: bool = False
    #: the input is a similarity grid sim [..., C, h, w] rather than distributions p [..., N, C]
    multiscale: bool = False
    #: q is an optional second set of distributions (of the key rows, when the op has values)
    has_q: bool = False
    tensor_names: tuple = field(default=())
    #: the reference evaluated with every argument in params order (mode / memory budget: bounded
    #: row blocks); what the reference backend runs. None: `reference` itself
    bounded: Callable | None = None
    #: the statistics the private training variant cdam_fast::_<name>_train (same arguments and
    #: checks) returns besides the output, for a backward to reuse; None: no training variant
    stats_format: StatsFormat | None = None
    #: the reference's training forward (out, statistics in stats_format), or None
    reference_train: Callable | None = None
    #: the backward formulas are a composite over the divergence (kernels= matters): a backend
    #: with a pairwise_jsd backward gets this op's backward on its own kernels
    composite_backward: bool = False

    @property
    def train_name(self) -> str:
        return f"_{self.name}_train"

    @property
    def train_schema(self) -> str:
        return self.schema.replace(") -> Tensor", ") -> (Tensor, Tensor)")

    @property
    def backward_name(self) -> str:
        return f"{self.name}_backward"

    @property
    def backward_schema(self) -> str:
        """The backward op's: the incoming gradient, the forward's arguments, which gradients are
        needed and the saved statistics (None: not saved) -> one tensor per tensor_names entry
        (empty where not needed or absent)."""
        return "(Tensor grad, " + self.schema[1:].replace(") -> Tensor", ", bool[] needs, Tensor? stats) -> Tensor[]")

    def run_reference(self, call: Call):
        """The reference backend's evaluation of the call (bounded row blocks where the op has them)."""
        return (self.bounded or self.reference)(*call.args(self.params))

    def new_stats(self, call: Call, zero: bool = False) -> torch.Tensor:
        """The training op's statistics output (float32, contiguous). zero: for a backend that
        saves none (the backward then knows from the backend's declaration, not the values)."""
        make = torch.zeros if zero else torch.empty
        return make(self.stats_format.shape(call), dtype=torch.float32, device=call.device)

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
            # v holds one row per key: q's rows when the op takes keys and q is given
            rows, source = (call.keys(), "q" if "q" in tensors else first) if self.has_q else (call.tokens(), first)
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


