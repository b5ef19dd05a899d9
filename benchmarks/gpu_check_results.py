"""results.json of the GPU check: the progress records gathered by kind, failures first.

What counts as a failure (listed first in results.json, the Markdown block and the terminal):
a test that failed, errored or passed a strict xfail; a selection that matched no test (except
the backward one before backward tests exist); a build that failed; a benchmark row with an
error, or a fast backend that ran out of memory or (on a GPU) could not run; a stage that
crashed, was killed at its time limit, or got no time left. Skips with a reason (the compiled
backend's build abandoned past the limit, dry-run omissions, pytest skips) are listed under
``not_run``.
"""
from __future__ import annotations

from collections import Counter

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def _selection_summaries(records, stages) -> list[dict]:
    out = []
    for st in stages:
        if not st["name"].startswith("tests:"):
            continue
        tests = [r for r in records if r.get("type") == "test" and r.get("stage") == st["name"]]
        counts = Counter(r["outcome"] for r in tests)
        collected = [r["count"] for r in records if r.get("type") == "collected" and r.get("stage") == st["name"]]
        out.append({"name": st["name"], "what": st.get("what", ""), "command": st.get("command", ""),
                    "status": st["status"], "seconds": st.get("seconds"),
                    **{k: counts.get(k, 0) for k in OUTCOMES},
                    "collected_only": collected[-1] if collected else None})
    return out


def _failures(records, stages, dry_run) -> tuple[list[dict], list[dict]]:
    failures, not_run = [], []
    for st in stages:
        status = st["status"]
        if status == "ok":
            continue
        entry = {"stage": st["name"], "item": st["name"], "detail": status}
        (not_run if status.startswith("skipped") else failures).append(entry)
    for r in records:
        kind = r.get("type")
        if kind == "test" and r["outcome"] in ("failed", "error", "xpassed"):
            failures.append({"stage": r["stage"], "item": r["nodeid"], "detail": f"{r['outcome']}: {r['message']}"})
        elif kind == "build" and r["status"].startswith("failed"):
            failures.append({"stage": r["stage"], "item": f"{r['backend']} extension build", "detail": r["status"]})
        elif kind == "build" and r["status"].startswith("skipped"):
            not_run.append({"stage": r["stage"], "item": f"{r['backend']} extension build", "detail": r["status"]})
        elif kind == "bench":
            rec = r["record"]
            item = f"{rec['case']} {rec['impl']}" + (f" [{rec['mode']}]" if rec["mode"] else "")
            status = rec["status"]
            backend = rec["kind"] == "backend"
            if status.startswith("error") or (backend and status == "OOM") or (
                    backend and status.startswith("n/a") and not dry_run):
                failures.append({"stage": r["stage"], "item": item, "detail": status})
            elif status.startswith(("skipped", "n/a")):
                not_run.append({"stage": r["stage"], "item": item, "detail": status})
    skips = Counter((r["stage"], r["message"]) for r in records
                    if r.get("type") == "test" and r["outcome"] == "skipped")
    for (stage, message), n in skips.items():
        not_run.append({"stage": stage, "item": f"{n} test(s) skipped", "detail": message})
    return failures, not_run


def assemble(records: list[dict], stages: list[dict], meta: dict) -> dict:
    """The whole results.json payload; key order puts the failures first."""
    failures, not_run = _failures(records, stages, meta.get("dry_run", False))

    def last(kind):
        found = [r for r in records if r.get("type") == kind]
        return found[-1] if found else None

    versions = last("versions")
    sfu = last("sfu_limit")
    profile = last("profile")
    return {
        "failures": failures,
        "not_run": not_run,
        "meta": meta,
        "versions": versions["data"] if versions else None,
        "stages": stages,
        "builds": [{k: r[k] for k in ("backend", "status", "seconds", "cached")} for r in records
                   if r.get("type") == "build"],
        "tests": {"selections": _selection_summaries(records, stages),
                  "records": [r for r in records if r.get("type") == "test"]},
        "sfu_limit": sfu["data"] if sfu else None,
        "bench": [{"group": r["group"], "command": r["command"], **r["record"]} for r in records
                  if r.get("type") == "bench"],
        "profile": {k: v for k, v in profile.items() if k not in ("type", "stage")} if profile else None,
    }
