"""Where results go: the run directory, results.json / results.csv, and the terminal table."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from .timing import is_noisy

CSV_FIELDS = ("case", "op", "impl", "kind", "mode", "B", "N", "C", "D", "h", "w", "image", "dtype", "status",
              "median_ms", "q1_ms", "q3_ms", "iqr_ms", "reps", "first_call_s", "single_shot", "peak_mem_bytes",
              "elements", "elements_per_s", "sfu_fraction", "sfu_fraction_measured", "images_per_s")


class OutputDirError(ValueError):
    """The requested output directory cannot be used without overwriting something."""


def make_run_dir(out: str | os.PathLike | None, root: str | os.PathLike = "bench_out") -> Path:
    """A fresh directory for this run's files; never one that already holds files.

    Default: <root>/<YYYYmmdd-HHMMSS>, with -2, -3, ... appended if that name is taken.
    An explicit `out` may exist only if it is an empty directory.
    """
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise OutputDirError(f"--out {path} already exists and is not an empty directory; "
                                 "refusing to overwrite it (choose another path or remove it yourself)")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root)
    for k in range(1, 1000):
        path = base / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise OutputDirError(f"could not find a free run directory under {base}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (then the commit alone does not name the code)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken on import
        return None


def environment(device: torch.device) -> dict:
    """Device, library versions and machine facts recorded with every run."""
    import cdam_fast

    env = {
        "device": str(device),
        "device_name": _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other work on the machine skews CPU timings; the load average says how much there was
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "pykeops": _version("pykeops"),
        "cdam_fast": cdam_fast.__version__,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, gpu_sm_count=props.multi_processor_count,
                   gpu_memory_bytes=props.total_memory, gpu_capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())
    return env


def speedups(records: list[dict]) -> list[dict]:
    """Every fast backend's speed-up over every baseline measured on the same case."""
    ok = [r for r in records if r["status"] == "ok" and r["median_ms"]]
    base_by_case: dict = {}
    for r in ok:
        if r["kind"] == "baseline":
            base_by_case.setdefault(r["case"], []).append(r)
    out = []
    for r in ok:
        if r["kind"] != "backend":
            continue
        for b in base_by_case.get(r["case"], []):
            noisy = [x["impl"] for x in (r, b) if is_noisy(x["median_ms"], x.get("iqr_ms"))]
            out.append({"case": r["case"], "op": r["op"], "N": r["N"], "backend": r["impl"], "mode": r["mode"],
                        "baseline": b["impl"], "speedup": b["median_ms"] / r["median_ms"], "noisy": noisy})
    return out


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    payload = {"meta": meta, "records": records, "speedups": speedups(records)}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def write_csv(path: Path, records: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in CSV_FIELDS})


def _fmt(x, scale=1.0, digits=3, pct=False) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x * scale:.{digits}g}"


def format_table(records: list[dict]) -> str:
    """One block per case, one line per implementation; statuses other than ok in full."""
    head = ("impl", "mode", "median ms", "IQR ms", "peak MiB", "Gelem/s", "SFU %", "img/s", "status")
    blocks, order = {}, []
    for r in records:
        if r["case"] not in blocks:
            blocks[r["case"]] = []
            order.append(r["case"])
        blocks[r["case"]].append(r)
    rows_by_case = {}
    for case in order:
        rows_by_case[case] = [(
            r["impl"], r["mode"] or "-", _fmt(r["median_ms"]), _fmt(r["iqr_ms"], digits=2),
            _fmt(None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20),
            _fmt(None if r["elements_per_s"] is None else r["elements_per_s"] / 1e9),
            _fmt(r["sfu_fraction"], pct=True), _fmt(r["images_per_s"]),
            r["status"] + (" (1 run: slow)" if r["single_shot"] else "")
            + (" (noisy: IQR > median)" if r["status"] == "ok" and is_noisy(r["median_ms"], r["iqr_ms"]) else ""),
        ) for r in blocks[case]]
    all_rows = [row for rows in rows_by_case.values() for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in all_rows]) for i, h in enumerate(head[:-1])]

    def line(cells):
        fixed = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells[:-1])]
        return "  " + "  ".join(fixed) + "  " + cells[-1]

    out = []
    for case in order:
        out += ["", case, line(head)]
        out += [line(row) for row in rows_by_case[case]]
    return "\n".join(out).lstrip("\n")


def format_speedups(ups: list[dict]) -> str:
    if not ups:
        return "speed-ups: none (no fast backend ran beside a baseline on this machine)"
    lines = ["speed-ups (baseline median / backend median):"]
    for u in ups:
        mode = f"[{u['mode']}]" if u["mode"] else ""
        if u.get("noisy"):  # a ratio of medians with IQR > median would be a number without meaning
            lines.append(f"  {u['case']}: {u['backend']}{mode} vs {u['baseline']}: not compared, too noisy "
                         f"(IQR > median: {', '.join(u['noisy'])})")
        else:
            lines.append(f"  {u['case']}: {u['backend']}{mode} vs {u['baseline']}: {u['speedup']:.2f}x")
    return "\n".join(lines)


def format_roofline(records: list[dict]) -> str:
    """One line per GPU measurement: divergence elements per second as a share of the SFU limit."""
    lines = []
    for r in records:
        if r["status"] != "ok" or r["sfu_fraction"] is None:
            continue
        mode = f"[{r['mode']}]" if r["mode"] else ""
        measured = "" if r["sfu_fraction_measured"] is None else f", {100 * r['sfu_fraction_measured']:.1f}% of measured"
        lines.append(f"  {r['case']} {r['impl']}{mode}: {r['elements_per_s'] / 1e12:.3f} T elem/s = "
                     f"{100 * r['sfu_fraction']:.1f}% of the SFU limit{measured}")
    if not lines:
        return "roofline: n/a (no GPU measurement in this run)"
    return "\n".join(["roofline (N^2 C' per scale, one lg2 each, vs SMs x 16 lg2/clock x clock):"] + lines)
