#!/usr/bin/env bash
# Fetch the wheels listed in scripts/gpu_wheels.txt into .whl/ for the GPU machine (Python 3.12,
# x86-64 manylinux: override with GPU_PYTHON_VERSION), and record this checkout's commit in
# .whl/commit.txt (the machine's copy of the tree has no .git). Run it on a machine that reaches
# the package registry, right before a GPU run; scripts/gpu_check.sh's header says the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ver=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$ver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl -r scripts/gpu_wheels.txt
# pip refuses two versions of one distribution in one install: name any duplicates
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n $dupes ]]; then
    echo "gpu_wheels.sh: .whl/ holds several versions of: $dupes; delete the ones not in scripts/gpu_wheels.txt" >&2
    exit 1
fi
commit=$(git rev-parse HEAD)
[[ -z $(git status --porcelain --untracked-files=no) ]] || commit="$commit (tracked files modified)"
echo "$commit" > .whl/commit.txt
du -sh .whl
ls .whl
