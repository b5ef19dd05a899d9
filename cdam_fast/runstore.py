"""A results folder shared by resumable, sharded runs (`cdam-fast eval`, `cdam-fast segment`).

The folder holds a configuration file (what its results belong to: a rerun with another
configuration is refused unless told to discard them) and one JSON-lines file per rank,
`<prefix>.rank<R>.jsonl`, appended one record at a time, flushed and fsync'ed, so that a crash
loses nothing already recorded; a last line cut short by a crash is skipped on reading. A rank
writes only its own file and every rank may read all of them, so a run resumed with another
number of processes still sees everything recorded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class StoreError(RuntimeError):
    """The output folder belongs to another run, or cannot be used."""


class RunFolder:
    def __init__(self, folder, config: dict, rank: int = 0, *, config_file: str, prefix: str,
                 option: str = "--output"):
        self.folder = Path(folder).expanduser()
        self.config = json.loads(json.dumps(config))  # as it reads back from the file (tuples -> lists)
        self.rank = rank
        self.config_file, self.prefix, self.option = config_file, prefix, option
        self._file = None

    # set-up (rank 0 only, before the other ranks read) ------------------------------------

    def check(self, overwrite: bool = False) -> None:
        """Refuse a folder holding another configuration's results (unless `overwrite`); writes nothing."""
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"output {str(self.folder)!r} exists and is not a folder")
        config_path = self.folder / self.config_file
        if config_path.exists() and not overwrite:
            try:
                stored = json.loads(config_path.read_text())
            except json.JSONDecodeError:
                stored = None
            if stored != self.config:
                raise StoreError(
                    f"output folder {str(self.folder)!r} holds results of a different run "
                    f"({_describe_difference(stored, self.config, self.config_file)}); choose another "
                    f"{self.option}, or pass --overwrite to discard them")

    def prepare(self, overwrite: bool = False, extra_files=()) -> None:
        """check(), then create the folder and record the configuration; `overwrite` deletes the
        previous records (and `extra_files`, names inside the folder) and only them."""
        self.check(overwrite)
        self.folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in self.record_files() + [self.folder / f for f in extra_files]:
                p.unlink(missing_ok=True)
        write_atomic(self.folder / self.config_file, json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    @property
    def configured(self) -> bool:
        """Whether the folder already records this configuration (its results are this run's)."""
        try:
            return json.loads((self.folder / self.config_file).read_text()) == self.config
        except (OSError, json.JSONDecodeError):
            return False

    # reading and writing ----------------------------------------------------------------

    def records(self):
        """Every rank's records, file by file (ranks in order), in the order they were written."""
        for path in self.record_files():
            with open(path) as f:
                for line in f:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by an interruption

    def append(self, record: dict) -> None:
        if self._file is None:
            path = self.folder / f"{self.prefix}.rank{self.rank}.jsonl"
            self._file = open(path, "a")
            if self._file.tell() and not _ends_with_newline(path):
                self._file.write("\n")  # close a line cut short by an interruption
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def record_files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.prefix}.rank*.jsonl"), key=_rank_of)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers (and a crash) never see it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _rank_of(path: Path):
    stem = path.name.rsplit(".rank", 1)[-1].split(".", 1)[0]
    return (int(stem), "") if stem.isdigit() else (1 << 30, path.name)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _describe_difference(stored, wanted: dict, config_file: str) -> str:
    if not isinstance(stored, dict):
        return f"{config_file} is unreadable"
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now" for k in keys)
