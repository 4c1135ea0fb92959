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


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces `out`, on error it is removed,
    so a failed run leaves nothing half-written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
