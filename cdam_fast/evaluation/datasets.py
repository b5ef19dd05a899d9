"""Readers for the standard on-disk layouts of the segmentation benchmarks (mmsegmentation
conventions), each with its class list and label conventions.

A dataset is a list of (image, label) file pairs plus the rule that turns a stored label map
into class indices 0..K-1 with 255 = ignored. Nothing here depends on torch or on a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset root or file the readers cannot use; the message names the path and the fix."""


@dataclass(frozen=True)
class Layout:
    """Where images and labels live under ROOT. `{split}` in any field is replaced by the split.

    Pairs are found by listing `image_dir` recursively for `*image_suffix` (or by reading the
    ids in `id_file` where the layout has one); an image `image_dir/ID+image_suffix` pairs
    with `label_dir/ID+label_suffix`.
    """

    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    id_file: str | None = None

    def resolve(self, split: str) -> "Layout":
        f = lambda s: None if s is None else s.format(split=split)  # noqa: E731
        return Layout(f(self.image_dir), f(self.label_dir), self.image_suffix, self.label_suffix, f(self.id_file))


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    layout: Layout
    default_split: str
    class_file: str  # under cdam_fast/data/classes/
    num_classes: int
    # mmseg's reduce_zero_label: stored 0 ("other"/background) becomes ignored, k becomes k-1.
    reduce_zero_label: bool = False
    # whether class 0 is a background class (the pipeline's background threshold applies)
    has_background: bool = False

    def class_names(self) -> list[str]:
        text = resources.files("cdam_fast").joinpath("data", "classes", self.class_file).read_text()
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(names) != self.num_classes:  # a broken install, not a user error
            raise RuntimeError(f"{self.class_file} lists {len(names)} classes, expected {self.num_classes}")
        return names


_VOC = Layout("JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/{split}.txt")
_CONTEXT = Layout("JPEGImages", "SegmentationClassContext", ".jpg", ".png", "ImageSets/SegmentationContext/{split}.txt")
_COCO_STUFF = Layout("images/{split}", "annotations/{split}", ".jpg", "_labelTrainIds.png")
_COCO_OBJECT = Layout("images/{split}", "annotations/{split}", ".jpg", "_instanceTrainIds.png")
_CITYSCAPES = Layout("leftImg8bit/{split}", "gtFine/{split}", "_leftImg8bit.png", "_gtFine_labelTrainIds.png")
_ADE20K = Layout("images/{split}", "annotations/{split}", ".jpg", ".png")

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("voc21", "Pascal VOC 2012 (21 classes)", _VOC, "val", "voc21.txt", 21, has_background=True),
        DatasetSpec("voc20", "Pascal VOC 2012 without background", _VOC, "val", "voc20.txt", 20, reduce_zero_label=True),
        DatasetSpec("context60", "Pascal Context (60 classes)", _CONTEXT, "val", "context60.txt", 60, has_background=True),
        DatasetSpec("context59", "Pascal Context without background", _CONTEXT, "val", "context59.txt", 59,
                    reduce_zero_label=True),
        DatasetSpec("coco_object", "COCO-Object (80 things + background)", _COCO_OBJECT, "val2017", "coco_object.txt",
                    81, has_background=True),
        DatasetSpec("coco_stuff171", "COCO-Stuff 164k (171 classes)", _COCO_STUFF, "val2017", "coco_stuff171.txt", 171),
        DatasetSpec("cityscapes", "Cityscapes (19 train ids)", _CITYSCAPES, "val", "cityscapes.txt", 19),
        DatasetSpec("ade20k", "ADE20K (150 classes)", _ADE20K, "validation", "ade20k.txt", 150, reduce_zero_label=True),
    )
}
# the columns of the published CDAM table (spec section 5), in its order; CLIPer's rows use them too
TABLE_DATASETS = ("voc21", "context60", "coco_object")


@dataclass(frozen=True)
class Sample:
    id: str  # the pair's name relative to the image folder, without suffix; unique in the dataset
    image_path: Path
    label_path: Path


class SegmentationDataset:
    """The (image, label) pairs of one split of one benchmark, in a fixed (sorted) order."""

    def __init__(self, spec: DatasetSpec, root: Path, split: str, samples: list[Sample]):
        self.spec = spec
        self.root = root
        self.split = split
        self.samples = samples
        self.classes = spec.class_names()
        self.num_classes = spec.num_classes
        self.ignore_index = IGNORE_INDEX

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def load_image(self, sample: Sample) -> Image.Image:
        with Image.open(sample.image_path) as im:
            return im.convert("RGB")

    def load_label(self, sample: Sample) -> np.ndarray:
        """Class indices [H, W] (int64) in 0..K-1, IGNORE_INDEX where the pixel is not scored."""
        return read_label(sample.label_path, self.num_classes, self.spec.reduce_zero_label)

    def load_pair(self, sample: Sample) -> tuple:
        """(image, label) of a sample, or a DatasetError naming both files when their sizes differ
        (a prediction at the image's size could not be scored against that label)."""
        image, label = self.load_image(sample), self.load_label(sample)
        if label.shape != (image.height, image.width):
            raise DatasetError(f"label map {sample.label_path} is {label.shape[1]}x{label.shape[0]} (W x H) but its "
                               f"image {sample.image_path} is {image.width}x{image.height}; the dataset is corrupt "
                               "or mismatched")
        return image, label


def read_label(path: Path, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    with Image.open(path) as im:
        # palette PNGs (VOC) hold class indices; "L" / 16-bit grey hold them directly.
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(
                f"label map {path} has image mode {im.mode!r}; expected a single-channel index PNG "
                "(palette or greyscale). Colour-coded labels must be converted to class indices first."
            )
        raw = np.asarray(im).astype(np.int64)
    if reduce_zero_label:
        label = np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)
        stored_max = num_classes  # stored values are 0..K
    else:
        label = raw
        stored_max = num_classes - 1
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    if bad.any():
        values = sorted(set(np.unique(raw[bad]).tolist()))[:10]
        raise DatasetError(
            f"label map {path} holds values {values} outside 0..{stored_max} (and {IGNORE_INDEX} = ignore); "
            f"is --dataset right for this root?"
        )
    return label


def open_dataset(name: str, root, split: str | None = None, limit: int | None = None) -> SegmentationDataset:
    """Open split `split` (default: the benchmark's validation split) of dataset `name` at `root`.

    `limit` keeps the first `limit` pairs in sorted order (a quick partial run).
    """
    if name not in DATASETS:
        raise DatasetError(f"dataset {name!r} is not known; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {str(root)!r} does not exist or is not a directory")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer, got {limit!r}")
    split = split or spec.default_split
    layout = spec.layout.resolve(split)
    _check_layout(spec, layout, root, split)
    samples = _list_samples(spec, layout, root, limit)
    return SegmentationDataset(spec, root, split, samples)


def _check_layout(spec: DatasetSpec, layout: Layout, root: Path, split: str) -> None:
    expected = [layout.image_dir, layout.label_dir] + ([layout.id_file] if layout.id_file else [])
    missing = [p for p in expected if not (root / p).exists()]
    if not missing:
        return
    hint = ""
    others = [s.name for s in DATASETS.values() if s.layout != spec.layout and _layout_present(s, root)]
    if others:
        hint = f" The root looks like the layout of: {', '.join(others)}."
    raise DatasetError(
        f"{str(root)!r} does not have the {spec.title} layout for split {split!r}: missing "
        f"{', '.join(missing)} (expected {', '.join(expected)}).{hint}"
    )


def _layout_present(spec: DatasetSpec, root: Path) -> bool:
    layout = spec.layout.resolve(spec.default_split)
    if not ((root / layout.image_dir).is_dir() and (root / layout.label_dir).is_dir()):
        return False
    if layout.id_file:
        return (root / layout.id_file).is_file()
    return next((root / layout.label_dir).rglob("*" + layout.label_suffix), None) is not None


def _list_samples(spec: DatasetSpec, layout: Layout, root: Path, limit: int | None) -> list[Sample]:
    image_dir, label_dir = root / layout.image_dir, root / layout.label_dir
    if layout.id_file:
        lines = (root / layout.id_file).read_text().split()
        ids = sorted(dict.fromkeys(lines))
    else:
        ids = sorted(
            p.relative_to(image_dir).as_posix()[: -len(layout.image_suffix)]
            for p in image_dir.rglob("*" + layout.image_suffix)
        )
    if not ids:
        raise DatasetError(f"no images found for {spec.title} in {str(image_dir)!r} (*{layout.image_suffix})")
    if limit is not None:
        ids = ids[:limit]
    samples = [Sample(i, image_dir / (i + layout.image_suffix), label_dir / (i + layout.label_suffix)) for i in ids]
    missing = [s for s in samples if not s.image_path.is_file() or not s.label_path.is_file()]
    if missing:
        s = missing[0]
        what = s.image_path if not s.image_path.is_file() else s.label_path
        hint = ""
        if spec.name == "coco_object" and not s.label_path.is_file():
            hint = " (make COCO-Object labels from COCO-Stuff with `cdam-fast make-coco-object --root ROOT`)"
        raise DatasetError(f"{len(missing)} of {len(samples)} {spec.title} pairs are incomplete; first missing file: "
                           f"{str(what)!r}{hint}")
    return samples
