#!/usr/bin/env bash
# Everything a GPU session owes, in one command on the CUDA machine:
#   GPU test suite (real Triton kernels, the "cuda" backend, fp16 pipeline), offline/online
#   kernel reports and the benchmark sets, each logged under $OUT (default ./gpu_out).
#
# Without open_clip on that machine, fetch its pure-Python wheels first, on a machine with
# the package registry (python version of the GPU machine, e.g. 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       open_clip_torch==3.3.0 ftfy wcwidth
# and carry .whl along; this script installs whatever wheels it finds there.
#
# Usage: bash scripts/gpu_session.sh [tests|bench|all]   (default all; each part is separate
# so a 10-minute command limit can run them one at a time)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
what=${1:-all}
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cdam_site .whl/*.whl
    export PYTHONPATH=/tmp/cdam_site${PYTHONPATH:+:$PYTHONPATH}
fi
# the machine's own torch/triton stay: install the package without touching its dependencies
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$out/versions.txt"

if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -q -rs tests -p no:cacheprovider --durations=20 2>&1 | tee "$out/tests.log"
fi
if [[ $what == bench || $what == all ]]; then
    python3 -m cdam_fast.kernels.offline_compile --arch 90 2>&1 | tee "$out/offline_compile.jsonl"
    for set in ops multiscale lowmem pipeline; do
        cdam-fast bench --set "$set" --out "$out/bench_$set" 2>&1 | tee "$out/bench_$set.log"
    done
fi
