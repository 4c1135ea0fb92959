"""Writing a run's results: PNG images with metadata, labelled group grids, and atomic output folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

LABEL_HEIGHT = 28


def to_pil(image: np.ndarray) -> Image.Image:
    """A float [H, W, 3] image in [0, 1] as an 8-bit PIL image (rounded, as diffusers' numpy_to_pil does)."""
    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))


def save_png(image: Image.Image, path: Path, metadata: dict[str, object] | None = None) -> None:
    """Save a PNG with `metadata` as text chunks (values JSON-encoded unless they are strings)."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    image.save(path, pnginfo=info)


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


class OutputDirError(ValueError):
    """An output folder that a run may not write, or may not replace."""


def check_output_dir(out: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output folder that a run cannot replace without losing data: a file, the current folder or one
    above it, a non-empty folder without `overwrite`, and with it one that is not a previous run's output (no
    report.json) or that holds one of the run's `inputs`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirError(f"{out} is a file, not an output folder")
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise OutputDirError(f"{out} is the current folder or holds it; name a folder of its own for the output")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputDirError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if not (out / RUN_MARKER).is_file():
        raise OutputDirError(f"{out} is not a previous run's output (no {RUN_MARKER}); --overwrite replaces only "
                             "such a folder, so nothing was deleted")
    for path in inputs:
        if target in Path(path).resolve().parents:
            raise OutputDirError(f"{out} holds this run's input {path}; --overwrite would delete it")


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
