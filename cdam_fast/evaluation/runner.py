"""The evaluation loop: any predictor `image -> [H, W] class indices` against a dataset.

The loop knows nothing about models; the CLI builds the predictor. With a results folder the
loop is resumable (see store.py) and, under torchrun, each rank scores its shard of the images
and the confusion matrices are summed across ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..distributed import DistContext
from ..prefetch import prefetched
from .datasets import SegmentationDataset
from .metrics import PredictionError, Scores, add_sparse, confusion_matrix, scores
from .store import ResultStore

Predictor = Callable[[object], object]
PREFETCH = 2  # images decoded ahead of the predictor


@dataclass
class EvalResult:
    dataset: str
    split: str
    classes: list[str]
    confusion: np.ndarray  # [K, K] summed over all images (and ranks)
    num_images: int
    scores: Scores

    def as_dict(self, config: dict | None = None) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "num_images": self.num_images,
            "config": config or {},
            **self.scores.as_dict(self.classes),
            "confusion": self.confusion.tolist(),
        }


def evaluate(
    dataset: SegmentationDataset,
    predictor: Predictor,
    *,
    output=None,
    config: dict | None = None,
    overwrite: bool = False,
    dist: DistContext | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score `predictor` on every image of `dataset`.

    output: a folder for per-image results (resumable runs) and result.json; None keeps
    everything in memory. config: what the results belong to (a resumed run must match it).
    """
    dist = dist or DistContext()
    store, held = None, []
    try:
        if output is not None:
            store = ResultStore(output, _store_config(dataset, config), rank=dist.rank)

            def prepare():  # rank 0 holds the folder's run lock for the run (runstore.FolderLock)
                held.append(store.lock())
                store.prepare(overwrite=overwrite)

            dist.run_on_main(prepare, "prepare the output folder")
        return _evaluate(dataset, predictor, store, dist, progress)
    finally:
        for lock in held:
            lock.release()


def _evaluate(dataset, predictor, store, dist: DistContext, progress: bool) -> EvalResult:
    done = store.load() if store is not None else {}

    mine = [dataset[i] for i in dist.shard(len(dataset))]
    todo = [s for s in mine if s.id not in done]
    total = np.zeros((dataset.num_classes, dataset.num_classes), dtype=np.int64)
    for s in mine:
        if s.id in done:
            add_sparse(total, done[s.id])
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"eval {dataset.name}", unit="img",
               disable=not (progress and dist.is_main), dynamic_ncols=True)
    try:
        for sample, (image, label) in zip(todo, prefetched(dataset.load_pair, todo, PREFETCH)):
            conf = _score_one(dataset, predictor, sample, image, label)
            total += conf
            if store is not None:
                store.append(sample.id, conf)
            bar.update(1)
    finally:
        bar.close()
        if store is not None:
            store.close()

    total = dist.all_reduce_sum(total)
    result = EvalResult(dataset.name, dataset.split, dataset.classes, total, len(dataset), scores(total))
    if store is not None and dist.is_main:
        store.write_result(result.as_dict(store.config))
    dist.barrier()
    return result


def _score_one(dataset: SegmentationDataset, predictor: Predictor, sample, image, label) -> np.ndarray:
    pred = predictor(image)
    if hasattr(pred, "detach"):  # a torch tensor
        pred = pred.detach().cpu().numpy()
    try:
        return confusion_matrix(label, pred, dataset.num_classes, dataset.ignore_index)
    except PredictionError as e:
        raise PredictionError(f"image {sample.id!r}: {e}") from None


def check_output(dataset: SegmentationDataset, output, config: dict | None, overwrite: bool = False) -> None:
    """Refuse an output folder holding another configuration's results, writing nothing: callers
    run it before they load a model (evaluate() checks again when it prepares the folder)."""
    ResultStore(output, _store_config(dataset, config)).check(overwrite)


def _store_config(dataset: SegmentationDataset, config: dict | None) -> dict:
    # the image count is left out on purpose: a larger --limit continues a smaller run
    return {"dataset": dataset.name, "split": dataset.split, **(config or {})}
