"""Evaluation on the standard segmentation benchmarks: dataset readers, mIoU as the field
computes it, a resumable (and torchrun-distributed) evaluation loop, and the published table.

    from cdam_fast.evaluation import open_dataset, evaluate
    ds = open_dataset("voc21", "data/VOCdevkit/VOC2012")
    result = evaluate(ds, predictor, output="cdam_eval/my-run")   # predictor: image -> [H, W] ids
    print(result.scores.miou)
"""
from .datasets import DATASETS, IGNORE_INDEX, DatasetError, SegmentationDataset, open_dataset
from .metrics import PredictionError, Scores, confusion_matrix, format_table, scores
from .runner import EvalResult, evaluate
from .store import StoreError

__all__ = ["DATASETS", "IGNORE_INDEX", "DatasetError", "EvalResult", "PredictionError", "Scores",
           "SegmentationDataset", "StoreError", "confusion_matrix", "evaluate", "format_table", "open_dataset",
           "scores"]
