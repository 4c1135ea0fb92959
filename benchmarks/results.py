"""Shared by the benchmarks: checking their command lines up front and writing what a run printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sage_core.outputs import OutputDirError, check_output_file, write_text_atomic


def write_json(result: dict, path: str | Path | None) -> dict:
    """Write `result` to `path` (when given) as indented JSON, making its folder if need be (a benchmark's figures
    must not be lost at the end of its run to a missing folder), replacing it whole; returns it. A failed write
    leaves neither half a file nor its `.part`."""
    if path:
        write_text_atomic(path, json.dumps(result, indent=2, default=str))
    return result


def output_file(text: str) -> Path:
    """argparse type of an output file option (--json, --out): refused at once, before any work, by
    sage_core.outputs.check_output_file (a folder, or a path this process cannot write), not at the end of the run.
    A benchmark replaces its results file whole, so an existing file is taken as with --overwrite."""
    try:
        return check_output_file(text, overwrite=True)
    except OutputDirError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse type of a count: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type of comma-separated counts ('8, 32'): at least one, each >= 1."""
    values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
    return values


@contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Turn one of `errors` (a bad config, a missing model or package) into one line `error: ...` on stderr and
    exit status 2, as argparse does for a bad option, instead of a traceback."""
    try:
        yield
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
