"""The pure-torch reference of every op, gathered from the op homes (cdam_fast/opdefs): the
definitions the fast backends are tested against.

Written for clarity and the spec's formulas (the divergence in a centred KL form that is
algebraically the spec's entropy form, F.interpolate for the grids), not for speed. It never
builds an [N, N, C] tensor: the pairwise divergence is evaluated in row chunks whose size is
bounded. Inputs are batch-flattened: p [B, N, C], v [B, N, D], sim [B, C, h, w]. It computes in
float64 for float64 input and in float32 otherwise (compute_dtype).
"""
from __future__ import annotations

from .constants import CONSTANT_ROW_EPS  # noqa: F401
from .opdefs.cdam import cdam_attention, cdam_map, minmax_expm1  # noqa: F401
from .opdefs.jsd_attention import jsd_attention, jsd_attention_train  # noqa: F401
from .opdefs.multiscale import _upsample_pairs, multiscale_cdam_attention, multiscale_cdam_map  # noqa: F401
from .opdefs.pairwise_jsd import pairwise_jsd  # noqa: F401
from .opdefs.spec import compute_dtype  # noqa: F401
