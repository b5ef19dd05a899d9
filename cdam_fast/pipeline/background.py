"""Background thresholds and the final labelling (spec section 4).

prob = softmax(logit_scale * logits) over the output classes; a pixel whose top probability is
below the threshold is labelled background (class 0). The entropy-adaptive threshold is
thr = 0.5 * 2.5 / ((min_t H_t + max_t H_t) / 2), H_t the base-2 entropy of prob at patch
token t. "entropy" takes the min and max over all tokens of the image (every window);
"entropy-per-window" reproduces the published code, which recomputes it per window and keeps
the last window's value. A float is a fixed threshold (the other methods' protocol); None
labels every pixel with its argmax.

With synonyms kept apart (synonyms="max"), logits have one row per synonym and `owner` maps
each row to its class: a class's probability is the max of its synonyms' probabilities under
the softmax over all synonyms (the published codes), so the label is the owner of the best
synonym and the top probability the best synonym's. The entropy threshold is computed from the
class-level distribution, softmax(logit_scale * per-class max logit).
"""
from __future__ import annotations

import math

import torch

from ..validation import CdamInputError

LOGIT_SCALE = 50.0
ENTROPY_MODES = ("entropy", "entropy-per-window")
# Every named rule (a float threshold and None are the other choices); CLI choice lists use it.
RULES = ("auto", *ENTROPY_MODES)
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


def entropy_range(token_logits: torch.Tensor, logit_scale: float = LOGIT_SCALE) -> tuple:
    """(min H, max H) over the tokens of token logits [..., C]: all the threshold needs, so
    that the tokens of a huge image can be pooled a band at a time."""
    prob = torch.softmax(logit_scale * token_logits.float().reshape(-1, token_logits.shape[-1]), dim=-1)
    h = -(torch.xlogy(prob, prob).sum(-1)) / math.log(2.0)
    return h.min(), h.max()


def threshold_of_range(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    # Every token one-hot (H = 0 everywhere) makes the published formula infinite: all background.
    return 0.5 * 2.5 / ((low + high) / 2).clamp_min(1e-12)


def entropy_threshold(token_logits: torch.Tensor, logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Threshold from token logits [..., C] (all tokens pooled): 2.5 / (min H + max H)."""
    return threshold_of_range(*entropy_range(token_logits, logit_scale))


def top_probability(logits: torch.Tensor, logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """max_c softmax(logit_scale * logits) over dim 0, without materialising the softmax."""
    z = logit_scale * logits.float()
    return 1.0 / torch.exp(z - z.amax(0, keepdim=True)).sum(0)


def describe(background) -> str:
    """One line naming an effective background rule (printed by the CLIs)."""
    if background is None:
        return "none (argmax)"
    if isinstance(background, float):
        return f"fixed probability threshold {background:g}"
    if background == "entropy":
        return "entropy threshold, one per image (all windows' tokens)"
    return "entropy threshold of the last window (the published code's rule)"


def class_logits(logits: torch.Tensor, owner: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """[S, ...] synonym logits -> [C, ...]: each class's best synonym (identity when owner is None)."""
    if owner is None:
        return logits
    idx = owner.to(logits.device).reshape(-1, *([1] * (logits.dim() - 1))).expand_as(logits)
    out = torch.full((num_classes, *logits.shape[1:]), float("-inf"), dtype=logits.dtype, device=logits.device)
    return out.scatter_reduce(0, idx, logits, reduce="amax")


def label(logits: torch.Tensor, threshold=None, logit_scale: float = LOGIT_SCALE, owner=None) -> torch.Tensor:
    """[S, ...] logits -> [...] int64 labels; below `threshold` top probability -> class 0.
    owner: [S] class of each row (synonyms kept apart), None for one row per class."""
    out = logits.max(0).indices  # argmax(0), first maximum on ties too; several times faster on CPU
    if owner is not None:
        out = owner.to(out.device)[out]
    if threshold is not None:
        out = torch.where(top_probability(logits, logit_scale) < threshold, torch.zeros_like(out), out)
    return out
