#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels that the lent GPU's image lacks, for scripts/gpu_session.sh: pure
# downloads for the image's Python 3.12, no dependencies (the image has torch, transformers, peft, ray's needs).
# Run here, in the repository root, before a `device` call that names .whl in `carry` (64 MiB a call in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 zstandard==0.25.0 torchao==0.18.0)
grep -qx "/.whl/" .gitignore || { echo "error: .whl/ must stay git-ignored" >&2; exit 1; }
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
  if ls .whl/"$(echo "${wheel%%==*}" | tr - _)"-"${wheel##*==}"-*.whl >/dev/null 2>&1; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$wheel"
done
ls -1 .whl
du -sh .whl
