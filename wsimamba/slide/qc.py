"""Quality-control pictures: thumbnail, tissue contour and patch grid in one PNG per slide."""

from __future__ import annotations

import io

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsimamba.atomic import atomic_path
from wsimamba.slide.tiling import PatchGrid
from wsimamba.slide.tissue import TissueMask


def render_qc(thumb: np.ndarray, tissue: TissueMask, grid: PatchGrid, level0_size: tuple[int, int], max_side: int = 2048) -> Image.Image:
    """Thumbnail (H, W, 3) uint8 with the tissue contour (green) and patch outlines (blue)."""
    from skimage.measure import find_contours

    img = Image.fromarray(thumb)
    if max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, int(img.width * f)), max(1, int(img.height * f))), Image.BILINEAR)
    w0, h0 = level0_size
    sx, sy = img.width / w0, img.height / h0  # QC pixels per level-0 pixel
    draw = ImageDraw.Draw(img)
    # patches first so the contour stays visible on top
    s = grid.patch_size_level0
    for x, y in grid.coords:
        draw.rectangle([x * sx, y * sy, (x + s) * sx - 1, (y + s) * sy - 1], outline=(40, 90, 220))
    mask = np.pad(tissue.mask, 1)  # pad so regions touching the border get closed contours
    for contour in find_contours(mask.astype(np.uint8), 0.5):
        pts = [((c - 1) * tissue.scale_x * sx, (r - 1) * tissue.scale_y * sy) for r, c in contour]
        if len(pts) > 1:
            draw.line(pts, fill=(0, 200, 0), width=2)
    return img


def write_png_atomic(img: Image.Image | bytes, path: Path) -> None:
    """Write a PNG (an image, or its encoded bytes from `png_bytes`) under a temporary name, then
    rename it into place."""
    with atomic_path(path) as tmp:
        if isinstance(img, bytes):
            tmp.write_bytes(img)
        else:
            img.save(tmp, format="PNG")


def png_bytes(img: Image.Image) -> bytes:
    """`img` encoded as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
