"""Segmentation metrics as the field computes them (mmsegmentation's IoUMetric).

Per-class intersection and union are summed over the whole dataset in one confusion matrix
(rows: ground truth, columns: prediction), pixels labelled IGNORE_INDEX are not scored, and
mIoU is the mean over the classes whose union is non-zero: a class absent from the ground
truth but predicted somewhere scores IoU 0, a class neither present nor predicted is left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets import IGNORE_INDEX


class PredictionError(ValueError):
    """A prediction that cannot be scored against its label map."""


def confusion_matrix(label: np.ndarray, pred, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[K, K] int64 pixel counts, entry (g, p) = pixels of ground-truth class g predicted as p."""
    pred = np.asarray(pred)
    if pred.shape != label.shape:
        raise PredictionError(
            f"prediction has shape {pred.shape} but the label map has shape {label.shape}; "
            "predictions must be at the original image size"
        )
    if not np.issubdtype(pred.dtype, np.integer):
        raise PredictionError(f"prediction must hold integer class indices, got dtype {pred.dtype}")
    valid = label != ignore_index
    gt, pr = label[valid].astype(np.int64), pred[valid].astype(np.int64)
    if pr.size and (pr.min() < 0 or pr.max() >= num_classes):
        raise PredictionError(f"prediction holds class indices outside 0..{num_classes - 1} "
                              f"(min {pr.min()}, max {pr.max()})")
    return np.bincount(gt * num_classes + pr, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def to_sparse(conf: np.ndarray) -> list[list[int]]:
    """Non-zero entries as [gt, pred, count] triples: a per-image matrix is mostly zeros."""
    g, p = np.nonzero(conf)
    return [[int(a), int(b), int(conf[a, b])] for a, b in zip(g, p)]


def add_sparse(conf: np.ndarray, triples) -> np.ndarray:
    """Add [gt, pred, count] triples into `conf` in place (and return it)."""
    for g, p, n in triples:
        conf[g, p] += n
    return conf


def from_sparse(triples, num_classes: int) -> np.ndarray:
    return add_sparse(np.zeros((num_classes, num_classes), dtype=np.int64), triples)


@dataclass
class Scores:
    iou: np.ndarray  # [K] per-class IoU, NaN where the union is zero
    acc: np.ndarray  # [K] per-class accuracy (recall), NaN where the class is absent from the ground truth
    miou: float
    macc: float
    aacc: float  # pixel accuracy over all scored pixels

    def as_dict(self, classes) -> dict:
        nan_none = lambda x: None if np.isnan(x) else float(x)  # noqa: E731  (JSON has no NaN)
        return {
            "mIoU": nan_none(self.miou),
            "mAcc": nan_none(self.macc),
            "aAcc": nan_none(self.aacc),
            "per_class": {c: {"IoU": nan_none(i), "Acc": nan_none(a)} for c, i, a in zip(classes, self.iou, self.acc)},
        }


def scores(conf: np.ndarray) -> Scores:
    conf = np.asarray(conf, dtype=np.int64)
    inter = np.diag(conf).astype(np.float64)
    gt_area = conf.sum(axis=1).astype(np.float64)
    pred_area = conf.sum(axis=0).astype(np.float64)
    union = gt_area + pred_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(gt_area > 0, inter / gt_area, np.nan)
        total = conf.sum()
        aacc = inter.sum() / total if total else np.nan
    miou = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
    macc = float(np.nanmean(acc)) if np.any(gt_area > 0) else float("nan")
    return Scores(iou=iou, acc=acc, miou=miou, macc=macc, aacc=float(aacc))


def format_table(classes, s: Scores) -> str:
    """Per-class IoU / accuracy (percent) and the summary line, as plain text."""
    width = max(12, max(len(c) for c in classes) + 2)
    pct = lambda x: "    -" if np.isnan(x) else f"{100 * x:5.2f}"  # noqa: E731
    lines = [f"{'class':<{width}} {'IoU':>6} {'Acc':>6}", "-" * (width + 14)]
    lines += [f"{c:<{width}} {pct(i):>6} {pct(a):>6}" for c, i, a in zip(classes, s.iou, s.acc)]
    lines += ["-" * (width + 14), f"mIoU {pct(s.miou)}   mAcc {pct(s.macc)}   aAcc {pct(s.aacc)}"]
    return "\n".join(lines)
