"""Rerun the published CDAM table (spec section 5) and print it beside the paper's numbers.

Needs the datasets on disk and the CLIP weights: MaskCLIP, SCLIP, ClearCLIP and GEM, each with
and without CDAM, on VOC21, Context60 and COCO-Object (ViT-B/16). Every cell is an ordinary
resumable evaluation stored under OUTPUT/DATASET-METHOD-cdam|nocdam-MODEL-PRETRAINED (the folders
`cdam-fast eval` uses by default), so an interrupted table continues and finished `eval` runs
are reused. Works under torchrun like `cdam-fast eval`. Each column runs its dataset's published
preset (cdam-voc21, cdam-context60, cdam-coco-object: the OpenCV resize, the published
positional-embedding interpolation and the last-window background rule); flags override it.

    python scripts/published_table.py --voc21 data/VOCdevkit/VOC2012 \
        --context60 data/VOCdevkit/VOC2010 --coco-object data/coco_stuff164k
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..distributed import distributed_context
from .datasets import DATASETS, TABLE_DATASETS, DatasetError, open_dataset
from .metrics import PredictionError
from .predictors import (
    DEFAULT_OUTPUT_ROOT, UsageError, describe_background, load_backbone, load_factory, pipeline_config, run_name,
    segmenter_predictor,
)
from .runner import evaluate
from .store import StoreError

TABLE_METHODS = ("maskclip", "sclip", "clearclip", "gem")

# mIoU (%) published for ViT-B/16 without extra training (CDAM, ICLR 2025; spec section 5).
PUBLISHED = {
    ("maskclip", False): (33.1, 23.3, 24.8),
    ("maskclip", True): (55.9, 30.5, 34.3),
    ("sclip", False): (50.5, 25.8, 31.3),
    ("sclip", True): (59.0, 30.4, 34.5),
    ("clearclip", False): (50.7, 27.8, 33.0),
    ("clearclip", True): (57.6, 29.8, 34.5),
    ("gem", False): (52.1, 28.1, 33.8),
    ("gem", True): (58.7, 30.6, 35.2),
}
HEADERS = {"voc21": "VOC21", "context60": "Context60", "coco_object": "COCO-Object"}


def published(method: str, cdam: bool, dataset: str) -> float:
    return PUBLISHED[(method, cdam)][TABLE_DATASETS.index(dataset)]


def run_table(roots: dict, make_predictor, config_for, *, methods=TABLE_METHODS, limit=None,
              output=DEFAULT_OUTPUT_ROOT, dist=None, progress=True) -> dict:
    """mIoU (%) per (method, cdam, dataset) for every dataset in `roots` ({name: root}).

    make_predictor(dataset, config) -> predictor; config_for(dataset, method, cdam) -> the
    stored configuration of one cell.
    """
    results = {}
    for name in TABLE_DATASETS:
        if name not in roots:
            continue
        dataset = open_dataset(name, roots[name], limit=limit)
        if dist is None or dist.is_main:
            rule = config_for(dataset, methods[0], True).get("background", "the predictor's")
            print(f"{HEADERS[name]}: background rule: {describe_background({'background': rule})}")
        for method in methods:
            for cdam in (False, True):
                config = config_for(dataset, method, cdam)
                predictor = make_predictor(dataset, config)
                result = evaluate(dataset, predictor, output=Path(output) / run_name(name, config), config=config,
                                  dist=dist, progress=progress)
                results[(method, cdam, name)] = 100 * result.scores.miou
    return results


def format_comparison(results: dict, methods=TABLE_METHODS) -> str:
    """Markdown table: ours / published per dataset, one row per method and CDAM setting."""
    head = "| method | " + " | ".join(f"{HEADERS[d]} ours | {HEADERS[d]} paper" for d in TABLE_DATASETS) + " |"
    lines = [head, "|---" * (1 + 2 * len(TABLE_DATASETS)) + "|"]
    for method in methods:
        for cdam in (False, True):
            cells = []
            for d in TABLE_DATASETS:
                ours = results.get((method, cdam, d))
                cells += ["-" if ours is None else f"{ours:.1f}", f"{published(method, cdam, d):.1f}"]
            label = {"maskclip": "MaskCLIP", "sclip": "SCLIP", "clearclip": "ClearCLIP", "gem": "GEM"}.get(method, method)
            lines.append(f"| {label}{' + CDAM' if cdam else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="published_table", description=__doc__.split("\n\n")[0])
    for name in TABLE_DATASETS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="ROOT",
                       help=f"{DATASETS[name].title} root (left out: the column stays empty)")
    p.add_argument("--methods", nargs="+", default=list(TABLE_METHODS), choices=TABLE_METHODS)
    # the option set shared with `segment` and `eval` (pipeline/options.py); --preset defaults to
    # each column's cdam-DATASET preset
    from cdam_fast.pipeline.options import add_model_options, add_protocol_options

    add_model_options(p)
    add_protocol_options(p, method=False)
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each dataset (a smoke run)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT_ROOT), help="folder for the per-run result folders")
    p.add_argument("--no-progress", action="store_true")
    # CLIPer rows (its own protocol) beside CLIPer's published numbers
    p.add_argument("--cliper", action="store_true", help="add CLIPer rows (CLIPer's protocol): CLIPer, CLIPer + CDAM, "
                                                         "and CLIPer + SD compensation with --sd-weights")
    p.add_argument("--sd-weights", metavar="PATH", default=None,
                   help="local diffusers folder of Stable Diffusion 2.1-base for the compensated CLIPer row")
    # for tests: MODULE:CALLABLE called with (dataset, method, cdam), returning a predictor
    p.add_argument("--predictor", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    roots = {d: getattr(args, d) for d in TABLE_DATASETS if getattr(args, d)}
    if not roots:
        print("published_table: error: give at least one dataset root (--voc21, --context60, --coco-object)",
              file=sys.stderr)
        return 2
    try:
        with distributed_context(use_cuda=False if args.predictor else None) as dist:
            config_for, make_predictor = _cell_builders(args, dist)
            results = run_table(roots, make_predictor, config_for, methods=args.methods, limit=args.limit,
                                output=args.output, dist=dist, progress=not args.no_progress)
            cliper_results = {}
            if args.cliper:
                from .cliper_table import format_cliper_rows, run_cliper_rows

                cliper_results = run_cliper_rows(roots, make_predictor, lambda d, c, s: config_for(d, "cliper", c, s),
                                                 sd_weights=args.sd_weights, limit=args.limit, output=args.output,
                                                 dist=dist, progress=not args.no_progress)
            if dist.is_main:
                table = format_comparison(results, args.methods)
                if args.cliper:
                    table += "\n" + format_cliper_rows(cliper_results, args.sd_weights)
                print(table)
                out = Path(args.output) / "published_table.json"
                out.write_text(json.dumps({
                    "model": args.model, "pretrained": args.pretrained, "limit": args.limit,
                    "presets": {d: args.preset or table_preset(d) for d in roots},
                    "rows": [{"method": m, "cdam": c, "dataset": d, "mIoU": v, "published": published(m, c, d)}
                             for (m, c, d), v in results.items()],
                    "cliper_rows": [{"row": r, "dataset": d, "mIoU": v} for (r, d), v in cliper_results.items()],
                }, indent=2) + "\n")
                print(f"results: {out}")
    except (DatasetError, StoreError, PredictionError, UsageError) as e:
        print(f"published_table: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # the `clip` extra is missing: its install hint, not a traceback
        print(f"published_table: error: {e}", file=sys.stderr)
        return 1
    return 0


def table_preset(dataset_name: str) -> str:
    """The published preset of a table column (cdam-voc21, cdam-context60, cdam-coco-object)."""
    return f"cdam-{dataset_name.replace('_', '-')}"


def _cell_protocol(args, dataset, method, cdam, cliper=None):
    """(preset name, Segmenter protocol settings) of one cell: the column's preset (or --preset)
    under the explicit flags. CLIPer rows (cliper settings given) run CLIPer's own protocol, so
    no CDAM preset applies to them."""
    import copy

    from cdam_fast.pipeline.options import segmenter_options
    from cdam_fast.validation import CdamInputError

    cell = copy.copy(args)
    cell.preset = None if cliper else args.preset or table_preset(dataset.name)
    try:
        return cell.preset, segmenter_options(cell, method=method, cdam=cdam)
    except CdamInputError as e:
        raise UsageError(str(e)) from None


def _cell_builders(args, dist):
    """(config_for, make_predictor) for the CLIP pipeline, or for a test predictor factory
    MODULE:CALLABLE(dataset, method, cdam)."""
    if args.predictor is not None:
        factory = load_factory(args.predictor)

        def config_for(dataset, method, cdam, cliper=None):
            _, protocol = _cell_protocol(args, dataset, method, cdam, cliper)
            return {"predictor": args.predictor, "method": method, "cdam": cdam, "background": protocol["background"],
                    **(cliper or {})}

        def make_predictor(dataset, config):
            return factory(dataset, config["method"], config["cdam"])

        return config_for, make_predictor

    device = args.device or (str(dist.device) if dist.device is not None else None)

    def config_for(dataset, method, cdam, cliper=None):
        preset, protocol = _cell_protocol(args, dataset, method, cdam, cliper)
        return pipeline_config(dataset, model=args.model, pretrained=args.pretrained, dtype=args.dtype, preset=preset,
                               cliper=cliper, templates=args.templates, quick_gelu=args.quick_gelu, **protocol)

    backbone = None  # loaded at the first cell, then shared: one model load and text-embedding cache

    def make_predictor(dataset, config):
        nonlocal backbone
        backbone = backbone or load_backbone(args.model, args.pretrained, device, seed=args.seed,
                                             quick_gelu=args.quick_gelu)
        return segmenter_predictor(dataset, config, backend=args.backend, backbone=backbone,
                                   progress=dist.is_main and not args.no_progress, templates=args.templates,
                                   cache_dir=args.cache_dir)

    return config_for, make_predictor


if __name__ == "__main__":
    sys.exit(main())
