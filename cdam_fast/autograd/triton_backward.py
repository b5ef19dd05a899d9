"""The Triton backward functions (kernels/jsd_backward.py, kernels/cdam_backward.py) under the
names ops.py dispatches to."""
from ..kernels.cdam_backward import cdam_attention_backward
from ..kernels.jsd_backward import jsd_attention_backward, pairwise_jsd_backward

__all__ = ["cdam_attention_backward", "jsd_attention_backward", "pairwise_jsd_backward"]
