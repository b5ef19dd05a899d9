"""Per-image results on disk, so that an interrupted evaluation continues where it stopped.

An output folder holds `run.json` (the configuration the results belong to) and one JSON-lines
file per rank, `images.rank<R>.jsonl`, one line per scored image: its id and the non-zero
entries of its confusion matrix. Lines are appended and flushed one at a time; a last line cut
short by a crash is ignored on reading. Every rank reads every rank's file, so a run resumed
with another number of processes still skips everything already scored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .metrics import to_sparse

CONFIG_FILE = "run.json"
RESULT_FILE = "result.json"


class StoreError(RuntimeError):
    """The output folder belongs to another run, or cannot be used."""


class ResultStore:
    def __init__(self, folder, config: dict, rank: int = 0):
        self.folder = Path(folder).expanduser()
        self.config = json.loads(json.dumps(config))  # as it reads back from run.json (tuples -> lists)
        self.rank = rank
        self._file = None

    # set-up (rank 0 only, before the other ranks read) ------------------------------------

    def prepare(self, overwrite: bool = False) -> None:
        """Create the folder and record the configuration; refuse a folder holding another run's
        results unless `overwrite`, which deletes them (and only them)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"output {str(self.folder)!r} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / CONFIG_FILE
        if config_path.exists() and not overwrite:
            try:
                stored = json.loads(config_path.read_text())
            except json.JSONDecodeError:
                stored = None
            if stored != self.config:
                raise StoreError(
                    f"output folder {str(self.folder)!r} holds results of a different run "
                    f"({_describe_difference(stored, self.config)}); choose another --output, "
                    "or pass --overwrite to discard them"
                )
        if overwrite:
            for p in self._result_files() + [self.folder / RESULT_FILE]:
                p.unlink(missing_ok=True)
        config_path.write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    # reading and writing ----------------------------------------------------------------

    def load(self) -> dict[str, list]:
        """Sparse confusion entries ([gt, pred, count] triples) of the images already scored, by
        image id, from all ranks' files. Kept sparse: 5000 dense 171x171 matrices would take GBs."""
        done: dict[str, list] = {}
        for path in self._result_files():
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by an interruption: that image is redone
                    done.setdefault(record["id"], record["confusion"])
        return done

    def append(self, image_id: str, conf: np.ndarray) -> None:
        if self._file is None:
            path = self.folder / f"images.rank{self.rank}.jsonl"
            self._file = open(path, "a")
            if self._file.tell() and not _ends_with_newline(path):
                self._file.write("\n")  # close a line cut short by an interruption
        self._file.write(json.dumps({"id": image_id, "confusion": to_sparse(conf)}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write_result(self, result: dict) -> Path:
        path = self.folder / RESULT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)
        return path

    def _result_files(self) -> list[Path]:
        return sorted(self.folder.glob("images.rank*.jsonl"))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _describe_difference(stored, wanted: dict) -> str:
    if not isinstance(stored, dict):
        return f"{CONFIG_FILE} is unreadable"
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now" for k in keys)
