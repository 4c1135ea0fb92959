#!/usr/bin/env bash
# Create .venv and install the project with its dev extra; skipped when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ] || ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: no Python found (${PY:-python3.11, python3.12 or python3 on PATH}); install 3.11 or 3.12, or set PYTHON" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))'; then
  echo "error: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); the project needs" \
       "3.11 or 3.12 (set PYTHON to one)" >&2
  exit 1
fi
stamp=.venv/.sage-edge-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv with $PY (first run: a few minutes, torch is large)" >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
