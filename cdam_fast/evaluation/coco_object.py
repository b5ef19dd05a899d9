"""Make COCO-Object labels from COCO-Stuff 164k labels.

COCO-Object is COCO-Stuff with every stuff class folded into background: the 80 thing classes
(COCO-Stuff train ids 0..79) become 1..80, the 91 stuff classes (80..170) become 0, and
unlabelled pixels (255) stay ignored. Each ROOT/annotations/SPLIT/X_labelTrainIds.png gets a
sibling X_instanceTrainIds.png, the file the coco_object reader looks for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .datasets import DATASETS, IGNORE_INDEX, DatasetError, read_label

NUM_THINGS = 80


def stuff_to_object(stuff: np.ndarray) -> np.ndarray:
    """COCO-Stuff train ids (0..170, 255) -> COCO-Object ids (0 background, 1..80 things, 255)."""
    out = np.where(stuff < NUM_THINGS, stuff + 1, 0)
    return np.where(stuff == IGNORE_INDEX, IGNORE_INDEX, out).astype(np.uint8)


def make_coco_object_labels(root, split: str = "val2017", overwrite: bool = False, progress: bool = True) -> int:
    """Write the COCO-Object label maps under `root`; returns how many were written.

    Existing *_instanceTrainIds.png files are kept unless `overwrite`.
    """
    stuff_layout = DATASETS["coco_stuff171"].layout.resolve(split)
    object_layout = DATASETS["coco_object"].layout.resolve(split)
    label_dir = Path(root).expanduser() / stuff_layout.label_dir
    if not label_dir.is_dir():
        raise DatasetError(f"COCO-Stuff label folder {str(label_dir)!r} does not exist (is --root the COCO-Stuff root?)")
    sources = sorted(label_dir.glob("*" + stuff_layout.label_suffix))
    if not sources:
        raise DatasetError(f"no *{stuff_layout.label_suffix} files in {str(label_dir)!r}")
    targets = [p.with_name(p.name[: -len(stuff_layout.label_suffix)] + object_layout.label_suffix) for p in sources]
    pending = [(s, t) for s, t in zip(sources, targets) if overwrite or not t.exists()]
    for src, dst in tqdm(pending, desc="COCO-Object labels", unit="img", disable=not progress):
        stuff = read_label(src, DATASETS["coco_stuff171"].num_classes, reduce_zero_label=False)
        Image.fromarray(stuff_to_object(stuff)).save(dst)  # uint8 array -> greyscale "L" PNG
    return len(pending)
