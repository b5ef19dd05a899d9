"""Segment a folder (or globs / lists of paths, as `cdam-fast segment` takes them) with Ray Data
and write one label PNG per image.

    pip install -e ".[clip,ray]"
    python scripts/ray_segment.py photos/ --classes "background,cat,sofa" --out labels/ \
        --num-actors 4 --num-gpus 1 --batch-size 8                 # 4 GPU actors
    python scripts/ray_segment.py photos/ --classes-file voc21 --out labels/ --num-actors 2 --num-gpus 0 \
        --pretrained none --templates single                       # CPU smoke run, random weights
    python scripts/ray_segment.py photos/ ... --read-images        # decode with ray.data.read_images

Outputs: OUT/<name>_labels.png (8-bit class indices, input size; names as `cdam-fast segment`
gives them) and, with --shares, OUT/shares.jsonl (per image: path, error, share of each class).
Without --read-images the paths are listed here and every actor reads its images with
cdam_fast's reader (the same as `segment`'s); --read-images lets Ray decode instead (no EXIF
orientation). Images that fail are listed at the end and give a non-zero exit status. Connects
to the running cluster (`ray start` / RAY_ADDRESS) or starts a local one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _write_labels(batch, out: str, names: dict) -> dict:
    """Runs in Ray tasks: each row's label PNG; returns path, error and the file written."""
    from cdam_fast.pipeline.visualize import save_labels

    files = []
    for path, labels, error in zip(batch["path"], batch["labels"], batch["error"]):
        if error:
            files.append("")
            continue
        path = str(path)
        # read_images may report a path without its leading "/"
        name = names.get(os.path.abspath(path)) or names[os.path.abspath(os.sep + path)]
        target = Path(out) / f"{name}_labels.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part.png")
        save_labels(labels, tmp)
        tmp.replace(target)
        files.append(str(target))
    keep = {"path": batch["path"], "error": batch["error"], "file": files}
    if "shares" in batch:
        keep["shares"] = batch["shares"]
    return keep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="image files, folders, globs or .txt lists of paths")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help='comma-separated class names (synonyms joined by ";")')
    src.add_argument("--classes-file", help="one class per line, or a packaged list (voc21, ...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing label files")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--pretrained", default="openai", help="open_clip tag, checkpoint path, or none")
    p.add_argument("--method", default="maskclip")
    p.add_argument("--no-cdam", action="store_true")
    p.add_argument("--mode", default="window", choices=("window", "global"))
    p.add_argument("--templates", default="openai")
    p.add_argument("--num-actors", type=int, default=1, help="model replicas (Ray actors)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default 1 if the cluster has GPUs)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch handed to an actor")
    p.add_argument("--shares", action="store_true", help="also write OUT/shares.jsonl")
    p.add_argument("--read-images", action="store_true", help="decode with ray.data.read_images")
    args = p.parse_args(argv)

    import ray

    from cdam_fast.pipeline.bulk import output_files
    from cdam_fast.pipeline.inputs import expand_inputs
    from cdam_fast.pipeline.ray_data import RaySegmenter
    from cdam_fast.pipeline.text import read_class_file

    out = Path(args.out)
    items = expand_inputs(args.inputs, exclude=out)
    existing = [f[0] for f in output_files(items, out) if f[0].exists()]
    if existing and not args.overwrite:
        print(f"error: {len(existing)} label file(s) exist (e.g. {existing[0]}); pass --overwrite or choose "
              "another --out", file=sys.stderr)
        return 2
    classes = read_class_file(args.classes_file) if args.classes_file else args.classes
    ray.init()
    gpus = args.num_gpus if args.num_gpus is not None else (1 if ray.cluster_resources().get("GPU") else 0)
    if args.read_images:
        ds = ray.data.read_images([it.path for it in items], include_paths=True, mode="RGB")
    else:
        ds = ray.data.from_items([{"path": it.path} for it in items])
    names = {os.path.abspath(it.path): it.name for it in items}
    options = dict(classes=classes, model=args.model, pretrained=None if args.pretrained == "none" else args.pretrained,
                   method=args.method, cdam=not args.no_cdam, mode=args.mode, templates=args.templates,
                   shares=args.shares, device="cuda" if gpus else "cpu")
    ds = ds.map_batches(RaySegmenter, fn_constructor_kwargs=options, batch_size=args.batch_size,
                        concurrency=args.num_actors, num_gpus=gpus)
    ds = ds.map_batches(_write_labels, fn_kwargs={"out": str(out), "names": names}, batch_size=args.batch_size)
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
        print(f"error: {path}: {error}", file=sys.stderr)
    print(f"{len(items)} images: {done} labelled into {out}, {len(failed)} failed", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
