"""Shared by the benchmarks: writing what a run printed as JSON."""

from __future__ import annotations

import json


def write_json(result: dict, path: str | None) -> dict:
    """Write `result` to `path` (when given) as indented JSON; returns it."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result
