"""Image folders: ``<row>_<k>.png`` per image plus ``grid.png``, written and read the same way.

Pixels map [-1, 1] <-> [0, 255] (rounded, clamped). Single-channel models give grayscale PNGs; three
channels give RGB; other channel counts show the first channel.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np

from exporter.errors import ImageFolderError
from exporter.fileio import atomic_write_bytes

IMAGE_NAME = re.compile(r"^(\d+)_(\d+)\.png$")
GRID_NAME = "grid.png"

log = logging.getLogger(__name__)


def to_uint8(image) -> np.ndarray:
    """[C, H, W] float in [-1, 1] -> [H, W] or [H, W, 3] uint8."""
    arr = np.asarray(image, dtype=np.float32)
    arr = np.clip(np.rint((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return arr[0] if arr.shape[0] != 3 else arr.transpose(1, 2, 0)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_grid(images: dict[tuple[int, int], np.ndarray], scale: int = 4, pad: int = 2) -> np.ndarray:
    """Rows of the grid are conditioning rows, columns the sample index k; upscaled to be seen."""
    rows = sorted({r for r, _ in images})
    cols = max(k for _, k in images) + 1
    first = next(iter(images.values()))
    h, w = first.shape[0] * scale, first.shape[1] * scale
    shape = (len(rows) * (h + pad) + pad, cols * (w + pad) + pad) + first.shape[2:]
    grid = np.full(shape, 255, dtype=np.uint8)
    for (r, k), img in images.items():
        y, x = pad + rows.index(r) * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def write_image_folder(out: str | Path, images: dict[tuple[int, int], object]) -> list[Path]:
    """Write every image (atomically, one file at a time) and the grid; returns the image paths."""
    out = Path(out)
    pixels = {key: to_uint8(img) for key, img in images.items()}
    flat = [f"{r}_{k}.png" for (r, k), p in sorted(pixels.items()) if p.min() == p.max()]
    if flat:  # a uniform image (all black, all white) is what a broken scale or graph usually gives
        log.warning("%s: %d of %d images are one uniform colour (%s%s), which broken scales or graphs give: compare "
                    "with the FP32 images and run exporter parity on the graphs", out, len(flat), len(pixels),
                    ", ".join(flat[:5]), ", ..." if len(flat) > 5 else "")
    paths = [atomic_write_bytes(out / f"{r}_{k}.png", png_bytes(p)) for (r, k), p in sorted(pixels.items())]
    atomic_write_bytes(out / GRID_NAME, png_bytes(make_grid(pixels)))
    return paths


def read_image_folder(folder: str | Path) -> dict[tuple[int, int], np.ndarray]:
    """{(row, k): float32 [H, W] or [H, W, 3] in [-1, 1]} for every ``<row>_<k>.png`` in ``folder``."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"image folder not found: {folder}")
    images = {}
    for f in sorted(folder.iterdir()):
        m = IMAGE_NAME.match(f.name)
        if not m:
            continue
        try:
            with Image.open(f) as im:
                if im.mode in ("I", "I;16"):  # 16-bit greyscale PNG: scaled by its own range (convert clips)
                    arr = np.asarray(im, dtype=np.float64) / 257.0
                elif im.mode in ("L", "1", "LA"):  # greyscale (an alpha channel is not the image)
                    arr = np.asarray(im.convert("L"))
                else:  # RGB(A), and palette images: colour unless every palette entry used is grey
                    arr = np.asarray(im.convert("RGB"))
                    if im.mode == "P" and (arr == arr[..., :1]).all():
                        arr = arr[..., 0]
        except (UnidentifiedImageError, OSError) as e:
            raise ImageFolderError(f"{f}: not a readable PNG ({e})") from None
        images[(int(m[1]), int(m[2]))] = (arr / 127.5 - 1.0).astype(np.float32)
    if not images:
        raise ImageFolderError(f"{folder}: no images named <row>_<k>.png")
    return images
