"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), the optional
post-processing of the published SCLIP / NACLIP / CDAM codes (off by default here).

For each pixel, its 8 neighbours at each dilation d (offsets in {-d, 0, d}^2 without the
centre, image borders replicated) get the affinity
    a_k = softmax_k( mean_channels( -|I - I_k| / (1e-8 + 0.1 * sigma) ) ),
sigma the per-channel standard deviation (unbiased) of the image over the pixel's 9 * len(d)
neighbourhood samples (centre included once per dilation). Each step replaces the mask by
the affinity-weighted sum of its neighbours' values: m <- sum_k a_k m_k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import CdamInputError

_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _shifted(x: torch.Tensor, dilations, centre: bool = False):
    """Views [K, H, W] of each pixel's neighbours in x [K, H, W] (replicated border): 8 (or 9
    with the centre) per dilation, in a fixed order."""
    H, W = x.shape[-2:]
    offsets = _OFFSETS + ((0, 0),) if centre else _OFFSETS
    for d in dilations:
        padded = F.pad(x[None], (d, d, d, d), mode="replicate")[0]
        for dy, dx in offsets:
            yield padded[:, d + dy * d:d + dy * d + H, d + dx * d:d + dx * d + W]


def pamr_affinity(image: torch.Tensor, dilations=(8, 16)) -> torch.Tensor:
    """[P, H, W] neighbour weights (summing to 1 over P) of an image [K, H, W]."""
    image = image.float()
    sigma = torch.stack(list(_shifted(image, dilations, centre=True))).std(0)  # [K, H, W]
    scores = torch.stack([(-(image - nb).abs() / (1e-8 + 0.1 * sigma)).mean(0) for nb in _shifted(image, dilations)])
    return torch.softmax(scores, dim=0)


def pamr(image: torch.Tensor, mask: torch.Tensor, steps: int = 10, dilations=(8, 16)) -> torch.Tensor:
    """Refine mask [C, H, W] (class scores) with the local affinities of image [K, H, W]
    (same H, W); float32 result on mask's device."""
    if image.dim() != 3 or mask.dim() != 3 or image.shape[-2:] != mask.shape[-2:]:
        raise CdamInputError(f"pamr: image [K, H, W] and mask [C, H, W] must share H, W; got "
                             f"{tuple(image.shape)} and {tuple(mask.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise CdamInputError(f"pamr steps must be an integer >= 0, got {steps!r}")
    dilations = tuple(dilations)
    if not dilations or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations):
        raise CdamInputError(f"pamr dilations must be positive integers, got {dilations!r}")
    aff = pamr_affinity(image.to(mask.device), dilations)
    mask = mask.float()
    for _ in range(steps):  # one neighbour at a time: never [C, P, H, W] in memory
        new = torch.zeros_like(mask)
        for a, nb in zip(aff, _shifted(mask, dilations)):
            new += a * nb
        mask = new
    return mask


__all__ = ["pamr", "pamr_affinity"]
