"""Per-image results on disk, so that an interrupted evaluation continues where it stopped.

An output folder holds `run.json` (the configuration the results belong to) and one JSON-lines
file per rank, `images.rank<R>.jsonl`, one line per scored image: its id and the non-zero
entries of its confusion matrix (the folder mechanics are cdam_fast.runstore's, shared with
`cdam-fast segment`). Every rank reads every rank's file, so a run resumed with another number
of processes still skips everything already scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..runstore import RunFolder, StoreError, write_atomic
from .metrics import to_sparse

CONFIG_FILE = "run.json"
RESULT_FILE = "result.json"

__all__ = ["CONFIG_FILE", "RESULT_FILE", "ResultStore", "StoreError"]


class ResultStore(RunFolder):
    def __init__(self, folder, config: dict, rank: int = 0):
        super().__init__(folder, config, rank, config_file=CONFIG_FILE, prefix="images", option="--output")

    def prepare(self, overwrite: bool = False) -> None:
        """Create the folder and record the configuration; refuse a folder holding another run's
        results unless `overwrite`, which deletes them (and only them)."""
        super().prepare(overwrite, extra_files=(RESULT_FILE,))

    def load(self) -> dict[str, list]:
        """Sparse confusion entries ([gt, pred, count] triples) of the images already scored, by
        image id, from all ranks' files. Kept sparse: 5000 dense 171x171 matrices would take GBs."""
        done: dict[str, list] = {}
        for record in self.records():
            done.setdefault(record["id"], record["confusion"])
        return done

    def append(self, image_id: str, conf: np.ndarray) -> None:
        super().append({"id": image_id, "confusion": to_sparse(conf)})

    def write_result(self, result: dict) -> Path:
        path = self.folder / RESULT_FILE
        write_atomic(path, json.dumps(result, indent=2) + "\n")
        return path
