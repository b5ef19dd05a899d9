"""The GPU check's progress file: one JSON object per line, appended as each result arrives, so
a run killed at any point keeps everything it measured.

Also a pytest plugin (``-p cdam_fast.benchmarks.gpu_check_progress``) that appends one line
per test outcome to the file named by $CDAM_GPU_CHECK_PROGRESS, tagged with
$CDAM_GPU_CHECK_STAGE.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PROGRESS_ENV = "CDAM_GPU_CHECK_PROGRESS"
STAGE_ENV = "CDAM_GPU_CHECK_STAGE"


def append(path, record: dict) -> None:
    """One line per record, written with a single O_APPEND write (concurrent writers stay whole)."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def emit(record: dict) -> None:
    """Append a record for the stage this process runs (the environment names file and stage)."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        append(path, {"stage": os.environ.get(STAGE_ENV, ""), **record})


def read(path) -> list[dict]:
    """Every whole record in the file (a line cut short by a kill is dropped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ------------------------------------------------------------------ pytest plugin

def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:300]
    if getattr(report, "wasxfail", None):
        return str(report.wasxfail)[:300]
    if report.failed:
        text = report.longreprtext or ""
        errors = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
        return " | ".join(errors[-4:])[:600] if errors else text.strip().splitlines()[-1][:600] if text.strip() else ""
    return ""


def _outcome(report) -> str:
    if getattr(report, "wasxfail", None) is not None and report.when == "call":
        return "xfailed" if report.skipped else "xpassed"
    if report.failed and report.when != "call":
        return "error"
    return report.outcome


def pytest_runtest_logreport(report):
    # Under pytest-xdist the controller reports every test; workers must not write twice.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed) or (
            report.when == "teardown" and report.failed):
        emit({"type": "test", "nodeid": report.nodeid, "outcome": _outcome(report),
              "duration_s": round(report.duration, 3), "message": _message(report)})


def pytest_collectreport(report):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.failed:
        emit({"type": "test", "nodeid": report.nodeid or "<collection>", "outcome": "error",
              "duration_s": 0.0, "message": f"collection failed: {str(report.longreprtext).strip()[-600:]}"})


def pytest_collection_finish(session):
    # Only --collect-only runs report a count (an xdist controller collects nothing itself).
    if os.environ.get("PYTEST_XDIST_WORKER") or not session.config.option.collectonly:
        return
    emit({"type": "collected", "count": len(session.items)})
