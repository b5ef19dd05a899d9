"""CPU thread settings for the command-line tools (segment, eval, bench, demo).

Idle OpenMP threads spin by default; on a loaded machine that inflates small CPU calls many
times over (measured on a busy 2-core machine: 36 ms against 0.25 ms with one thread). The
wait policy is read once, when torch loads libgomp, so `prepare_environment` must run before
torch is imported: cdam_fast/__init__.py calls it first thing, and it acts only when the
process is the `cdam-fast` command. `configure_threads` then sets torch's intra-op threads to
the physical cores this process may use (shared between the processes of a torchrun node).
Explicit OMP_WAIT_POLICY / OMP_NUM_THREADS settings are always kept. Nothing here imports torch.
"""
from __future__ import annotations

import os
import sys

_COMMAND = "cdam-fast"


def launched_as_cli() -> bool:
    """True for the `cdam-fast` console script (also under torchrun) and `python -m cdam_fast...`."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == _COMMAND:
        return True
    orig = list(getattr(sys, "orig_argv", ()))
    for i, arg in enumerate(orig[:-1]):
        if arg == "-m" and orig[i + 1].split(".")[0] == "cdam_fast":
            return True
    return False


def prepare_environment() -> None:
    """Passive OpenMP waiting for the command-line tools, unless the user chose otherwise."""
    if launched_as_cli():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as f, open(f"{topo}/core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def default_threads() -> int:
    """Physical cores, divided between the processes torchrun starts on this node."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, physical_cores() // local)


def configure_threads() -> int | None:
    """torch.set_num_threads(default_threads()) unless OMP_NUM_THREADS is set; returns the
    number set (None when left to the user's setting)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    import torch

    n = default_threads()
    torch.set_num_threads(n)
    return n
