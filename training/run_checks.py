"""Checks every `sage-train` command runs before any expensive work: the device exists, the outputs can be written.

Each raises ValueError with a one-line message (the commands print it as `error: ...` and exit with code 2); the
output paths are checked by sage_core.outputs, in the words every command uses.
"""

from __future__ import annotations

from pathlib import Path

from sage_core.outputs import OutputDirError, check_output_file, check_work_dir


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or a CUDA device this machine does not have."""
    import torch

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
    """The output folder `path`, made if need be, once it is one a run may keep writing into (not a file, one
    this process can write in: sage_core.outputs.check_work_dir); returns it."""
    path = Path(path)
    check_work_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{path} cannot be made: {exc.strerror or exc}") from None
    return path


def writable_file(path: str | Path) -> Path:
    """The output file `path` once a run may write it (sage_core.outputs.check_output_file): `sage-train` has no
    --overwrite, and replaces an existing file as it always did."""
    return check_output_file(path, overwrite=True)
