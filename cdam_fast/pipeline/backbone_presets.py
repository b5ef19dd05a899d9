"""Per-backbone settings that differ between CLIP image towers.

Users of CLIPer and SCLIP report per-backbone settings as the main pain: patch size, the short
side an image is resized to, and which layers a method reads. One preset per open_clip model
name; any other ViT gets `default_preset` (its own patch size, the last layer). The patch size
is also read from the loaded model, and a mismatch is an error (a preset for the wrong model).
"""
from __future__ import annotations

from dataclasses import dataclass

from .windows import SHORT_SIDE


@dataclass(frozen=True)
class BackbonePreset:
    model: str
    patch: int
    short_side: int = SHORT_SIDE  # our (mmseg) protocol: 448 for every backbone, 448 = 28 x 16 = 32 x 14
    cliper_set: int = -1  # CLIPer: which of the L last-block outputs is thresholded and propagated
    #                      (its configs' `select_layer`: -1 for ViT-B/16, -2 for ViT-L/14)


BACKBONES = {p.model: p for p in (
    BackbonePreset("ViT-B-16", 16),
    BackbonePreset("ViT-L-14", 14, cliper_set=-2),
    BackbonePreset("ViT-L-14-336", 14, cliper_set=-2),
    BackbonePreset("ViT-B-32", 32),
)}


def backbone_preset(backbone) -> BackbonePreset:
    """The preset of a loaded ClipBackbone (by model name; unknown ViTs get their own patch
    size and the defaults)."""
    patch = backbone.patch_size[0]
    preset = BACKBONES.get(backbone.name.replace("/", "-"))
    if preset is None:
        return BackbonePreset(backbone.name, patch)
    if preset.patch != patch:
        raise ValueError(f"backbone preset {preset.model!r} says patch {preset.patch}, the model has {patch}")
    return preset
