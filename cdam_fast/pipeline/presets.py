"""The preprocessing choices where our default and the published code differ, and the presets
that fix every setting of one published configuration (the one home of both lists).

Protocol choices (see docs/pipeline.md, "Presets and protocols", and docs/pipeline-defaults.md;
Segmenter's defaults are the published ones):

* resize: "opencv" (default) resizes the uint8 image with OpenCV's INTER_LINEAR (fixed-point
  weights, uint8 rounding) and then normalises, as the mmseg test pipeline of the published
  code does (opencv-python-headless, installed by the `clip` extra); "torch" resizes the float
  image with torch's bilinear interpolation on the segmenter's device (GPU-side preprocessing,
  no OpenCV).
* pos_interp: "published" resizes the positional-embedding table bicubically with
  scale_factor = (g + 0.1) / g0 per axis, the DINO-style call of the published code (torch
  uses the factor as given, so the table is sampled slightly shrunk); "size" resizes it to
  exactly g (size=g).
* synonyms: "max" (default) keeps one column per synonym and takes a class's probability as
  the max over its synonyms' probabilities (the published code); "mean" averages the synonyms'
  embeddings into one column per class (CLIPer's default: it takes one embedding per class).

A preset is a dict of `Segmenter` keyword arguments; `Segmenter(classes, **preset("cdam-voc21"))`
or `--preset cdam-voc21` on the command lines. Explicit arguments override a preset's values.
"""
from __future__ import annotations

from ..validation import CdamInputError

RESIZES = ("opencv", "torch")
POS_INTERPOLATIONS = ("published", "size")
SYNONYM_RULES = ("max", "mean")
PAMR_DILATIONS = (8, 16)  # the published codes' default (SCLIP, NACLIP, CDAM)

# The published protocol of CDAM (spec section 4) shared by its presets.
_CDAM = dict(method="maskclip", cdam=True, mode="window", short_side=448, long_side=2048, crop=448, stride=224,
             logit_scale=50.0, resize="opencv", pos_interp="published", synonyms="max", pamr_steps=0)
# NACLIP as its paper ran it (github.com/sinahmr/NACLIP configs): short side 336, 224 windows
# at stride 112 (VOC: the whole image), logit scale 40, fixed probability threshold 0.1 on
# datasets with a background class, PAMR with 10 steps at dilations 8 and 16.
_NACLIP = dict(method="naclip", cdam=False, mode="window", short_side=336, long_side=2048, crop=224, stride=112,
               logit_scale=40.0, resize="opencv", pos_interp="published", synonyms="max", pamr_steps=10,
               pamr_dilations=PAMR_DILATIONS)
# SCLIP (github.com/wangf3014/SCLIP configs) where its protocol needs nothing this package
# lacks: VOC21 also applies an area threshold (area_thd), which is not implemented here.
_SCLIP = dict(method="sclip", cdam=False, mode="window", short_side=336, long_side=2048, crop=224, stride=112,
              logit_scale=50.0, resize="opencv", pos_interp="published", synonyms="max", pamr_steps=0)

PRESETS = {
    # CDAM, spec sections 4-5: the last-window entropy rule on datasets with a background class.
    "cdam-voc21": {**_CDAM, "background": "entropy-per-window"},
    "cdam-context60": {**_CDAM, "background": "entropy-per-window"},
    "cdam-coco-object": {**_CDAM, "background": "entropy-per-window"},
    "cdam-voc20": {**_CDAM, "background": None},
    "cdam-context59": {**_CDAM, "background": None},
    "cdam-coco-stuff171": {**_CDAM, "background": None},
    "cdam-cityscapes": {**_CDAM, "background": None},
    "cdam-ade20k": {**_CDAM, "background": None},
    "naclip-voc21": {**_NACLIP, "mode": "global", "background": 0.1},
    "naclip-context60": {**_NACLIP, "background": 0.1},
    "naclip-coco-object": {**_NACLIP, "background": 0.1},
    "sclip-context60": {**_SCLIP, "background": 0.1},
    "sclip-coco-object": {**_SCLIP, "background": 0.1},
}
# The protocol every cdam-* preset shares: what "the published protocol" means in the docs.
PUBLISHED_PROTOCOL = {k: _CDAM[k] for k in ("resize", "pos_interp", "synonyms")}


def preset(name: str) -> dict:
    """Segmenter keyword arguments of a named preset (a fresh copy)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise CdamInputError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])


def check_choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise CdamInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


__all__ = ["PAMR_DILATIONS", "POS_INTERPOLATIONS", "PRESETS", "PUBLISHED_PROTOCOL", "RESIZES", "SYNONYM_RULES",
           "check_choice", "preset"]
