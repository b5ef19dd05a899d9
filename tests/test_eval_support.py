"""Synthetic benchmark folders for the evaluation tests, and a deterministic fake predictor.

Every image is written losslessly (PNG data, whatever the layout's file suffix: PIL reads by
content) with its red channel holding the class index the fake predictor will return, so the
tests know each prediction exactly and compute the expected confusion matrix on their own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cdam_fast.evaluation.datasets import DATASETS

# Stored label values of each benchmark: (largest class value on disk, whether 0 is "reduced").
STORED_MAX = {"voc21": 20, "voc20": 20, "context60": 59, "context59": 59, "coco_object": 80,
              "coco_stuff171": 170, "cityscapes": 18, "ade20k": 150}
VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def expected_label(name: str, stored: np.ndarray) -> np.ndarray:
    """The label the reader must return, written independently of the reader: 255 stays
    ignored; datasets that reduce the zero label turn 0 into 255 and shift the rest down."""
    out = stored.astype(np.int64).copy()
    if name in ("voc20", "context59", "ade20k"):
        out = np.where(stored == 0, 255, np.where(stored == 255, 255, stored.astype(np.int64) - 1))
    return out


def _paths(name: str, root: Path, image_id: str, split: str):
    layout = DATASETS[name].layout.resolve(split)
    return root / layout.image_dir / (image_id + layout.image_suffix), root / layout.label_dir / (image_id + layout.label_suffix)


def write_pair(name: str, root: Path, image_id: str, stored_label: np.ndarray, prediction: np.ndarray,
               split: str | None = None) -> None:
    """One image (red channel = `prediction`) and its stored label map, at the layout's paths."""
    split = split or DATASETS[name].default_split
    image_path, label_path = _paths(name, root, image_id, split)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros(stored_label.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = prediction
    rgb[..., 1] = (np.arange(stored_label.size).reshape(stored_label.shape) * 7) % 251  # some texture
    Image.fromarray(rgb).save(image_path, format="PNG")
    data = np.ascontiguousarray(stored_label, dtype=np.uint8)
    if name.startswith("voc"):  # VOC stores palette PNGs; the palette must not leak into the indices
        label = Image.frombytes("P", data.shape[::-1], data.tobytes())
        label.putpalette(VOC_PALETTE)
    else:
        label = Image.fromarray(data)
    label.save(label_path, format="PNG")


def write_id_file(name: str, root: Path, ids, split: str | None = None) -> None:
    layout = DATASETS[name].layout.resolve(split or DATASETS[name].default_split)
    if layout.id_file:
        path = root / layout.id_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in ids))


def image_ids(name: str, n: int) -> list[str]:
    if name == "cityscapes":  # two cities, Cityscapes-style names
        return [f"{city}/{city}_{k:06d}_000019" for k, city in zip(range(n), ["aachen", "bonn"] * n)]
    if name.startswith("coco"):
        return [f"{k:012d}" for k in range(n)]
    return [f"2008_{k:06d}" for k in range(n)]


def build_dataset(name: str, root: Path, n: int = 4, seed: int = 0, ignore_frac: float = 0.1,
                  shapes=None) -> dict:
    """n random image/label pairs of benchmark `name` under root. Returns {id: (stored, prediction)}.

    Predictions equal the expected label on about 60% of pixels and are random classes elsewhere.
    """
    rng = np.random.default_rng(seed)
    k = DATASETS[name].num_classes
    out = {}
    for i, image_id in enumerate(image_ids(name, n)):
        h, w = shapes[i] if shapes else (int(rng.integers(5, 12)), int(rng.integers(5, 12)))
        stored = rng.integers(0, STORED_MAX[name] + 1, size=(h, w))
        stored[rng.random((h, w)) < ignore_frac] = 255
        label = expected_label(name, stored)
        pred = np.where((rng.random((h, w)) < 0.6) & (label != 255), label, rng.integers(0, k, size=(h, w)))
        write_pair(name, root, image_id, stored, pred)
        out[image_id] = (stored, pred)
    write_id_file(name, root, list(out))
    return out


def expected_confusion(name: str, pairs: dict) -> np.ndarray:
    """Confusion matrix counted pixel by pixel, independently of the metric code."""
    k = DATASETS[name].num_classes
    conf = np.zeros((k, k), dtype=np.int64)
    for stored, pred in pairs.values():
        label = expected_label(name, stored)
        for g, p in zip(label.ravel().tolist(), pred.ravel().tolist()):
            if g != 255:
                conf[g, p] += 1
    return conf


def channel_predictor(dataset):
    """Fake predictor for `cdam-fast eval --predictor test_eval_support:channel_predictor`."""
    return lambda image: np.asarray(image)[..., 0].astype(np.int64)


def test_channel_predictor_reads_back_what_was_written(tmp_path):
    pairs = build_dataset("ade20k", tmp_path, n=2)
    from cdam_fast.evaluation.datasets import open_dataset

    ds = open_dataset("ade20k", tmp_path)
    predict = channel_predictor(ds)
    for sample in ds.samples:
        np.testing.assert_array_equal(predict(ds.load_image(sample)), pairs[sample.id][1])


def table_predictor(dataset, method, cdam):
    """Fake predictor factory for the published-table runner: the channel predictor with CDAM,
    class 0 everywhere without it (so the two rows of a method differ)."""
    if cdam:
        return channel_predictor(dataset)
    return lambda image: np.zeros(np.asarray(image).shape[:2], dtype=np.int64)
