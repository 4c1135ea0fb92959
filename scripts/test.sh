#!/usr/bin/env bash
# The test suite: installs the project if needed, then runs pytest (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q --timeout 900 "$@"
