"""Shared by the benchmarks: writing what a run printed as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(result: dict, path: str | Path | None) -> dict:
    """Write `result` to `path` (when given) as indented JSON, making its folder if need be (a benchmark's figures
    must not be lost at the end of its run to a missing folder), replacing it whole; returns it."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        part = Path(f"{path}.part")  # written whole, then renamed: a reader never sees half a file
        with open(part, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
        part.replace(path)
    return result
