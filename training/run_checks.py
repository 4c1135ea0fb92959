"""Checks every `sage-train` command runs before any expensive work: the device exists, the outputs can be written.

Each raises ValueError with a one-line message (the commands print it as `error: ...` and exit with code 2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or a CUDA device this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available here (use --device cpu)")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s)")


def writable_dir(path: str | Path) -> Path:
    """Create the output folder `path` if needed and check a file can be written in it; returns it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    return path


def writable_file(path: str | Path) -> Path:
    """Check the output file `path` can be written (creating its folder) without changing an existing file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file to write")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write output file {path}: {exc.strerror or exc}") from None
    if not existed:
        os.unlink(path)
    return path
