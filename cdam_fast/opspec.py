"""The registry of ops (:data:`OPS`), built from the op homes: everything else reads it.

Each op family lives in one module of cdam_fast/opdefs (its specification, reference and
backward formulas); :data:`HOMES` lists those modules, and nothing else names the ops:
``_library.py`` registers every op from the registry, ``autograd/`` attaches every backward,
``dispatch.py`` asks the backends about a :class:`Call`, and the tests and ``benchmarks/`` take
the op lists and input shapes from here. Adding an op: docs/extending.md.
"""
from __future__ import annotations

from .opdefs import cdam, jsd_attention, multiscale, pairwise_jsd
from .opdefs.spec import OPTION_CHECKS, Call, OpSpec, StatsFormat, compute_dtype  # noqa: F401  (the spec language)

#: the op homes, in the order the ops are listed
HOMES = (pairwise_jsd, cdam, multiscale, jsd_attention)

OPS: dict[str, OpSpec] = {s.name: s for home in HOMES for s in home.SPECS}

OP_NAMES = tuple(OPS)
MULTISCALE_OPS = tuple(n for n, s in OPS.items() if s.multiscale)
ATTENTION_OPS = tuple(n for n, s in OPS.items() if not s.returns_map)
MODE_OPS = tuple(n for n, s in OPS.items() if s.has_mode)
TRAINING_OPS = tuple(n for n, s in OPS.items() if s.stats_format is not None)
#: ops whose backward formulas are a composite over the divergence: a backend with its own
#: pairwise_jsd backward runs them on its kernels
COMPOSITE_BACKWARD_OPS = tuple(n for n, s in OPS.items() if s.composite_backward)
