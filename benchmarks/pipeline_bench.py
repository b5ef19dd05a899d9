"""The whole pipeline per image: cdam_fast.pipeline.Segmenter with random weights.

Timing does not depend on the weights, so the model is built with pretrained="none" and no
download is needed. Building the segmenter (model and text embeddings, one template per
prompt since the text side is set-up) is not timed; one image's prediction is, on images of
the case's size rotated between calls. Implementations:

* a backend name: ``Segmenter(backend=name).predict(image)``, the fast pipeline;
* "published": ``cdam_fast.pipeline.reference_pipeline.reference_segment``, the plain
  re-implementation in the published order (one window at a time, explicit attention
  matrices, the torch reference's CDAM map), on a reference-backend Segmenter's model;
* NO_CDAM: the fast pipeline without the CDAM refinement (what CDAM costs on top).
"""
from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from .cases import Case

NO_CDAM = "maskclip-no-cdam"  # the pipeline without the CDAM refinement, for context


def load_segmenter_class():
    """(Segmenter, None) or (None, reason) without failing when the pipeline is missing."""
    try:
        from cdam_fast.pipeline import Segmenter
    except Exception as e:  # ImportError, or the module not written yet
        return None, f"skipped: pipeline not available ({type(e).__name__}: {e})"
    return Segmenter, None


def class_names(count: int) -> list[str]:
    """The first `count` VOC21 class names (the list ships with the package)."""
    text = resources.files("cdam_fast").joinpath("data/classes/voc21.txt").read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not 1 <= count <= len(names):
        raise ValueError(f"pipeline cases take 1 to {len(names)} classes, got {count}")
    return names[:count]


def random_images(case: Case, n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = case.image
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def build(case: Case, impl: str, device: torch.device, model: str):
    """predict(image) for implementation `impl` (a backend name, "published" or NO_CDAM)."""
    Segmenter, why = load_segmenter_class()
    if Segmenter is None:
        raise RuntimeError(why)
    cdam = impl != NO_CDAM
    backend = {"published": "reference", NO_CDAM: "auto"}.get(impl, impl)
    seg = Segmenter(class_names(case.C), model=model, pretrained="none", method="maskclip", cdam=cdam,
                    mode="window", backend=backend, device=str(device), templates="single", progress=False)
    if impl == "published":
        from cdam_fast.pipeline.reference_pipeline import reference_segment

        return lambda image: reference_segment(seg, image)
    return seg.predict
