"""The patch grid: where patches are cut, at which pyramid level, and how big in level-0 pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsimamba.errors import SlideError
from wsimamba.slide.reader import Slide
from wsimamba.slide.tissue import TissueMask


@dataclass
class PatchGrid:
    """Patches of one slide.

    coords: int64 (N, 2), top-left (x, y) in level-0 pixels; every patch lies inside the slide.
    patch_size: patch side in pixels at the target resolution (what the encoder sees).
    patch_size_level0: the same patch's side in level-0 pixels.
    patch_level: the pyramid level patches are read from (then resized to patch_size).
    tissue: float (N,) fraction of each patch on tissue.
    """

    coords: np.ndarray
    tissue: np.ndarray
    patch_size: int
    patch_size_level0: int
    patch_level: int
    read_size: int  # side read at patch_level before resizing to patch_size
    target_mpp: float
    level0_mpp: float
    overlap: int
    level0_width: int
    level0_height: int

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def coords_attrs(self, name: str) -> dict:
        """The attributes stored on the `coords` dataset (CLAM / TRIDENT names)."""
        return {
            "patch_size": self.patch_size,
            "patch_level": self.patch_level,
            "patch_size_level0": self.patch_size_level0,
            "target_mpp": self.target_mpp,
            "level0_mpp": self.level0_mpp,
            "overlap": self.overlap,
            "level0_width": self.level0_width,
            "level0_height": self.level0_height,
            "name": name,
        }


def make_grid(
    slide: Slide,
    tissue: TissueMask,
    target_mpp: float = 0.5,
    patch_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.25,
) -> PatchGrid:
    """Tile a slide at `target_mpp` µm/px into `patch_size` patches overlapping by `overlap` pixels
    (at the target resolution), keeping those with at least `min_tissue` of their area on tissue."""
    if not target_mpp > 0:
        raise SlideError(f"target mpp must be > 0, got {target_mpp}")
    if patch_size < 1:
        raise SlideError(f"patch size must be ≥ 1, got {patch_size}")
    if not 0 <= overlap < patch_size:
        raise SlideError(f"overlap must be in [0, patch size {patch_size}), got {overlap}")
    if not 0.0 <= min_tissue <= 1.0:
        raise SlideError(f"min tissue fraction must be in [0, 1], got {min_tissue}")
    mpp0 = slide.require_mpp()
    scale = target_mpp / mpp0  # level-0 pixels per target pixel
    size0 = max(1, int(round(patch_size * scale)))
    step0 = max(1, int(round((patch_size - overlap) * scale)))
    level = slide.best_level_for_downsample(scale)
    read_size = max(1, int(round(size0 / slide.level_downsamples[level])))
    w0, h0 = slide.dimensions
    xs = np.arange(0, w0 - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, h0 - size0 + 1, step0, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    gx, gy = gx.ravel(), gy.ravel()
    frac = tissue.tissue_fraction(gx, gy, size0) if gx.size else np.zeros(0)
    keep = frac >= max(min_tissue, 1e-9)  # a patch with no tissue at all is never kept
    coords = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64) if gx.size else np.zeros((0, 2), np.int64)
    return PatchGrid(
        coords=coords,
        tissue=frac[keep].astype(np.float32),
        patch_size=int(patch_size),
        patch_size_level0=size0,
        patch_level=level,
        read_size=read_size,
        target_mpp=float(target_mpp),
        level0_mpp=float(mpp0),
        overlap=int(overlap),
        level0_width=int(w0),
        level0_height=int(h0),
    )
