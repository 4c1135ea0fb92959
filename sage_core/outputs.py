"""Writing a run's results: PNG images with metadata, labelled group grids, and atomic output folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

LABEL_HEIGHT = 28


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a sibling `<name>.<pid>-<thread>.part` of `path` (its folder made if need be) to write; once written it
    is renamed over `path`, so a reader never sees half a file, two writers never write into one `.part` (the last
    rename wins, whole), and a failed write leaves neither half a file nor the `.part`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        yield part
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through its sibling `.part` (replacing)."""
    with replacing(Path(path)) as part:
        part.write_text(text, encoding="utf-8")


def to_pil(image: np.ndarray) -> Image.Image:
    """A float [H, W, 3] image in [0, 1] as an 8-bit PIL image (rounded, as diffusers' numpy_to_pil does)."""
    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))


METADATA_KEY = "sage_edge"  # PNG text chunk holding an image's whole metadata as JSON (read_metadata)


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save `image` to `path` as PNG (its folder created) with `metadata` in text chunks: one `sage.KEY` per key
    (strings as they are, other values as JSON) for image viewers, plus all of it as JSON under METADATA_KEY.
    Written through a sibling `.part` (replacing): a failed save leaves the previous image as it was."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(f"sage.{key}", value if isinstance(value, str) else json.dumps(value))
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    path = Path(path)
    with replacing(path) as part:
        image.save(part, format="PNG", pnginfo=info)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata `save_png` wrote into a PNG (by `sage-edge generate` or a device); ValueError if it has none."""
    with Image.open(path) as img:
        text = getattr(img, "text", {}) or {}
        if METADATA_KEY not in text:
            raise ValueError(f"{path} carries no SAGE metadata")
        return json.loads(text[METADATA_KEY])


def is_sage_png(path: Path) -> bool:
    """Whether `path` is a PNG that `save_png` wrote (a device's image or `sage-edge generate`'s): the only kind of
    file a device's `--overwrite` replaces."""
    try:
        read_metadata(path)
    except (OSError, ValueError):  # not an image (PIL's UnidentifiedImageError is an OSError), or no metadata
        return False
    return True


def _wrap(text: str, width: int) -> str:
    """Cut a caption to what fits under a grid cell."""
    return text if len(text) <= width else text[: width - 1] + "…"


def labelled_grid(images: Sequence[Image.Image], captions: Sequence[str], cell: int = 160) -> Image.Image:
    """A row of images, each scaled to `cell` pixels (nearest neighbour, so small images stay crisp), with its
    caption underneath."""
    font = ImageFont.load_default()
    grid = Image.new("RGB", (cell * len(images), cell + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
        grid.paste(img.resize((cell, cell), Image.NEAREST), (i * cell, 0))
        draw.text((i * cell + 3, cell + 2), _wrap(caption, cell // 6), fill="black", font=font)
        draw.text((i * cell + 3, cell + 14), _wrap(caption[cell // 6 - 1 :], cell // 6), fill="black", font=font)
    return grid


RUN_MARKER = "report.json"  # every run's output folder holds one; --overwrite replaces only such a folder
OVERWRITE_HINT = "pass --overwrite to replace it"


class OutputDirError(ValueError):
    """An output folder or file that a run may not write, or may not replace (one line, for `error: ...`)."""


def check_output_dir(out: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output folder that a run cannot replace without losing data: a file, the current folder or one
    above it, a non-empty folder without `overwrite`, and with it one that is not a previous run's output (no
    report.json) or that holds one of the run's `inputs`. A folder still to be made must be one this process can
    make (check_creatable)."""
    if not out.exists():
        check_creatable(out)
        return
    if not out.is_dir():
        raise OutputDirError(f"{out} is a file; give a folder for the output")
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise OutputDirError(f"{out} is the current folder or holds it; name a folder of its own for the output")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputDirError(f"{out} exists and is not empty; {OVERWRITE_HINT}")
    if not (out / RUN_MARKER).is_file():
        raise OutputDirError(f"{out} is not a previous run's output (no {RUN_MARKER}); --overwrite replaces only "
                             "such a folder, so nothing was deleted")
    for path in inputs:
        if target in Path(path).resolve().parents:
            raise OutputDirError(f"{out} holds this run's input {path}; --overwrite would delete it")


def check_output_file(
    out: str | Path, overwrite: bool = False, kind: str = "", is_kind: Callable[[Path], bool] | None = None
) -> Path:
    """`out` as a Path once it is a file a run may write: not a folder (nor a name ending in a separator), not
    something other than a regular file, an existing file only with `overwrite` and then, given `is_kind`, only
    one it accepts (described as `kind`: 'a workload file'); its folder one this process can write
    (check_creatable), as the file is replaced through a sibling `.part`."""
    path = Path(out)
    if str(out).endswith(("/", os.sep)) or path.is_dir():
        raise OutputDirError(f"{out} is a folder; give a file to write")
    if path.exists() and not path.is_file():
        raise OutputDirError(f"{out} is not a regular file; give a file to write")
    if path.exists() and not overwrite:
        raise OutputDirError(f"{out} exists; {OVERWRITE_HINT}")
    if path.exists() and is_kind is not None and not is_kind(path):
        raise OutputDirError(f"{out} is not {kind}; --overwrite replaces only such a file, so nothing was deleted")
    check_creatable(path)
    return path


def check_work_dir(out: Path) -> None:
    """Refuse a folder that a run writes into and keeps across runs (`sage-train`'s checkpoints, caches and
    weights: never replaced, so a non-empty one needs no --overwrite) when it is a file, or one this process
    cannot write in (or make, check_creatable)."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} is a file; give a folder for the output")
    if not out.exists():
        check_creatable(out)
    elif why := unwritable(out):
        raise OutputDirError(f"{out} cannot be written: {why}")


def check_creatable(out: Path) -> None:
    """Refuse a path that cannot be made (or replaced) in its folder: one under a file, or under a folder this
    process cannot write in (unwritable)."""
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise OutputDirError(f"{out} cannot be made: {parent} is a file, not a folder")
    if why := unwritable(parent):
        raise OutputDirError(f"{out} cannot be made: {why}")


def unwritable(folder: Path) -> str | None:
    """Why no file can be made in the existing `folder`, or None: its permissions, then a real (unnamed, at once
    removed) file, as os.access lets root through where the file system refuses (/proc, a full disk)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces `out`, on error it is removed,
    so a failed run leaves nothing half-written. `out` is checked first (check_output_dir)."""
    check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
