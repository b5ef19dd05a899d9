"""Predictors for the evaluation loop, and the configuration their results are stored under.

Shared by `cdam-fast eval` and the published-table runner, so that both name and key their
result folders the same way (a table run reuses and continues single `eval` runs).
"""
from __future__ import annotations

import importlib
from pathlib import Path

DEFAULT_OUTPUT_ROOT = Path("cdam_eval")


class UsageError(ValueError):
    """A command-line value the evaluation cannot use."""


def background_setting(value, dataset_has_background: bool):
    """--background text (or a Segmenter value) -> the Segmenter's `background` argument.
    "auto" / None: entropy on benchmarks with a background class, none otherwise."""
    from cdam_fast.pipeline.options import parse_background
    from cdam_fast.validation import CdamInputError

    if value is None or value == "auto":
        return "entropy" if dataset_has_background else None
    try:
        return parse_background(value) if isinstance(value, str) else value
    except CdamInputError as e:
        raise UsageError(str(e)) from None


def pipeline_config(dataset, *, method: str, cdam: bool, model: str, pretrained: str, mode: str = "window",
                    dtype: str | None = None, background=None, preset: str | None = None, cliper: dict | None = None,
                    templates: str = "openai", quick_gelu: bool | None = None, **protocol) -> dict:
    """What a stored result depends on (the kernel backend and device are left out: they change
    rounding, not the method). `protocol`: the other Segmenter protocol settings (resize,
    pos_interp, synonyms, PAMR, sizes, logit scale), stored as given. cliper: CLIPer's options
    (pipeline.cliper_options), for method "cliper" only."""
    from cdam_fast.pipeline.methods import method_names
    from cdam_fast.pipeline.options import PROTOCOL_KEYS

    if method not in method_names():
        raise UsageError(f"method must be one of {', '.join(method_names())}, got {method!r}")
    unknown = set(protocol) - set(PROTOCOL_KEYS)
    if unknown:
        raise UsageError(f"unknown pipeline settings: {', '.join(sorted(unknown))}")
    config = {"method": method, "cdam": bool(cdam), "model": model, "pretrained": pretrained, "mode": mode,
              "dtype": dtype, "background": background_setting(background, dataset.spec.has_background)}
    config.update(protocol)
    if preset is not None:
        config["preset"] = preset
    # the text side changes results too; stored only when not the default, so older runs match
    config.update({k: v for k, v in (("templates", templates), ("quick_gelu", quick_gelu)) if v not in (None, "openai")})
    if method == "cliper":  # CLIPer's protocol / combination / compensation are part of a result
        config.update(cliper or {})
        if config.get("protocol", "mmseg") != "mmseg":
            # CLIPer's protocol: the whole image at its short side, its own background thresholds
            config["mode"], config["background"] = "global", None
    return config


def describe_background(config: dict) -> str:
    """The background rule of a stored configuration, in words (printed by eval and the table)."""
    from cdam_fast.pipeline.background import describe

    return describe(config.get("background"))


def run_name(dataset_name: str, config: dict) -> str:
    if "predictor" in config:  # a test predictor, plus whatever else its caller varies
        others = [f"{k}-{v}" for k, v in config.items() if k != "predictor"]
        return "-".join([dataset_name, config["predictor"].replace(":", "."), *others])
    # the settings people vary most; the rest (dtype, background) is checked against run.json
    parts = [dataset_name, config["method"], "cdam" if config["cdam"] else "nocdam", config["model"],
             Path(str(config["pretrained"])).name]  # a checkpoint path contributes its file name
    if config["mode"] != "window":
        parts.append(config["mode"])
    if config.get("preset"):
        parts.append(config["preset"])
    if config.get("protocol", "mmseg") != "mmseg":  # CLIPer's protocol and compensation
        parts.append(config["protocol"])
    if config.get("compensation"):
        parts.append(config["compensation"])
    if config.get("cdam") and config.get("cdam_combine", "replace") != "replace":
        parts.append(config["cdam_combine"])
    if config.get("normalisation") not in (None, "once"):
        parts.append(f"{config['normalisation']}-normalisation")
    if config.get("pipeline") == "package" and config.get("protocol", "mmseg") != "mmseg":
        parts.append("package-pipeline")  # CLIPer's protocol around the package's own steps
    if config.get("sliding_crop") is not None:
        parts.append(f"slide{config['sliding_crop']}")
    return "-".join(p.replace("/", "_") for p in parts)


def segmenter_predictor(dataset, config: dict, *, backend: str = "auto", device=None, progress: bool = True,
                        backbone=None, **options):
    """The CLIP pipeline's `predict` for this dataset's classes. `backbone`: an already loaded
    ClipBackbone of config's model (shared between runs, with its text-embedding cache); the
    config's protocol settings and the other `options` go to Segmenter as they are."""
    # lazy: the evaluation code does not need the model stack
    from cdam_fast.pipeline import Segmenter, WeightsUnavailableError
    from cdam_fast.validation import CdamInputError

    from cdam_fast.pipeline.cliper_options import CONFIG_KEYS
    from cdam_fast.pipeline.options import PROTOCOL_KEYS

    protocol = {k: v for k, v in config.items() if k in PROTOCOL_KEYS or k in CONFIG_KEYS}
    try:
        segmenter = Segmenter(dataset.classes, model=backbone or config["model"], pretrained=config["pretrained"],
                              backend=backend, device=None if backbone else device, dtype=config["dtype"],
                              progress=progress, **protocol, **options)
    except (CdamInputError, WeightsUnavailableError) as e:
        raise UsageError(str(e)) from None
    return segmenter.predict


def load_backbone(model: str, pretrained: str, device=None, seed: int = 0, quick_gelu: bool | None = None):
    """The CLIP image/text towers, loaded once for several runs."""
    from cdam_fast.pipeline import WeightsUnavailableError, load_clip
    from cdam_fast.validation import CdamInputError

    try:
        return load_clip(model, pretrained, device, seed=seed, quick_gelu=quick_gelu)
    except (CdamInputError, WeightsUnavailableError) as e:
        raise UsageError(str(e)) from None


def load_factory(spec: str):
    """'module:callable' -> the callable (test predictors, selected from the command line)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"--predictor must look like module:callable, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--predictor {spec!r} cannot be loaded: {e}") from None
