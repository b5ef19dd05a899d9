"""PNG plots of a run: time vs N, speed-up vs the baselines, peak memory vs N.

Each op's panel shows one series of shapes: the (B, C, D, dtype) combination measured at
the most distinct N, so the lines compare like with like.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .cases import PIPELINE
from .report import speedups


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _series_key(r: dict) -> tuple:
    return (r["B"], r["C"], r["D"], r["dtype"])


def _main_series(records: list[dict]) -> dict:
    """{op: the (B, C, D, dtype) with the most distinct N among successful records}."""
    ns = defaultdict(set)
    for r in records:
        if r["status"] == "ok" and r["op"] != PIPELINE:
            ns[(r["op"], _series_key(r))].add(r["N"])
    best: dict = {}
    for (op, key), values in ns.items():
        if op not in best or len(values) > len(ns[(op, best[op])]):
            best[op] = key
    return best


def _impl_label(r: dict) -> str:
    return f"{r['impl']}[{r['mode']}]" if r["mode"] else r["impl"]


def _panels(plt, n: int):
    cols = min(3, max(1, n))
    rows = -(-max(1, n) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _series_title(op: str, key: tuple) -> str:
    B, C, D, dtype = key
    return f"{op}\nB={B} C={C}" + (f" D={D}" if D else "") + ("" if dtype == "float32" else f" {dtype}")


def _empty(plt, path: Path, message: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metric_vs_n(records: list[dict], path: Path, value, ylabel: str, title: str) -> Path:
    """One panel per op: value(record) against N for every implementation, log-log."""
    plt = _pyplot()
    series = _main_series(records)
    ops = sorted(series)
    lines: dict = {}
    for r in records:
        if r["status"] != "ok" or r["op"] not in series or _series_key(r) != series[r["op"]]:
            continue
        y = value(r)
        if y is not None and y > 0:
            lines.setdefault(r["op"], defaultdict(list))[_impl_label(r)].append((r["N"], y))
    ops = [op for op in ops if op in lines]
    if not ops:
        return _empty(plt, path, f"{title}: nothing to plot (no successful measurement with this metric)")
    fig, axes = _panels(plt, len(ops))
    for ax, op in zip(axes, ops):
        for label, pts in sorted(lines[op].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (patches)")
        ax.set_ylabel(ylabel)
        ax.set_title(_series_title(op, series[op]), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedups(records: list[dict], path: Path) -> Path:
    """One panel per baseline: each fast backend's speed-up over it against N, per op."""
    plt = _pyplot()
    series = _main_series(records)
    key_of = {(r["case"]): _series_key(r) for r in records}
    ups = [u for u in speedups(records) if u["op"] in series and key_of[u["case"]] == series[u["op"]]]
    if not ups:
        return _empty(plt, path, "speed-up vs baselines: nothing to plot (no fast backend was measured beside a "
                                 "baseline on a kernel op in this run; pipeline speed-ups are in the table and "
                                 "results.json)")
    by_baseline = defaultdict(lambda: defaultdict(list))
    for u in ups:
        if u.get("noisy"):  # IQR > median: no meaningful ratio (see report.format_speedups)
            continue
        mode = f"[{u['mode']}]" if u["mode"] else ""
        by_baseline[u["baseline"]][f"{u['op']} {u['backend']}{mode}"].append((u["N"], u["speedup"]))
    names = sorted(by_baseline)
    fig, axes = _panels(plt, len(names))
    for ax, name in zip(axes, names):
        for label, pts in sorted(by_baseline[name].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (patches)")
        ax.set_ylabel(f"speed-up over {name} (x)")
        ax.set_title(f"vs {name}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("speed-up vs baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records: list[dict], run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    return [
        plot_metric_vs_n(records, run_dir / "time_vs_n.png", lambda r: r["median_ms"], "median time (ms)",
                         "time vs N"),
        plot_speedups(records, run_dir / "speedup.png"),
        plot_metric_vs_n(records, run_dir / "memory_vs_n.png",
                         lambda r: None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20,
                         "peak memory (MiB)", "peak memory vs N"),
    ]
