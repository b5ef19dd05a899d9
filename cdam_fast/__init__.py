"""cdam-fast: fused kernels for CDAM (class distribution-induced attention maps) and a thin
CLIP pipeline around them. See README.md."""
from . import _checkout, _threads

_checkout.install()  # kernels/, csrc/, benchmarks/ from a plain checkout as when installed

_threads.prepare_environment()  # before torch loads libgomp: the CLI's idle OpenMP threads sleep

from .dispatch import BACKENDS, BackendUnavailableError, available_backends
from .grids import CDAM_SCALES
from .ops import (
    DEFAULT_MEMORY_BUDGET,
    cdam_attention,
    cdam_map,
    jsd_attention,
    multiscale_cdam_attention,
    multiscale_cdam_map,
    pairwise_jsd,
)
from .validation import CdamInputError
from .autograd import register_autograd as _register_autograd

_register_autograd()  # gradients for every op (docs/autograd.md)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CDAM_SCALES",
    "DEFAULT_MEMORY_BUDGET",
    "BackendUnavailableError",
    "CdamInputError",
    "available_backends",
    "cdam_attention",
    "cdam_map",
    "jsd_attention",
    "multiscale_cdam_attention",
    "multiscale_cdam_map",
    "pairwise_jsd",
]


def __getattr__(name):
    # The pipeline pulls in open_clip; import it only when someone asks for it.
    if name == "Segmenter":
        from .pipeline import Segmenter

        return Segmenter
    raise AttributeError(f"module 'cdam_fast' has no attribute {name!r}")
