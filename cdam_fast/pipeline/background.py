"""Background thresholds and the final labelling (spec section 4).

prob = softmax(logit_scale * logits) over the output classes; a pixel whose top probability is
below the threshold is labelled background (class 0). The entropy-adaptive threshold is
thr = 0.5 * 2.5 / ((min_t H_t + max_t H_t) / 2), H_t the base-2 entropy of prob at patch
token t. "entropy" takes the min and max over all tokens of the image (every window);
"entropy-per-window" reproduces the published code, which recomputes it per window and keeps
the last window's value. A float is a fixed threshold (the other methods' protocol); None
labels every pixel with its argmax.
"""
from __future__ import annotations

import math

import torch

from ..validation import CdamInputError

LOGIT_SCALE = 50.0
ENTROPY_MODES = ("entropy", "entropy-per-window")
BACKGROUND_NAME = "background"


def check_background(background, class_names) -> object:
    """The effective background option: None, "entropy", "entropy-per-window" or a float.
    "auto" means "entropy" when the first class is named "background", else None."""
    if background == "auto":
        return "entropy" if class_names[0].strip().lower() == BACKGROUND_NAME else None
    if background is None or background in ENTROPY_MODES:
        return background
    if isinstance(background, (int, float)) and not isinstance(background, bool):
        if not (math.isfinite(background) and 0.0 <= background <= 1.0):
            raise CdamInputError(f"background threshold must be a probability in [0, 1], got {background!r}")
        return float(background)
    raise CdamInputError(f"background must be 'auto', 'entropy', 'entropy-per-window', a float threshold or None, "
                         f"got {background!r}")


def entropy_threshold(token_logits: torch.Tensor, logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Threshold from token logits [..., C] (all tokens pooled): 2.5 / (min H + max H)."""
    prob = torch.softmax(logit_scale * token_logits.float().reshape(-1, token_logits.shape[-1]), dim=-1)
    h = -(torch.xlogy(prob, prob).sum(-1)) / math.log(2.0)
    # Every token one-hot (H = 0 everywhere) makes the published formula infinite: all background.
    return 0.5 * 2.5 / ((h.min() + h.max()) / 2).clamp_min(1e-12)


def top_probability(logits: torch.Tensor, logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """max_c softmax(logit_scale * logits) over dim 0, without materialising the softmax."""
    z = logit_scale * logits.float()
    return 1.0 / torch.exp(z - z.amax(0, keepdim=True)).sum(0)


def label(logits: torch.Tensor, threshold=None, logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """[C, ...] logits -> [...] int64 labels; below `threshold` top probability -> class 0."""
    out = logits.argmax(0)
    if threshold is not None:
        out = torch.where(top_probability(logits, logit_scale) < threshold, torch.zeros_like(out), out)
    return out
