"""`cdam-fast eval` (mIoU on a benchmark, resumable, torchrun-aware) and
`cdam-fast make-coco-object` (COCO-Object labels from COCO-Stuff)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..distributed import distributed_context
from .coco_object import make_coco_object_labels
from .datasets import DATASETS, DatasetError, open_dataset
from .metrics import PredictionError, format_table
from .predictors import (
    DEFAULT_OUTPUT_ROOT, UsageError, describe_background, load_factory, pipeline_config, run_name,
    segmenter_predictor,
)
from .runner import check_output, evaluate
from .store import StoreError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="mIoU of the CLIP pipeline on a segmentation benchmark",
        description="Evaluate the segmentation pipeline on a benchmark (mIoU, mAcc, aAcc, per-class IoU). "
                    "Per-image results are kept in --output, so a rerun continues an interrupted run. "
                    "Under `torchrun --nproc_per_node=K` each process scores a shard of the images.")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="benchmark")
    p.add_argument("--root", required=True, help="dataset root folder (standard mmsegmentation layout)")
    p.add_argument("--split", default=None, help="split (default: the benchmark's validation split)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images (sorted by name)")
    _add_pipeline_options(p)
    p.add_argument("--output", default=None,
                   help="results folder (default: cdam_eval/DATASET-METHOD-cdam|nocdam-MODEL-PRETRAINED[-global])")
    p.add_argument("--overwrite", action="store_true", help="discard the results already in --output and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ..pipeline import cliper_options  # --method cliper's own options

    cliper_options.add_arguments(p, dataset_known=True)
    # for tests: MODULE:CALLABLE, called with the dataset, returning an `image -> label map` predictor
    p.add_argument("--predictor", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_eval)

    c = subparsers.add_parser(
        "make-coco-object", help="write COCO-Object labels (*_instanceTrainIds.png) from COCO-Stuff 164k",
        description="Fold COCO-Stuff 164k labels into COCO-Object: thing ids 0..79 -> 1..80, stuff -> 0 "
                    "(background), 255 stays ignored.")
    c.add_argument("--root", required=True, help="COCO-Stuff root (with annotations/SPLIT/*_labelTrainIds.png)")
    c.add_argument("--split", default=DATASETS["coco_stuff171"].default_split)
    c.add_argument("--overwrite", action="store_true", help="replace existing *_instanceTrainIds.png files")
    c.set_defaults(func=run_make_coco_object)


def _add_pipeline_options(p) -> None:
    # the option set shared with `segment` and the published table (pipeline/options.py); lazy so
    # that `eval --help` and the evaluation code work without the model stack
    from cdam_fast.pipeline.options import add_model_options, add_protocol_options

    add_model_options(p)
    add_protocol_options(p)


def run_eval(args) -> int:
    try:
        dataset = open_dataset(args.dataset, args.root, args.split, args.limit)
        if args.predictor is not None:
            factory, config = load_factory(args.predictor), {"predictor": args.predictor}
        else:
            from cdam_fast.pipeline import cliper_options
            from cdam_fast.pipeline.options import segmenter_options
            from cdam_fast.validation import CdamInputError

            try:
                protocol = segmenter_options(args)
                cliper = cliper_options.cliper_settings(args, dataset.name)
            except CdamInputError as e:
                raise UsageError(str(e)) from None
            config = pipeline_config(dataset, model=args.model, pretrained=args.pretrained, dtype=args.dtype,
                                     preset=args.preset, cliper=cliper, templates=args.templates,
                                     quick_gelu=args.quick_gelu, **protocol)
        output = Path(args.output) if args.output else DEFAULT_OUTPUT_ROOT / run_name(dataset.name, config)
        check_output(dataset, output, config, args.overwrite)  # before the (slow) model load
        use_cuda = None if args.predictor is None else False  # test predictors run on CPU (gloo)
        with distributed_context(use_cuda=use_cuda) as dist:
            if args.predictor is not None:
                predictor = factory(dataset)
            else:
                device = args.device or (str(dist.device) if dist.device is not None else None)
                predictor = segmenter_predictor(dataset, config, backend=args.backend, device=device,
                                                progress=dist.is_main and not args.no_progress,
                                                templates=args.templates, seed=args.seed,
                                                quick_gelu=args.quick_gelu, cache_dir=args.cache_dir)
            result = evaluate(dataset, predictor, output=output, config=config, overwrite=args.overwrite,
                              dist=dist, progress=not args.no_progress)
            if dist.is_main:
                print(f"{dataset.spec.title}, split {dataset.split}, {result.num_images} images, "
                      + ", ".join(f"{k}={v}" for k, v in config.items()))
                if "background" in config:
                    print(f"background rule: {describe_background(config)}")
                print(format_table(result.classes, result.scores))
                print(f"results: {output / 'result.json'}")
    except (DatasetError, StoreError, PredictionError, UsageError) as e:
        print(f"cdam-fast eval: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # e.g. the `clip` extra is missing: its install hint, not a traceback
        print(f"cdam-fast eval: error: {e}", file=sys.stderr)
        return 1
    return 0


def run_make_coco_object(args) -> int:
    try:
        n = make_coco_object_labels(args.root, args.split, overwrite=args.overwrite)
    except DatasetError as e:
        print(f"cdam-fast make-coco-object: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} COCO-Object label maps")
    return 0
