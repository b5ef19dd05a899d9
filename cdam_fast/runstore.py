"""A results folder shared by resumable, sharded runs (`cdam-fast eval`, `cdam-fast segment`).

The folder holds a configuration file (what its results belong to: a rerun with another
configuration is refused unless told to discard them) and one JSON-lines file per rank,
`<prefix>.rank<R>.jsonl`, appended one record at a time, flushed and fsync'ed, so that a crash
loses nothing already recorded; a last line cut short by a crash is skipped on reading. A rank
writes only its own file and every rank may read all of them, so a run resumed with another
number of processes still sees everything recorded.

Records are what the caller appends (one per image, band, ...: any JSON object), stamped with
the number of the run that wrote them (`"run"`: 1 + the largest recorded, see `next_run`), so
that `latest` can tell which of several records of one item is the newest whatever file (rank)
each is in.

One run at a time: a run holds `FolderLock` (a file `.run.lock` in the folder, locked with
flock) from before its configuration check until it ends; a second run into the folder is
refused at once, naming the holder's pid and host. Under torchrun rank 0 holds it for all ranks
(the others write only after rank 0 prepared the folder). The kernel drops the lock when its
holder dies, kill -9 included, so a crashed run never blocks the next.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: runs into one folder are not locked against each other
    fcntl = None

LOCK_FILE = ".run.lock"
_GRACE_S = 0.5  # how long acquire() retries a held lock even when not asked to wait


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
        self.run = None  # the run number append() stamps on records (None: not stamped)
        self._lock = None  # this run's FolderLock, once taken

    def lock(self, wait_s: float = 0.0) -> "FolderLock":
        """Create the folder if needed and take its run lock (see FolderLock.acquire); the caller
        releases it when the run ends."""
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"output {str(self.folder)!r} exists and is not a folder")
        lock = FolderLock(self.folder, self.option)
        lock.acquire(wait_s)
        self._lock = lock
        return lock

    # set-up (rank 0 only, before the other ranks read) ------------------------------------

    def check(self, overwrite: bool = False) -> None:
        """Refuse a folder holding another configuration's results (unless `overwrite`), or one
        that another run holds (unless this one took the lock); writes nothing."""
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"output {str(self.folder)!r} exists and is not a folder")
        if self._lock is None or not self._lock.held:
            FolderLock(self.folder, self.option).check_free()
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
        """Append one record (flushed and fsync'ed), stamped with this run's number if set."""
        if self.run is not None:
            record = {**record, "run": self.run}
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


def next_run(records) -> int:
    """The number of a run that starts now: one more than any in `records` (1 for a new folder)."""
    return 1 + max((r.get("run") or 0 for r in records if isinstance(r.get("run"), int)), default=0)


def latest(records, key) -> dict:
    """{item: the newest record of that item} among `records` (as RunFolder.records yields
    them), where an item is record[key], or the tuple of record[k] for a tuple of keys (e.g.
    ("name", "band")); records missing a key are left out. A record of a later run wins over an
    earlier run's, whichever rank file holds each; within one run a later line wins (a run
    writes each item from one rank). Records without a run number count as run 0."""
    fields = (key,) if isinstance(key, str) else tuple(key)
    newest = {}
    for r in records:
        values = tuple(r.get(k) for k in fields)
        if any(v is None for v in values):
            continue
        item = values[0] if isinstance(key, str) else values
        run = r.get("run") if isinstance(r.get("run"), int) else 0
        if item not in newest or run >= newest[item][0]:
            newest[item] = (run, r)
    return {item: r for item, (_, r) in newest.items()}


class FolderLock:
    """The run lock of a results folder: an exclusive flock on FOLDER/.run.lock, held for one run.

    acquire(wait_s) takes it or, while another process holds it for longer than wait_s (at
    least half a second), raises StoreError naming the folder and the holder (pid, host, since
    when: the holder writes them into the file); check_free() raises the same without taking it
    (RunFolder.check uses it, so a check before a model loads already refuses a busy folder). release() removes the file and drops the lock; a holder that dies without
    releasing leaves the file, unlocked, for the next run to take over. Locks on network file
    systems are as good as the file system's flock (NFS maps it to its own locks).
    """

    def __init__(self, folder, option: str = "--out"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.option = option
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0) -> None:
        if self._fd is not None or fcntl is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create output folder {str(self.folder)!r}: {e.strerror or e}") from None
        # at least a moment: another process may be holding it for check_free's instant
        deadline = time.monotonic() + max(_GRACE_S, wait_s)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StoreError(f"cannot use output folder {str(self.folder)!r}: {self.path.name}: "
                                 f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise StoreError(self._busy_message()) from None
                time.sleep(0.2)
                continue
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed the file after we opened it: lock the new one
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())

    def check_free(self) -> None:
        """Raise acquire's StoreError if another process holds the lock now; writes nothing."""
        if fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file, no holder
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                raise StoreError(self._busy_message()) from None
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see acquire's file check
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _busy_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that is still starting"
        return (f"output folder {str(self.folder)!r} is in use by another run ({who}); wait for it to "
                f"finish or choose another {self.option}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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
