#!/usr/bin/env bash
# The main job on the embedded default model: a local edge server (local Ray) and 8 device clients
# make images for examples/prompts.txt; images, group grids and report.json land in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/sage-device demo --prompts examples/prompts.txt --out runs/demo --clients 8 --overwrite "$@"
