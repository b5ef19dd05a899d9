"""The pure-torch reference as a backend: any device, any float dtype, any size, every op.

Its forward is each op home's reference under the memory policy (OpSpec.run_reference: the
attention ops in bounded blocks of query rows when the whole map does not fit the budget); its
backward is the pure-torch formulas (it lists no backward of its own). Its jsd_attention
training forward saves the row log-sum-exp, as the Triton kernels do.
"""
from __future__ import annotations

from ..opspec import OPS, TRAINING_OPS
from ..validation import FLOAT_DTYPES
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = None
    dtypes = FLOAT_DTYPES
    ops = tuple(OPS)
    saved_stats = {op: OPS[op].stats_format for op in TRAINING_OPS if OPS[op].reference_train is not None}

    def forward(self, op, call, train=False):
        spec = OPS[op]
        if train and op in self.saved_stats:
            return spec.reference_train(*call.args(spec.params))
        return spec.run_reference(call), None
