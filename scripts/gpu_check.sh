#!/usr/bin/env bash
# GPU acceptance check: versions, correctness on the device (named pytest selections, the
# compiled backend's JIT build timed), the headline speed table and a torch.profiler kernel
# table, in about 6 minutes, every stage time-limited and written to the output folder as it
# finishes (results.json with failures first, gpu_block.md for benchmarks/RESULTS.md).
# What runs: cdam_fast/benchmarks/gpu_check_plan.py. Options: --help.
#
# Before the GPU run, where the package registry is reachable (the GPU machine has none):
#     bash scripts/gpu_wheels.sh          # scripts/gpu_wheels.txt -> .whl/ (git-ignored), + commit
# On the GPU machine, through the device tool (the machine's python3 holds torch and Triton):
#     run(command="bash scripts/gpu_check.sh --out $OUT", carry=[".whl"], timeout_s=450)
# The check's own budget is 390 s; timeout_s=450 leaves a margin for installing, and the rest
# of the 15 device minutes (a machine start takes one or two) for a rerun of a part, e.g.
#     run(command="bash scripts/gpu_check.sh --out $OUT --stages speed --budget-s 200", carry=[".whl"], timeout_s=260)
# Then, here: python -m cdam_fast.benchmarks.gpu_check --update-results <files_at>/results.json
#
# CI runs the CPU dry run (tests/test_gpu_check.py):  bash scripts/gpu_check.sh --dry-run --out DIR
#
# The script installs only from .whl/ (no index, no downloads), and only what the machine
# lacks: the wheels when open_clip is missing, this checkout (editable, no dependencies) when
# python does not import cdam_fast from it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# the torch / Triton range first (cdam_fast/versions.py reads package metadata, imports nothing):
# a machine outside it is refused in a second, before anything is installed or built
if [[ ${CDAM_GPU_CHECK_ANY_VERSION:-0} != 1 ]]; then
    "$PY" cdam_fast/versions.py || {
        rc=$?
        echo "gpu_check.sh: refusing to run (set CDAM_GPU_CHECK_ANY_VERSION=1 to run anyway; docs/compatibility.md)" >&2
        exit $rc
    }
fi

# one probe (each python start costs seconds): is open_clip there, is cdam_fast this checkout's?
probe=$("$PY" -c '
import importlib.util, os, sys
print("clip" if importlib.util.find_spec("open_clip") else "noclip")
spec = importlib.util.find_spec("cdam_fast")  # located without importing it (and torch)
here = bool(spec and spec.origin) and os.path.dirname(os.path.dirname(os.path.realpath(spec.origin))) == sys.argv[1]
print("here" if here else "elsewhere")
' "$(pwd -P)") || { echo "gpu_check.sh: $PY does not run" >&2; exit 3; }

if [[ $probe == noclip* ]]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        site=${CDAM_GPU_CHECK_SITE:-/tmp/cdam_gpu_check_site}
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 3; }
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check.sh: open_clip is missing and .whl/ holds no wheels (bash scripts/gpu_wheels.sh, carry .whl);" \
             "the pipeline cases will report themselves skipped" >&2
    fi
fi
# this checkout's package, without touching the machine's torch / Triton
if [[ $probe != *here ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || { echo "gpu_check.sh: pip install -e . failed" >&2; exit 3; }
fi

exec "$PY" -m cdam_fast.benchmarks.gpu_check "$@"
