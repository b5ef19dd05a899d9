"""Segment a folder (or globs / lists of paths, as `cdam-fast segment` takes them) with Ray Data
and write each image's files as `cdam-fast segment` does.

    pip install -e ".[clip,ray]"
    python scripts/ray_segment.py photos/ --classes "background,cat,sofa" --out labels/ \
        --num-actors 4 --num-gpus 1 --batch-size 8                 # 4 GPU actors
    python scripts/ray_segment.py photos/ --classes-file voc21 --out labels/ --num-actors 2 --num-gpus 0 \
        --pretrained none --templates single                       # CPU smoke run, random weights
    python scripts/ray_segment.py photos/ ... --read-images        # decode with ray.data.read_images

Outputs, as `cdam-fast segment` names and writes them (cdam_fast.pipeline.fileio; each actor
writes its images' files): OUT/<name>_labels.png (class indices, input size, a palette PNG
coloured like the overlay), OUT/<name>_overlay.png and OUT/<name>_classes.json (label value ->
class), and, with --shares, OUT/shares.jsonl (per image: path, error, share of each class).
No manifest: a rerun redoes every image (use `cdam-fast segment` under torchrun to resume).
Without --read-images the paths are listed here and every actor reads its images with
cdam_fast's reader (the same as `segment`'s); --read-images lets Ray decode instead (no EXIF
orientation). Images that fail are listed at the end; the exit status is 1 when some failed, 2
when all did. Connects
to the running cluster (`ray start` / RAY_ADDRESS) or starts a local one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="image files, folders, globs or .txt lists of paths")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help='comma-separated class names (synonyms joined by ";")')
    src.add_argument("--classes-file", help="one class per line, or a packaged list (voc21, ...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    from cdam_fast.pipeline.options import add_model_options, add_protocol_options

    add_model_options(p)  # the same model and protocol options as `cdam-fast segment`
    add_protocol_options(p)
    p.add_argument("--num-actors", type=int, default=1, help="model replicas (Ray actors)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default 1 if the cluster has GPUs)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch handed to an actor")
    p.add_argument("--shares", action="store_true", help="also write OUT/shares.jsonl")
    p.add_argument("--read-images", action="store_true", help="decode with ray.data.read_images")
    args = p.parse_args(argv)

    import ray

    from cdam_fast.pipeline.fileio import output_paths
    from cdam_fast.pipeline.inputs import expand_inputs
    from cdam_fast.pipeline.options import model_options, segmenter_options
    from cdam_fast.pipeline.ray_data import RaySegmenter
    from cdam_fast.pipeline.text import read_class_file

    out = Path(args.out)
    items = expand_inputs(args.inputs, exclude=out)
    existing = [p for group in output_paths(items, out) for p in group if p.exists()]
    if existing and not args.overwrite:
        print(f"error: {len(existing)} output file(s) exist (e.g. {existing[0]}); pass --overwrite or choose "
              "another --out", file=sys.stderr)
        return 2
    classes = read_class_file(args.classes_file) if args.classes_file else args.classes
    ray.init()
    gpus = args.num_gpus if args.num_gpus is not None else (1 if ray.cluster_resources().get("GPU") else 0)
    if args.read_images:
        ds = ray.data.read_images([it.path for it in items], include_paths=True, mode="RGB")
    else:
        ds = ray.data.from_items([{"path": it.path} for it in items])
    # output names by path as rows carry it (read_images may report a path without its leading "/")
    names = {}
    for it in items:
        names[it.path] = names[os.path.abspath(it.path)] = names[os.path.abspath(it.path).lstrip(os.sep)] = it.name
    options = dict(classes=classes, **model_options(args), **segmenter_options(args), shares=args.shares,
                   out=str(out), names=names)
    options["device"] = args.device or ("cuda" if gpus else "cpu")
    ds = ds.map_batches(RaySegmenter, fn_constructor_kwargs=options, batch_size=args.batch_size,
                        concurrency=args.num_actors, num_gpus=gpus)
    columns = ["path", "error", "files"] + (["shares"] if args.shares else [])
    ds = ds.select_columns(columns)  # the label maps stay with the actors that wrote them
    out.mkdir(parents=True, exist_ok=True)
    failed, done = [], 0
    shares = open(out / "shares.jsonl", "w") if args.shares else None
    for row in ds.iter_rows():
        if row["error"]:
            failed.append((row["path"], row["error"]))
        else:
            done += 1
        if shares is not None:
            shares.write(json.dumps({"path": row["path"], "error": row["error"] or None,
                                     "shares": None if row["error"] else [float(s) for s in row["shares"]]}) + "\n")
    if shares is not None:
        shares.close()
    for path, error in failed:
        print(f"error: {error}" if str(path) in error else f"error: {path}: {error}", file=sys.stderr)
    print(f"{len(items)} images: {done} labelled into {out}, {len(failed)} failed", file=sys.stderr)
    return 0 if not failed else (1 if done else 2)


if __name__ == "__main__":
    sys.exit(main())
