"""The Triton backward functions under the names ops.py dispatches to: the fused kernels of
kernels/jsd_backward.py, kernels/cdam_backward.py and kernels/multiscale_backward.py."""
from ..backends.shared import cdiv, limit_reason
from ..kernels import common as _common
from ..kernels.cdam_backward import cdam_attention_backward
from ..kernels.jsd_backward import jsd_attention_backward, pairwise_jsd_backward
from ..kernels.multiscale_backward import cdam_map_backward, multiscale_cdam_attention_backward, \
    multiscale_cdam_map_backward
from .reference import COMPOSITE_OPS


def not_supported_reasons(op: str, call) -> list[str]:
    """Why the fused backward cannot take this forward call (a cdam_fast.opspec.Call): every
    backward kernel launches one program per row block of one side (flat one-dimensional grids,
    kernels/common.flat_grid); the composite ops also recompute J with pairwise_jsd (one program
    per tile pair). Offsets are 64-bit."""
    B, N, M = call.batch, call.tokens(), call.keys()
    programs = B * cdiv(max(N, M), _common.MIN_TILE)
    if op in COMPOSITE_OPS:
        programs = max(programs, B * cdiv(N, _common.MIN_TILE) ** 2)
    return limit_reason("programs per backward launch", programs, _common.MAX_GRID_X, "one-dimensional launch grid")


__all__ = ["cdam_attention_backward", "cdam_map_backward", "jsd_attention_backward",
           "multiscale_cdam_attention_backward", "multiscale_cdam_map_backward", "not_supported_reasons",
           "pairwise_jsd_backward"]
