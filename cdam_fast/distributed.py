"""torch.distributed for the sharded runs (`cdam-fast eval`, `cdam-fast segment`, beside the
results folder of runstore.py): each rank handles a shard of the images; evaluation sums the
confusion matrices across ranks (integer counts, so the result is exactly the single-process one).

Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the process group is
created here: NCCL when ranks run on GPUs, gloo otherwise (which makes the path testable on CPU).
Started without torchrun everything degrades to a single rank with no process group.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # this rank's GPU when it has one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def shard(self, n: int) -> range:
        """Indices of this rank's items among n (round robin: shards differ by at most one item)."""
        return range(self.rank, n, self.world_size)

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum an int64 array over all ranks (identity on a single rank)."""
        if not self.active:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if torch.distributed.get_backend() == "nccl":
            t = t.to(self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.cpu().numpy()

    def barrier(self) -> None:
        if self.active:
            if torch.distributed.get_backend() == "nccl":
                torch.distributed.barrier(device_ids=[self.device.index])
            else:
                torch.distributed.barrier()

    def run_on_main(self, fn, what: str, error_type=RuntimeError) -> None:
        """fn() on rank 0 while the others wait; every rank raises if it failed (rank 0 its own
        error, the others an error_type naming `what`)."""
        error = None
        if self.is_main:
            try:
                fn()
            except Exception as e:  # re-raised below, after the other ranks were told
                error = e
        ok = self.broadcast_flag(error is None)
        if error is not None:
            raise error
        if not ok:
            raise error_type(f"rank 0 could not {what} (its error is in rank 0's log)")

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (so that every rank takes the same branch)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            t = t.to(self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


@contextmanager
def distributed_context(backend: str | None = None, use_cuda: bool | None = None):
    """Yield the DistContext of this process, creating (and finally destroying) the process group
    when launched by torchrun with more than one process. `use_cuda` None: use GPUs when present."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    device = None
    if use_cuda:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if world_size <= 1:
        yield DistContext(0, 1, 0, device)
        return
    if torch.distributed.is_initialized():  # someone else (e.g. the table runner) owns the group
        yield DistContext(rank, world_size, local_rank, device)
        return
    backend = backend or ("nccl" if use_cuda else "gloo")
    torch.distributed.init_process_group(backend=backend, **({"device_id": device} if backend == "nccl" else {}))
    try:
        yield DistContext(rank, world_size, local_rank, device)
    finally:
        torch.distributed.destroy_process_group()
