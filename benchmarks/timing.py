"""Timing the way GPU kernel papers do it, and the CPU fallback.

GPU: one untimed call (JIT compilation, autotuning, allocator warm-up), one call for the
peak memory (when it takes longer than ``max_case_s`` it is also the only timing, flagged
single_shot), more warm-up calls for ``warmup_s``, then each call bracketed by CUDA events
with the input set rotated every call so that no call finds its inputs in L2 left there by
the previous one; medians and
inter-quartile ranges of the per-call times. Peak memory is torch.cuda.max_memory_allocated
over that second call, minus what was allocated before it (workspace + output, not inputs).

CPU: the same structure with time.perf_counter, and the growth of the process's resident-set
high-water mark over one call, measured from a trimmed heap, as the peak memory (Linux with
glibc, else None: see rss_peak_growth).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    reps: int
    first_call_s: float  # the untimed first call: includes any compilation
    peak_mem_bytes: int | None
    single_shot: bool = False  # too slow to repeat: median of the one call only

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def noisy(self) -> bool:
        return is_noisy(self.median_ms, self.iqr_ms)


def is_noisy(median_ms, iqr_ms) -> bool:
    """A measurement whose interquartile range exceeds its median says little about the call's
    cost (e.g. spinning OpenMP threads on a loaded CPU); ratios of it are not reported."""
    return median_ms is not None and iqr_ms is not None and iqr_ms > median_ms


@dataclass
class TimingOptions:
    warmup_s: float = 0.025  # GPU warm-up after the first call
    target_s: float = 0.1  # time the repetitions aim to fill
    min_reps: int = 5
    max_reps: int = 200
    max_case_s: float = 30.0  # a second call (the first compiles) slower than this is not repeated
    max_total_s: float = 10.0  # repetitions of a slow call stop here (at least 3 are kept)


def quartiles(samples_ms) -> tuple[float, float, float]:
    """(q1, median, q3) with linear interpolation between order statistics."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("samples_ms is empty")
    q1, med, q3 = np.percentile(a, [25.0, 50.0, 75.0])
    return float(q1), float(med), float(q3)


def is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(err, oom):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _reps_for(per_call_s: float, opts: TimingOptions) -> int:
    if per_call_s <= 0:
        return opts.max_reps
    reps = int(min(opts.max_reps, max(opts.min_reps, opts.target_s / per_call_s)))
    return max(min(3, reps), min(reps, int(opts.max_total_s / per_call_s)))


def time_cuda(fn: Callable[[int], object], n_sets: int, opts: TimingOptions, device) -> Timing:
    """fn(i) runs the op on input set i % n_sets."""
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    sync()
    t0 = time.perf_counter()
    fn(0)
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    peak = cuda_peak_memory(lambda: fn(1 % n_sets), device)
    second = time.perf_counter() - t0  # compiled by now: the first honest duration
    if second > opts.max_case_s:
        ms = second * 1e3
        return Timing(ms, ms, ms, 1, first, peak, single_shot=True)
    calls, t0 = 0, time.perf_counter()
    while True:  # the first call compiled; these bring clocks and caches to steady state
        fn(calls % n_sets)
        calls += 1
        sync()
        if time.perf_counter() - t0 >= opts.warmup_s:
            break
    reps = _reps_for((time.perf_counter() - t0) / calls, opts)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for k in range(reps):
        starts[k].record()
        fn((calls + k) % n_sets)
        ends[k].record()
    sync()
    q1, med, q3 = quartiles([s.elapsed_time(e) for s, e in zip(starts, ends)])
    return Timing(med, q1, q3, reps, first, peak)


def cuda_peak_memory(call: Callable[[], object], device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def rss_peak_growth(call: Callable[[], object]) -> int | None:
    """Growth of the resident-set high-water mark over call() in bytes (Linux with glibc), else None.

    Memory an earlier case freed stays resident in the allocator's free lists and would be
    reused without growing RSS (peaks read 0 after any larger case), so the heap is first
    trimmed (malloc_trim returns every free page to the system): what the call allocates and
    touches must then grow RSS. Writing 5 to /proc/self/clear_refs resets the high-water mark
    to the current RSS. Page-granular, and memory the call reuses from objects it frees itself
    counts once, as it should: the call's peak working set beyond what existed before it.
    """
    trim = _malloc_trim()
    if trim is None:
        return None
    gc.collect()
    trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    out = call()
    peak = _status_kib("VmHWM")
    del out
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def time_cpu(fn: Callable[[int], object], n_sets: int, opts: TimingOptions) -> Timing:
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    peak = rss_peak_growth(lambda: fn(1 % n_sets))
    second = time.perf_counter() - t0  # compiled by now: the first honest duration
    if second > opts.max_case_s:
        ms = second * 1e3
        return Timing(ms, ms, ms, 1, first, peak, single_shot=True)
    reps = _reps_for(second, opts)
    samples, budget_end = [], time.perf_counter() + 4 * opts.target_s
    for k in range(reps):
        t0 = time.perf_counter()
        fn(k % n_sets)
        samples.append((time.perf_counter() - t0) * 1e3)
        # the first call may have been a slow outlier: stop at min_reps once well over budget
        if k + 1 >= opts.min_reps and time.perf_counter() > budget_end:
            break
    q1, med, q3 = quartiles(samples)
    return Timing(med, q1, q3, len(samples), first, peak)


def time_call(fn: Callable[[int], object], n_sets: int, opts: TimingOptions, device: torch.device) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, n_sets, opts, device)
    return time_cpu(fn, n_sets, opts)
