"""The one builder of the pipeline's command-line options, shared by `cdam-fast segment`,
`cdam-fast eval` and the published-table script, so that their choices and defaults agree.

Choice lists come from their homes (method registry, presets, backends, background rules);
defaults come from `Segmenter`'s signature. Every protocol option defaults to None on the
command line, meaning "the preset's value if a preset is given, else Segmenter's default";
`segmenter_options(args)` resolves them in that order (explicit flag > preset > default).
"""
from __future__ import annotations

import argparse
import inspect

from ..dispatch import BACKENDS
from ..validation import CdamInputError
from . import background as bg
from .methods import method_names, segmenter_class
from .model import DEFAULT_MODEL, DEFAULT_PRETRAINED, RANDOM_WEIGHTS_SEED
from .presets import POS_INTERPOLATIONS, PRESETS, RESIZES, SYNONYM_RULES, preset
from .segmenter import MODES, Segmenter

DTYPES = ("fp32", "fp16", "bf16")
# Segmenter arguments a preset or a flag may set (the protocol of one table cell).
PROTOCOL_KEYS = ("method", "cdam", "mode", "short_side", "long_side", "crop", "stride", "logit_scale", "background",
                 "resize", "pos_interp", "synonyms", "pamr_steps", "pamr_dilations")


def segmenter_defaults(method=None) -> dict:
    """The defaults of the protocol keys (the one home of those defaults): Segmenter's, under
    those a segmenter method's own class sets (CLIPer: no CDAM, its protocol's sizes)."""
    params = inspect.signature(Segmenter.__init__).parameters
    out = {k: params[k].default for k in PROTOCOL_KEYS}
    sub = segmenter_class(method)
    if sub is not None:
        own = inspect.signature(sub.__init__).parameters
        out.update({k: own[k].default for k in PROTOCOL_KEYS if k in own})
    return out


def parse_background(text):
    """--background text -> Segmenter's `background` value ("auto", a rule, a float or None)."""
    if text is None or text in bg.RULES:
        return text
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise CdamInputError(f"--background must be {', '.join(bg.RULES)}, none or a probability in [0, 1], "
                             f"got {text!r}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip model name (default {DEFAULT_MODEL})")
    p.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help="open_clip tag (downloaded on request), local checkpoint PATH, or 'none' for random "
                        f"weights from a fixed seed (default {DEFAULT_PRETRAINED})")
    p.add_argument("--seed", type=int, default=RANDOM_WEIGHTS_SEED, help="seed of the random weights for --pretrained none")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="CDAM op backend (default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="autocast dtype on CUDA (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--templates", default="openai", metavar="openai|single|FILE",
                   help="prompt templates: openai (the 80 ImageNet ones), single, or a file with one per line")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="QuickGELU activations (OpenAI CLIP checkpoints use them; default: follow the weights tag, "
                        "or the model's 'openai' tag for a local file)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="disk cache of text embeddings ('off' to disable; default $CDAM_FAST_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/cdam_fast or ~/.cache/cdam_fast)")


def add_protocol_options(p: argparse.ArgumentParser, method: bool = True) -> None:
    """--preset and the settings it fixes; method=False leaves out --method / --cdam (the
    published table chooses them per cell)."""
    p.add_argument("--preset", default=None, choices=tuple(PRESETS), metavar="PRESET",
                   help="every setting of one published configuration (explicit flags override it): "
                        + ", ".join(PRESETS))
    if method:
        p.add_argument("--method", default=None, choices=method_names(), help="last-layer method (default maskclip)")
        p.add_argument("--cdam", action=argparse.BooleanOptionalAction, default=None,
                       help="refine the method with CDAM (default on, off for cliper; --no-cdam: the method alone)")
    p.add_argument("--mode", default=None, choices=MODES,
                   help="sliding windows (published protocol) or the whole image at once (default window)")
    p.add_argument("--background", default=None, type=str,
                   help="auto (entropy threshold per image when the first class is 'background'), entropy, "
                        "entropy-per-window (the published rule), none, or a fixed probability threshold "
                        "(default auto, or the preset's)")
    p.add_argument("--resize", default=None, choices=RESIZES,
                   help="image resize: opencv (uint8 INTER_LINEAR, the published pipeline; opencv-python-headless, "
                        "installed by the 'clip' extra) or torch (float bilinear, on the device) (default opencv)")
    p.add_argument("--pos-interp", dest="pos_interp", default=None, choices=POS_INTERPOLATIONS,
                   help="positional-embedding resize: published (scale factor (g+0.1)/g0) or size (default published)")
    p.add_argument("--synonyms", default=None, choices=SYNONYM_RULES,
                   help="';'-joined synonyms: max over their probabilities (published) or one averaged "
                        "embedding (default max; mean for cliper)")
    p.add_argument("--pamr", dest="pamr_steps", type=int, default=None, metavar="STEPS",
                   help="PAMR refinement steps, 0 = off (default 0; NACLIP presets: 10)")
    p.add_argument("--short-side", dest="short_side", type=int, default=None,
                   help="images are resized to this short side (default 448)")
    p.add_argument("--long-side", dest="long_side", type=int, default=None,
                   help="... unless the long side would exceed this (default 2048)")
    p.add_argument("--crop", type=int, default=None, help="window size in window mode (default 448)")
    p.add_argument("--stride", type=int, default=None, help="window stride in window mode (default 224)")
    p.add_argument("--logit-scale", dest="logit_scale", type=float, default=None,
                   help="softmax scale of the class probabilities (default 50)")


def segmenter_options(args, **fixed) -> dict:
    """Segmenter keyword arguments for the protocol keys: explicit flags (and `fixed`, e.g. a
    table cell's method) over the preset over Segmenter's defaults."""
    chosen = preset(args.preset) if getattr(args, "preset", None) else {}
    method = fixed.get("method") or getattr(args, "method", None) or chosen.get("method")
    out = segmenter_defaults(method)
    out.update(chosen)
    for key in PROTOCOL_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = parse_background(value) if key == "background" else value
    out.update(fixed)
    _check_sizes(out)
    if out.get("resize") == "opencv":  # the default: a missing OpenCV is named before any model loads
        from .images import require_opencv

        require_opencv()
    return out


# protocol sizes and their flags: checked here, before any image is read or model loaded
_SIZE_FLAGS = {"short_side": "--short-side", "long_side": "--long-side", "crop": "--crop", "stride": "--stride"}


def _check_sizes(options: dict) -> None:
    for key, flag in _SIZE_FLAGS.items():
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CdamInputError(f"{flag} must be a positive number of pixels, got {value!r}")
    steps = options.get("pamr_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise CdamInputError(f"--pamr must be a number of steps >= 0, got {steps!r}")
    crop, stride = options.get("crop"), options.get("stride")
    if crop is not None and stride is not None and stride > crop:
        raise CdamInputError(f"--stride ({stride}) must not exceed --crop ({crop}): pixels between windows would get "
                             "no prediction")


def model_options(args) -> dict:
    """Segmenter keyword arguments of the model options (--pretrained none -> None)."""
    pretrained = args.pretrained
    if isinstance(pretrained, str) and pretrained.strip().lower() == "none":
        pretrained = None
    return dict(model=args.model, pretrained=pretrained, seed=args.seed, backend=args.backend, device=args.device,
                dtype=args.dtype, templates=args.templates, quick_gelu=args.quick_gelu, cache_dir=args.cache_dir)


__all__ = ["DTYPES", "MODES", "PROTOCOL_KEYS", "add_model_options", "add_protocol_options", "model_options",
           "parse_background", "segmenter_defaults", "segmenter_options"]
