"""The band store: the unit of resume and of sharding for one large image.

A band is one row of windows (native.py). Its result is the window token logits
[n_cols, S, h_tok, w_tok] float32: 1/256 of the image's pixels times S floats with 16-pixel
patches (about 90 MB for 16384^2 pixels and 21 classes), kept on disk as `band<r>.npy` in a
hidden folder of the output folder (`OUT/.bands/<name>/`). A band file is written under a
name unique to its writer, flushed and renamed into place, so a file that exists is
complete: a killed run loses only the bands in flight, a rerun computes the missing ones
only, and processes that share the bands of one image (torchrun ranks, Ray tasks) never
write the same file. `store.json` records what the bands belong to (the input file's size
and modification time, the plan, the run's configuration); bands of anything else are
discarded. The folder is removed once the image's outputs are published.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..validation import CdamInputError

STORE_FOLDER = ".bands"
_CONFIG = "store.json"


def identity_of(path) -> dict:
    """What identifies an input file's contents cheaply (size and modification time)."""
    try:
        st = os.stat(path)
        return {"path": os.path.abspath(os.fspath(path)), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": os.fspath(path)}


class BandStore:
    def __init__(self, folder, config: dict):
        self.folder = Path(folder)
        self.config = json.loads(json.dumps(config))

    @classmethod
    def for_image(cls, out, name: str, config: dict) -> "BandStore":
        return cls(Path(out) / STORE_FOLDER / name, config)

    def _path(self, band: int) -> Path:
        return self.folder / f"band{band:06d}.npy"

    def _stored(self):
        try:
            return json.loads((self.folder / _CONFIG).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def prepare(self) -> None:
        """Create the folder; discard bands that belong to anything else (one process, first)."""
        cfg = self.folder / _CONFIG
        stored = self._stored()
        for stale in self.folder.glob(".band*.part.npy"):  # a killed writer's (no writer runs yet)
            stale.unlink(missing_ok=True)
        if stored != self.config:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = cfg.with_name(f".{_CONFIG}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.config, indent=1, sort_keys=True) + "\n")
            tmp.replace(cfg)

    def check(self) -> None:
        """For a worker about to add bands to a store another process prepared: refuse when the
        store belongs to something else (the worker's options or input file differ from the
        driver's), naming what differs, so that no band of another configuration is mixed in."""
        stored = self._stored()
        if stored is None:
            raise CdamInputError(f"no band store has been prepared in {str(self.folder)!r}: "
                                 "run band_tasks (or the segment command) on the driver first")
        if stored != self.config:
            raise CdamInputError(f"the band store in {str(self.folder)!r} was prepared for another configuration "
                                 f"(differs in: {', '.join(_differences(stored, self.config) or ['everything'])}); "
                                 "give the workers the driver's Segmenter options and input file")

    def done(self, band: int) -> bool:
        return self._path(band).exists()

    def missing(self, bands: int) -> list:
        return [r for r in range(bands) if not self.done(r)]

    def save(self, band: int, logits: np.ndarray, tag="") -> None:
        final = self._path(band)
        tmp = final.with_name(f".{final.stem}.{os.getpid()}{tag}.part.npy")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(logits, dtype=np.float32), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(final)

    def load(self, band: int) -> np.ndarray:
        return np.load(self._path(band), allow_pickle=False)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # OUT/.bands, when no other image's bands are left
        except OSError:
            pass


def _differences(a, b, prefix: str = "") -> list:
    """The dotted keys at which two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "everything"]


__all__ = ["BandStore", "STORE_FOLDER", "identity_of"]
