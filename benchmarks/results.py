"""Shared by the benchmarks: writing what a run printed as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(result: dict, path: str | Path | None) -> dict:
    """Write `result` to `path` (when given) as indented JSON, making its folder if need be (a benchmark's figures
    must not be lost at the end of its run to a missing folder); returns it."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result
