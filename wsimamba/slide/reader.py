"""One slide abstraction over reader backends.

`open_slide(path)` returns a `Slide` whatever the file is: OpenSlide reads every format it knows
(svs, tif/tiff, ndpi, mrxs, scn, vms, bif, ...); TIFFs OpenSlide refuses (stripped or otherwise
non-pyramidal) are read with tifffile. Coordinates are always level-0 pixels, (x, y) order; pixel
arrays are uint8 RGB of shape (height, width, 3).
"""

from __future__ import annotations

import abc
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from wsimamba.errors import SlideError

# Suffixes we look for in a slide folder. OpenSlide decides whether it can really read a file.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".qptiff")


def _block_edges(length: int, block: int, scale: float, target: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Split [0, length) level pixels into blocks and map each to its [start, end) in target pixels."""
    edges = []
    for a in range(0, length, block):
        b = min(length, a + block)
        ta = int(round(a * scale))
        tb = target if b == length else int(round(b * scale))
        edges.append(((a, b), (ta, tb)))
    return edges


def _rgba_to_rgb(rgba: Image.Image) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA, transparent outside scanned areas: composite on white."""
    arr = np.asarray(rgba)
    if arr.shape[-1] == 3:
        return np.ascontiguousarray(arr)
    rgb = arr[..., :3]
    alpha = arr[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # premultiplied: out = rgb + (255 - alpha) * white
    out = rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))
    return np.minimum(out, 255).astype(np.uint8)


class Slide(abc.ABC):
    """A whole-slide image opened for reading.

    Attributes:
        path: the file.
        slide_id: the file stem, used as the slide's identifier everywhere.
        level_dimensions: (width, height) of every pyramid level, level 0 first.
        level_downsamples: downsample of every level relative to level 0.
        mpp: level-0 microns per pixel, or None when the file does not state it and no override
            was given.
        mpp_source: where `mpp` came from (a property name, "override" or "none").
        backend: "openslide" or "tifffile".
    """

    backend = "base"

    def __init__(self, path: Path, mpp: float | None, mpp_source: str):
        self.path = Path(path)
        self.slide_id = slide_id_of(self.path)
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def require_mpp(self) -> float:
        """The level-0 µm/px, or a SlideError that names the fix."""
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: the slide does not state its resolution (no mpp in its properties); "
                "pass --mpp-override MICRONS_PER_PIXEL"
            )
        return self.mpp

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (1% tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    @abc.abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of a region: `location` (x, y) in level-0 pixels, `size` (w, h) in level pixels.

        Returns uint8 (h, w, 3); areas outside the slide are white.
        """

    def read_at(self, location: tuple[int, int], size0: int, out_size: int, level: int | None = None) -> np.ndarray:
        """A square patch of `size0` level-0 pixels at `location`, resized to `out_size` pixels.

        Reads from `level` (default: the best level for the implied downsample), so large patches
        are never read at full resolution. Returns uint8 (out_size, out_size, 3).
        """
        if level is None:
            level = self.best_level_for_downsample(size0 / out_size)
        ds = self.level_downsamples[level]
        read = max(1, int(round(size0 / ds)))
        rgb = self.read_region(location, level, (read, read))
        if read != out_size:
            rgb = np.array(Image.fromarray(rgb).resize((out_size, out_size), Image.BILINEAR))
        return rgb

    def thumbnail(self, downsample: float, block: int = 4096) -> np.ndarray:
        """The whole slide at `downsample` (≥ 1) relative to level 0, uint8 (H, W, 3).

        Reads the best pyramid level in blocks of at most `block`² level pixels, so a slide without
        a pyramid never needs its full-resolution image in memory.
        """
        w0, h0 = self.dimensions
        tw, th = max(1, int(round(w0 / downsample))), max(1, int(round(h0 / downsample)))
        level = self.best_level_for_downsample(downsample)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        sx, sy = tw / lw, th / lh  # target pixels per level pixel
        out = np.empty((th, tw, 3), dtype=np.uint8)
        xs = _block_edges(lw, block, sx, tw)
        ys = _block_edges(lh, block, sy, th)
        for (ly0, ly1), (ty0, ty1) in ys:
            for (lx0, lx1), (tx0, tx1) in xs:
                if tx1 <= tx0 or ty1 <= ty0:
                    continue
                img = self.read_region((int(round(lx0 * ds)), int(round(ly0 * ds))), level, (lx1 - lx0, ly1 - ly0))
                if img.shape[:2] != (ty1 - ty0, tx1 - tx0):
                    img = np.asarray(Image.fromarray(img).resize((tx1 - tx0, ty1 - ty0), Image.BILINEAR))
                out[ty0:ty1, tx0:tx1] = img
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Slide {self.slide_id} {self.dimensions} levels={self.level_count} mpp={self.mpp} backend={self.backend}>"


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path, osr, mpp_override: float | None):
        mpp, source = _openslide_mpp(osr.properties)
        if mpp_override is not None:
            mpp, source = float(mpp_override), "override"
        super().__init__(path, mpp, source)
        self._osr = osr
        self.level_dimensions = [tuple(map(int, d)) for d in osr.level_dimensions]
        self.level_downsamples = [float(d) for d in osr.level_downsamples]
        self.vendor = osr.properties.get("openslide.vendor", "unknown")

    def read_region(self, location, level, size):
        import openslide

        try:
            img = self._osr.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: cannot read region {tuple(location)} at level {level}: {e}") from e
        return _rgba_to_rgb(img)

    def close(self) -> None:
        self._osr.close()


def _openslide_mpp(props) -> tuple[float | None, str]:
    for key in ("openslide.mpp-x", "aperio.MPP"):
        v = props.get(key)
        if v:
            try:
                mpp = float(v)
            except ValueError:
                continue
            if mpp > 0 and math.isfinite(mpp):
                return mpp, key
    # Some scanners only give a resolution unit in the TIFF tags
    unit = props.get("tiff.ResolutionUnit")
    xres = props.get("tiff.XResolution")
    if unit and xres:
        try:
            res = float(xres)
        except ValueError:
            res = 0.0
        per = {"centimeter": 1e4, "inch": 25400.0}.get(unit.lower())
        if per and res > 0:
            return per / res, "tiff.XResolution"
    return None, "none"


class TiffSlide(Slide):
    """A TIFF OpenSlide will not open (stripped / single-level): one level, read through tifffile's
    Zarr view so a region read touches only the tiles or strips it needs."""

    backend = "tifffile"

    def __init__(self, path: Path, mpp_override: float | None):
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as e:  # tifffile raises many types for a corrupt file
            raise SlideError(f"{path}: not a readable slide ({type(e).__name__}: {e})") from e
        series = self._tif.series[0]
        page = series.levels[0].keyframe if series.levels else series.keyframe
        mpp, source = _tiff_page_mpp(page)
        if mpp_override is not None:
            mpp, source = float(mpp_override), "override"
        super().__init__(path, mpp, source)
        self._levels = []
        self.level_dimensions = []
        self.level_downsamples = []
        for lvl in series.levels:
            arr = zarr.open(lvl.aszarr(), mode="r")
            axes = lvl.axes
            self._levels.append((arr, axes))
            shape = dict(zip(axes, lvl.shape))
            self.level_dimensions.append((int(shape["X"]), int(shape["Y"])))
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = [w0 / w for w, _ in self.level_dimensions]
        axes0 = self._levels[0][1]
        if "X" not in axes0 or "Y" not in axes0:
            raise SlideError(f"{path}: TIFF series has axes {axes0!r}, expected an image with Y and X")

    def read_region(self, location, level, size):
        arr, axes = self._levels[level]
        ds = self.level_downsamples[level]
        x0 = int(round(location[0] / ds))
        y0 = int(round(location[1] / ds))
        w, h = int(size[0]), int(size[1])
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        xa, ya = max(0, x0), max(0, y0)
        xb, yb = min(lw, x0 + w), min(lh, y0 + h)
        if xb <= xa or yb <= ya:
            return out
        index = []
        for ax in axes:
            if ax == "Y":
                index.append(slice(ya, yb))
            elif ax == "X":
                index.append(slice(xa, xb))
            elif ax == "S":
                index.append(slice(None))
            else:
                index.append(0)
        region = np.asarray(arr[tuple(index)])
        region = _to_rgb_uint8(region, [a for a in axes if a in "YXS"])
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = region
        return out

    def close(self) -> None:
        self._tif.close()


def _to_rgb_uint8(region: np.ndarray, axes: list[str]) -> np.ndarray:
    if "S" in axes and axes.index("S") == 0:
        region = np.moveaxis(region, 0, -1)
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=-1)
    if region.shape[-1] == 4:
        region = region[..., :3]
    elif region.shape[-1] == 1:
        region = np.repeat(region, 3, axis=-1)
    if region.dtype != np.uint8:
        if np.issubdtype(region.dtype, np.integer):
            shift = max(0, np.iinfo(region.dtype).bits - 8)
            region = (region >> shift).astype(np.uint8)
        else:
            region = np.clip(region * 255.0, 0, 255).astype(np.uint8)
    return region


def _tiff_page_mpp(page) -> tuple[float | None, str]:
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m:
        try:
            v = float(m.group(1))
            if v > 0:
                return v, "aperio.MPP"
        except ValueError:
            pass
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den:
            px_per_unit = num / den
            per = {3: 1e4, 2: 25400.0}.get(unit)  # 3 = centimetre, 2 = inch
            if per and px_per_unit > 1:  # 1 px/unit is the "no resolution" default of many writers
                return per / px_per_unit, "tiff.XResolution"
    return None, "none"


def slide_id_of(path: Path) -> str:
    """The slide's identifier: its file name without the suffix."""
    return Path(path).stem


def open_slide(path: str | Path, mpp_override: float | None = None) -> Slide:
    """Open a slide with OpenSlide, or with tifffile for TIFFs OpenSlide refuses.

    Raises SlideError naming the file when neither can read it.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such slide file")
    if mpp_override is not None and not (mpp_override > 0):
        raise SlideError(f"--mpp-override must be > 0, got {mpp_override}")
    try:
        osr = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as e:
        if path.suffix.lower() in (".tif", ".tiff", ".svs", ".qptiff"):
            return TiffSlide(path, mpp_override)
        raise SlideError(f"{path}: OpenSlide cannot read this file ({e or type(e).__name__})") from e
    return OpenSlideSlide(path, osr, mpp_override)


def find_slides(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Slide files in `folder`, sorted by path. Raises SlideError on a missing folder or duplicate ids."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SlideError(f"{folder}: no such slide folder")
    it = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(p for p in it if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    seen: dict[str, Path] = {}
    for p in paths:
        sid = slide_id_of(p)
        if sid in seen:
            raise SlideError(f"two slides share the id {sid!r}: {seen[sid]} and {p}")
        seen[sid] = p
    return paths
