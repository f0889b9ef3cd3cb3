"""Synthetic H&E-like whole-slide images and cohorts with ground-truth tumor masks.

A slide is drawn from a few smooth random fields defined on a coarse grid (tissue islands, tumor
nodules, blur, stain strength, fibre orientation) plus point processes (nuclei) and a pen stroke.
Pixels are rendered one block of `tile` rows at a time with the Beer-Lambert stain model
(`RGB = I0 * exp(-(c_H * OD_H + c_E * OD_E))`) and streamed into a tiled JPEG TIFF, so memory does
not grow with the slide: only the 4x-downsampled level (1/16 of level 0) is held whole.

Files:
- `.svs`: Aperio layout. IFD 0 = level 0 (tiled), IFD 1 = stripped thumbnail, IFD 2.. = lower
  levels (tiled). Level 0's ImageDescription starts with `Aperio Image Library` and carries
  `AppMag` and `MPP`, which OpenSlide reports as `openslide.objective-power` / `openslide.mpp-x`.
- `.tiff`: generic pyramidal TIFF. Every level is a tiled IFD in the main chain; lower levels have
  NewSubfileType = 1 (reduced resolution), which OpenSlide's generic-tiff backend requires.
  X/YResolution are pixels per centimetre (`1e4 / mpp`), which OpenSlide turns into mpp.
- Both: levels downsample by 4 (level k is `ceil(dim / 4**k)`) while the new level's longer side
  is at least one tile; JPEG tiles (YCbCr 4:2:0). `mpp=None` writes no MPP/AppMag and no
  resolution unit, so OpenSlide reports no `openslide.mpp-x`.
- Mask PNG (uint8, 0 or 255): pixel (i, j) is the tumor state at level-0 point
  `((j + 0.5) * ds, (i + 0.5) * ds)`, shape `(ceil(H / ds), ceil(W / ds))`. Its text chunks hold
  `mask_downsample`, `slide_id`, `level0_width`, `level0_height`, `tumor_fraction_of_tissue`.

Cohorts (`synth_cohort`) write `slides/`, `masks/`, `labels.csv` and `cohort.json`; see there.
Everything is a function of the seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, PngImagePlugin
from scipy import fft as sp_fft
from scipy import ndimage

from wsimamba.atomic import atomic_path
from wsimamba.errors import WsimambaError

__all__ = ["SynthSlide", "synth_slide", "synth_cohort", "pyramid_dims", "FORMATS"]

FORMATS = ("svs", "tiff")
LEVEL_FACTOR = 4  # downsample between consecutive pyramid levels
THUMBNAIL_MAX = 768  # longer side of the SVS thumbnail image, pixels

# Stain optical-density vectors (R, G, B), Macenko's reference H&E.
_OD_H = np.array([0.5626, 0.7201, 0.4062], np.float32)
_OD_E = np.array([0.2159, 0.8012, 0.5581], np.float32)
# Marker inks, optical density per channel: green, blue, black.
_OD_PEN = np.array([[0.95, 0.22, 0.80], [1.05, 0.60, 0.12], [0.95, 0.95, 0.85]], np.float32)
_BACKGROUND = np.array([243.0, 242.0, 245.0], np.float32)  # glass seen through the scanner

# Physical scales (micrometres); with mpp=None the slide is drawn as if at 0.25 um/px.
_DEFAULT_SCALE_MPP = 0.25
_NUCLEI_PER_UM2 = {"normal": 1 / 170.0, "tumor": 1 / 85.0}
_FIBRE_LENGTH_UM = 10.0  # correlation length of collagen streaks along / across the fibre
_FIBRE_WIDTH_UM = 0.7
_TEX = 512  # fibre texture period, pixels (a power of two: indices wrap with a bit mask)


@dataclass
class SynthSlide:
    """One generated slide. Sizes are level-0 pixels; `mpp` is um/px (None: not recorded).

    `tumor_fraction` is tumor pixels / tissue pixels on the mask grid (0 for negatives);
    `mask` is the (ceil(height / mask_downsample), ceil(width / mask_downsample)) uint8 0/255 mask.
    """

    slide_id: str
    case_id: str
    label: int
    path: Path
    mask_path: Path | None
    width: int
    height: int
    mpp: float | None
    mask_downsample: int
    tumor_fraction: float
    fmt: str = "svs"
    tissue_fraction: float = 0.0
    level_dimensions: tuple[tuple[int, int], ...] = ()
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    def record(self, root: Path | None = None) -> dict:
        """JSON-ready description; paths relative to `root` when given."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            return Path(os.path.relpath(p, root)).as_posix() if root is not None else str(p)

        return {
            "slide_id": self.slide_id,
            "case_id": self.case_id,
            "label": self.label,
            "path": rel(self.path),
            "mask_path": rel(self.mask_path),
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "mask_downsample": self.mask_downsample,
            "tumor_fraction_of_tissue": round(self.tumor_fraction, 6),
            "tissue_fraction": round(self.tissue_fraction, 6),
            "format": self.fmt,
            "level_dimensions": [list(d) for d in self.level_dimensions],
        }


def pyramid_dims(width: int, height: int, tile: int = 256) -> list[tuple[int, int]]:
    """(width, height) of every level: each `ceil(prev / 4)`, kept while its longer side >= tile."""
    dims = [(width, height)]
    while True:
        w, h = dims[-1]
        nxt = (-(-w // LEVEL_FACTOR), -(-h // LEVEL_FACTOR))
        if max(nxt) < tile:
            return dims
        dims.append(nxt)


# ----------------------------------------------------------------------------------------------
# random fields on a coarse grid


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field, zero mean, unit std, correlation length `sigma` cells; float32."""
    pad = int(min(3 * sigma, 2 * max(shape))) + 1  # keep the FFT's wrap-around off the slide
    big = (shape[0] + 2 * pad, shape[1] + 2 * pad)
    spec = sp_fft.rfft2(rng.standard_normal(big, dtype=np.float32))
    ky = sp_fft.fftfreq(big[0]).astype(np.float32)[:, None]
    kx = sp_fft.rfftfreq(big[1]).astype(np.float32)[None, :]
    spec *= np.exp(-2 * (np.pi * sigma * ky) ** 2)
    spec *= np.exp(-2 * (np.pi * sigma * kx) ** 2)
    out = sp_fft.irfft2(spec, s=big)[pad : pad + shape[0], pad : pad + shape[1]]
    del spec
    out = out - out.mean()
    out /= out.std() + 1e-12
    return out.astype(np.float32, copy=False)


class _Axis:
    """Bilinear weights of continuous coordinates (pixel i spans [i, i+1)) on grid nodes k*step."""

    def __init__(self, coords: np.ndarray, step: float, n_nodes: int):
        f = np.asarray(coords, np.float64) / step
        i0 = np.clip(np.floor(f).astype(np.int64), 0, n_nodes - 2)
        self.i0 = i0
        self.w = np.clip(f - i0, 0.0, 1.0).astype(np.float32)


def _sample_grid(fields: np.ndarray, ay: _Axis, ax: _Axis) -> np.ndarray:
    """Bilinear sample of stacked fields (F, gh, gw) on the outer product of two axes: (F, ny, nx)."""
    c0 = int(ax.i0.min())
    c1 = int(ax.i0.max()) + 2
    sub = fields[:, :, c0:c1]
    wy = ay.w[None, :, None]
    rows = sub[:, ay.i0] * (1 - wy) + sub[:, ay.i0 + 1] * wy
    j = ax.i0 - c0
    wx = ax.w[None, None, :]
    return rows[:, :, j] * (1 - wx) + rows[:, :, j + 1] * wx


def _fibre_texture(rng: np.random.Generator, direction: float, px_um: float) -> np.ndarray:
    """Periodic (_TEX, _TEX) float32 texture in [0, 1] of streaks running along `direction` (rad)."""
    ky = (np.fft.fftfreq(_TEX) * 2 * np.pi)[:, None]
    kx = (np.fft.rfftfreq(_TEX) * 2 * np.pi)[None, :]
    k_along = kx * np.cos(direction) + ky * np.sin(direction)
    k_across = -kx * np.sin(direction) + ky * np.cos(direction)
    along, across = k_along * _FIBRE_LENGTH_UM * px_um, k_across * _FIBRE_WIDTH_UM * px_um
    filt = np.exp(-0.5 * (along**2 + across**2))
    t = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((_TEX, _TEX))) * filt, s=(_TEX, _TEX))
    t = (t - t.mean()) / (t.std() + 1e-12)
    return (0.5 + 0.5 * np.tanh(1.2 * t)).astype(np.float32)


def _sample_points(fld: np.ndarray, step: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear sample of one field (gh, gw) at scattered points (same formula as `_sample_grid`)."""
    ay = _Axis(ys, step, fld.shape[0])
    ax = _Axis(xs, step, fld.shape[1])
    a, b = ay.i0, ax.i0
    wy, wx = ay.w, ax.w
    top = fld[a, b] * (1 - wx) + fld[a, b + 1] * wx
    bot = fld[a + 1, b] * (1 - wx) + fld[a + 1, b + 1] * wx
    return top * (1 - wy) + bot * wy


def _ramp_width(fld: np.ndarray, thr: float, step: float, px: float = 1.5) -> float:
    """Field change over `px` pixels near the level set fld == thr (gives ~px-wide soft edges)."""
    gy, gx = np.gradient(fld)
    grad = np.hypot(gy, gx)
    near = np.abs(fld - thr) < np.quantile(np.abs(fld - thr), 0.05) + 1e-9
    g = float(np.median(grad[near])) if near.any() else float(np.median(grad))
    return max(g / step * px, 1e-6)


# ----------------------------------------------------------------------------------------------
# the slide model


@dataclass
class _Model:
    """Everything needed to render any block of a slide; all sizes in level-0 pixels."""

    width: int
    height: int
    step: float
    fields: np.ndarray  # (11, gh, gw): tissue, tumor, blur, stain, 3 fibre weights, 3 warps, looseness
    thr_tissue: float
    w_tissue: float
    thr_tumor: float
    w_tumor: float
    textures: np.ndarray  # (3, _TEX, _TEX) periodic fibre textures in [0, 1], one per direction
    fibre_shift: np.ndarray  # (3, 2) texture displacement (dy, dx) per unit of warp, px
    nuclei: dict  # arrays sorted by cy: cy, cx, ext, radius, elong, angle, dark, irr, soft, tumor, p
    ext_max: float
    pen: np.ndarray | None  # (P, 2) polyline (y, x)
    pen_width: float
    pen_od: np.ndarray
    pen_strength: float
    h_scale: float
    e_scale: float
    background: np.ndarray
    seed: int


def _build_model(width: int, height: int, seed: int, tumor_fraction: float, mpp: float | None) -> _Model:
    # One stream per component, so changing how one is drawn leaves the others as they were.
    streams = np.random.SeedSequence([seed, 0x5717]).spawn(8)
    rng_tissue, rng_tumor, rng_blur, rng_stain, rng_fibre, rng_nuclei, rng_pen, _ = (
        np.random.default_rng(st) for st in streams
    )
    px_um = 1.0 / (mpp or _DEFAULT_SCALE_MPP)  # pixels per micrometre
    # Shapes scale with the slide, cells with the micrometre; the grid stays <= ~2k nodes a side.
    step = float(max(16, math.ceil(max(width, height) / 2048)))
    gh = int(math.ceil(height / step)) + 2
    gw = int(math.ceil(width / step)) + 2
    yy = (np.arange(gh, dtype=np.float32) * step)[:, None]
    xx = (np.arange(gw, dtype=np.float32) * step)[None, :]
    side = float(min(width, height))

    # One float32 array for every per-pixel field, filled in place to keep the peak memory low.
    fields = np.empty((11, gh, gw), np.float32)
    tissue, tumor, blur, stain = fields[0], fields[1], fields[2], fields[3]
    fibre_w, warps, loose = fields[4:7], fields[7:10], fields[10]

    def ellipse(cy: float, cx: float, ry: float, rx: float, ang: float) -> np.ndarray:
        """Normalised elliptical radius (1 on the outline) on the grid, float32."""
        dy, dx = yy - np.float32(cy), xx - np.float32(cx)
        ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        u = (dx * ca + dy * sa) / np.float32(rx)
        v = (dy * ca - dx * sa) / np.float32(ry)
        return np.sqrt(u * u + v * v)

    # Tissue: a few elliptical islands with noisy borders and holes (fat, vessel lumina). Their
    # sizes are scaled to the drawn tissue fraction and their centres kept apart when there is
    # room, so that the threshold below stays near the outlines and islands rarely merge.
    n_isl = int(rng_tissue.integers(2, 6))
    target_tissue = rng_tissue.uniform(0.25, 0.45)
    share = rng_tissue.dirichlet(np.full(n_isl, 3.0)) * target_tissue * width * height
    aspect = rng_tissue.uniform(0.5, 1.0, n_isl)
    placed: list[tuple[float, float, float]] = []
    tissue.fill(-1.0)
    for k in range(n_isl):
        rx = math.sqrt(share[k] / (math.pi * aspect[k]))
        ry = rx * aspect[k]
        for _attempt in range(40):
            cy = rng_tissue.uniform(0.2, 0.8) * height
            cx = rng_tissue.uniform(0.2, 0.8) * width
            if all(math.hypot(cy - py, cx - px) > 1.1 * (rx + pr) for py, px, pr in placed):
                break
        placed.append((cy, cx, rx))
        np.maximum(tissue, 1.0 - ellipse(cy, cx, ry, rx, rng_tissue.uniform(0, np.pi)), out=tissue)
    cells_side = side / step
    tissue += 0.28 * _smooth_noise(rng_tissue, (gh, gw), cells_side / 14)
    tissue += 0.10 * _smooth_noise(rng_tissue, (gh, gw), cells_side / 45)
    holes = _smooth_noise(rng_tissue, (gh, gw), max(1.0, 40 * px_um / step))
    tissue -= 0.9 * np.maximum(holes - 1.6, 0)
    del holes
    inside = (slice(0, int(height // step) + 1), slice(0, int(width // step) + 1))
    thr_tissue = float(np.quantile(tissue[inside], 1.0 - target_tissue))
    w_tissue = _ramp_width(tissue, thr_tissue, step)
    is_tissue = tissue > thr_tissue

    # Tumor: 1-3 nodules inside tissue, the threshold set so tumor/tissue == tumor_fraction on the grid.
    tumor.fill(0.0)
    thr_tumor, w_tumor = 2.0, 1.0
    if tumor_fraction > 0:
        depth = ndimage.distance_transform_edt(is_tissue).astype(np.float32)
        cand = np.flatnonzero(depth >= 0.5 * depth.max())
        del depth
        n_foci = int(rng_tumor.integers(1, 4))
        r0 = math.sqrt(tumor_fraction * is_tissue.sum() / math.pi)  # grid cells
        tumor.fill(-1.0)
        for k in range(n_foci):
            iy, ix = np.unravel_index(cand[rng_tumor.integers(len(cand))], (gh, gw))
            r = r0 * rng_tumor.uniform(0.6, 1.2) * step
            aspect = rng_tumor.uniform(0.6, 1.0)
            rad = ellipse(iy * step, ix * step, r * aspect, r, rng_tumor.uniform(0, np.pi))
            weight = np.float32(1.0 if k == 0 else rng_tumor.uniform(0.6, 0.95))
            np.maximum(tumor, weight * np.exp(-rad * rad), out=tumor)
        tumor += 0.12 * _smooth_noise(rng_tumor, (gh, gw), max(1.0, r0 / 3))
        thr_tumor = float(np.quantile(tumor[is_tissue], 1.0 - tumor_fraction))
        w_tumor = _ramp_width(tumor, thr_tumor, step, px=3.0)
    del is_tissue

    # Blur: out-of-focus patches on about half the slides.
    blur.fill(0.0)
    if rng_blur.random() < 0.55:
        nb = _smooth_noise(rng_blur, (gh, gw), cells_side / 10)
        q = float(np.quantile(nb, 1.0 - rng_blur.uniform(0.04, 0.12)))
        np.clip((nb - q) / 0.3, 0, 1, out=blur)
        del nb

    stain[:] = np.exp(0.12 * _smooth_noise(rng_stain, (gh, gw), max(1.0, 300 * px_um / step)))

    # Fibres: three directions of streak texture; a slowly varying orientation field picks one.
    theta0 = rng_fibre.uniform(0, np.pi)
    orient = np.float32(np.pi) * _smooth_noise(rng_fibre, (gh, gw), max(1.0, 120 * px_um / step))
    dirs = [theta0 + j * np.pi / 3 for j in range(3)]
    for j, d in enumerate(dirs):
        fibre_w[j] = np.exp(3.0 * np.cos(2 * (orient - np.float32(d))))
    fibre_w /= fibre_w.sum(0)
    for j in range(3):
        warps[j] = _smooth_noise(rng_fibre, (gh, gw), max(1.0, 12 * px_um / step))
    textures = np.stack([_fibre_texture(rng_fibre, float(d), px_um) for d in dirs])
    # Warps displace the texture across the fibres, which makes straight streaks wavy.
    fibre_shift = (6.0 * px_um * np.array([[math.cos(d), -math.sin(d)] for d in dirs])).astype(np.float32)

    # Looseness: where 1 the stroma shows separate wavy fibres, where 0 it is evenly pink.
    np.clip(0.55 + 0.45 * _smooth_noise(rng_fibre, (gh, gw), max(1.0, 40 * px_um / step)), 0, 1, out=loose)
    density = np.exp(0.35 * _smooth_noise(rng_fibre, (gh, gw), max(1.0, 80 * px_um / step)))

    nuclei = _draw_nuclei(
        rng_nuclei, width, height, step, fields, density, thr_tissue, thr_tumor, orient, px_um
    )

    # Pen: a wobbly arc of marker ink on some slides, independent of the label.
    pen = None
    pen_width = 0.0
    pen_od = _OD_PEN[0]
    pen_strength = 0.0
    if rng_pen.random() < 0.45:
        t = np.linspace(0, 1, 72)
        cy, cx = rng_pen.uniform(0.2, 0.8) * height, rng_pen.uniform(0.2, 0.8) * width
        a0, span = rng_pen.uniform(0, 2 * np.pi), rng_pen.uniform(0.5, 1.4) * np.pi
        wobble = 1 + 0.12 * np.sin(2 * np.pi * (1.5 * t + rng_pen.random()))
        rad = rng_pen.uniform(0.18, 0.35) * side * wobble
        ang = a0 + span * t
        pen = np.stack([cy + rad * np.sin(ang) * rng_pen.uniform(0.6, 1.0), cx + rad * np.cos(ang)], 1)
        pen_width = rng_pen.uniform(0.008, 0.016) * side + 4
        pen_od = _OD_PEN[rng_pen.integers(len(_OD_PEN))]
        pen_strength = rng_pen.uniform(0.6, 1.0)

    return _Model(
        width=width,
        height=height,
        step=step,
        fields=fields,
        thr_tissue=thr_tissue,
        w_tissue=w_tissue,
        thr_tumor=thr_tumor,
        w_tumor=w_tumor,
        textures=textures,
        fibre_shift=fibre_shift,
        nuclei=nuclei,
        ext_max=float(nuclei["ext"].max()) if len(nuclei["cy"]) else 0.0,
        pen=pen,
        pen_width=pen_width,
        pen_od=pen_od,
        pen_strength=pen_strength,
        h_scale=rng_stain.uniform(0.85, 1.15),
        e_scale=rng_stain.uniform(0.8, 1.2),
        background=_BACKGROUND + rng_stain.uniform(-3, 2, 3).astype(np.float32),
        seed=int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]),
    )


def _draw_nuclei(rng, width, height, step, fields, density, thr_tissue, thr_tumor, orient, px_um) -> dict:
    """Nuclei centres and shapes (pixels), sorted by row. Normal: Poisson thinned by a density
    field; tumor: a jittered lattice, as tumor cells grow in cohesive sheets rather than scattered."""
    lam = _NUCLEI_PER_UM2["normal"] * 3.0 / px_um**2  # per px^2; the density field stays below 3x
    # Candidates are drawn strip by strip (~1e5 at a time) so that big slides need little memory.
    strip = max(1, int(1e5 / (lam * width)))
    ys, xs, flags = [], [], []
    for y0 in range(0, height, strip):
        h = min(strip, height - y0)
        n = int(rng.poisson(lam * width * h))
        cy = rng.uniform(y0, y0 + h, n)
        cx = rng.uniform(0, width, n)
        t_tissue = _sample_points(fields[0], step, cy, cx)
        t_tumor = _sample_points(fields[1], step, cy, cx)
        rate = _NUCLEI_PER_UM2["normal"] / px_um**2 * _sample_points(density, step, cy, cx)
        keep = (t_tissue > thr_tissue) & (t_tumor <= thr_tumor) & (rng.random(n) * lam < rate)
        ys.append(cy[keep].astype(np.float32))
        xs.append(cx[keep].astype(np.float32))
        flags.append(np.zeros(int(keep.sum()), bool))
    if thr_tumor < 2.0:
        pitch = px_um / math.sqrt(_NUCLEI_PER_UM2["tumor"])
        gx = np.arange(0, width, pitch)
        lattice_rows = np.arange(0, height, pitch)
        per = max(1, int(1e5 / len(gx)))
        for r0 in range(0, len(lattice_rows), per):
            gy = lattice_rows[r0 : r0 + per]
            ty = (gy[:, None] + rng.uniform(-0.35, 0.35, (len(gy), len(gx))) * pitch).ravel()
            tx = (gx[None, :] + rng.uniform(-0.35, 0.35, (len(gy), len(gx))) * pitch).ravel()
            inside = (
                (_sample_points(fields[1], step, ty, tx) > thr_tumor)
                & (_sample_points(fields[0], step, ty, tx) > thr_tissue)
                & (rng.random(ty.size) < 0.93)
            )
            ys.append(ty[inside].astype(np.float32))
            xs.append(tx[inside].astype(np.float32))
            flags.append(np.ones(int(inside.sum()), bool))
    cy, cx, is_tumor = np.concatenate(ys), np.concatenate(xs), np.concatenate(flags)
    m = len(cy)
    blur = _sample_points(fields[2], step, cy, cx)
    # Normal: small round dark lymphocyte/stromal nuclei, a fifth spindle-shaped along the fibres.
    # Tumor: larger, paler-to-darker and pleomorphic (size, shape, contour irregularity).
    radius_um = np.where(is_tumor, rng.uniform(3.0, 5.2, m), rng.uniform(2.2, 3.2, m))
    elong = np.where(is_tumor, rng.uniform(1.0, 1.5, m), 1.0 + 0.25 * rng.random(m))
    spindle = ~is_tumor & (rng.random(m) < 0.2)
    elong[spindle] = rng.uniform(1.8, 2.6, spindle.sum())
    angle = rng.uniform(0, np.pi, m)
    angle[spindle] = _sample_points(orient, step, cy[spindle], cx[spindle]) + np.pi / 2
    dark = np.where(is_tumor, rng.uniform(0.95, 1.55, m), rng.uniform(0.7, 1.05, m))
    irr = np.where(is_tumor, rng.uniform(0.04, 0.16, m), 0.0)
    soft = 0.9 + 5.0 * blur
    radius = radius_um * px_um
    ext = radius * np.sqrt(elong) * (1 + irr) + soft + 1.0
    order = np.argsort(cy, kind="stable")
    out = dict(
        cy=cy, cx=cx, ext=ext, radius=radius, elong=elong, angle=angle, dark=dark,
        irr=irr, soft=soft, tumor=is_tumor, phase=rng.uniform(0, 2 * np.pi, m),
    )
    return {k: v[order].astype(np.float32) if v.dtype != bool else v[order] for k, v in out.items()}


def _stamp_nuclei(out: np.ndarray, nuc: dict, sel: np.ndarray, y0: int, x0: int) -> None:
    """Max-composite nuclear hematoxylin of nuclei `sel` into `out` (bh, bw), block origin (y0, x0)."""
    bh, bw = out.shape
    flat = out.ravel()
    ext = nuc["ext"][sel]
    half = np.ceil(ext).astype(np.int64)
    # Nuclei of similar extent share one stamp size, so small ones don't pay for the big ones.
    bucket = (half + 3) // 4
    is_tumor = nuc["tumor"][sel]
    for b, t in sorted(set(zip(bucket.tolist(), is_tumor.tolist()))):
        idx = sel[(bucket == b) & (is_tumor == t)]
        h = int(4 * b)
        o = np.arange(-h, h + 1, dtype=np.float32)
        cy, cx = nuc["cy"][idx], nuc["cx"][idx]
        iy, ix = np.floor(cy).astype(np.int32), np.floor(cx).astype(np.int32)
        dy = (iy - cy + 0.5).astype(np.float32)[:, None, None] + o[None, :, None]
        dx = (ix - cx + 0.5).astype(np.float32)[:, None, None] + o[None, None, :]
        ca, sa = np.cos(nuc["angle"][idx])[:, None, None], np.sin(nuc["angle"][idx])[:, None, None]
        u = dx * ca + dy * sa
        v = dy * ca - dx * sa
        r = nuc["radius"][idx][:, None, None]
        e = np.sqrt(nuc["elong"][idx])[:, None, None]
        u *= 1 / (r * e)
        v *= e / r
        rn2 = u * u + v * v
        rn = np.sqrt(rn2)  # 1 on the smooth elliptical outline
        edge = 1 - rn
        if t:
            # Irregular contour: the outline radius varies as 1 + irr * cos(3 phi + phase).
            c, s = u / (rn + 1e-6), v / (rn + 1e-6)
            p = nuc["phase"][idx][:, None, None]
            edge += nuc["irr"][idx][:, None, None] * (
                (4 * c**3 - 3 * c) * np.cos(p) - (3 * s - 4 * s**3) * np.sin(p)
            )
        edge *= r / nuc["soft"][idx][:, None, None]  # signed distance to the outline in blur widths
        edge += 0.5
        val = np.clip(edge, 0, 1, out=edge)
        # Chromatin rim (nuclear membrane) darker than the centre; tumor nuclei more vesicular.
        rim = 0.6 + 0.55 * rn2 if t else 0.85 + 0.25 * rn2
        val *= nuc["dark"][idx][:, None, None] * rim
        oi = o.astype(np.int32)
        py = (iy - y0)[:, None, None] + oi[None, :, None]
        px = (ix - x0)[:, None, None] + oi[None, None, :]
        ok = (val > 0.01) & (py >= 0) & (py < bh) & (px >= 0) & (px < bw)
        lin = (py * bw + px)[ok]
        np.maximum.at(flat, lin, val[ok])


def _pen_distance(pen: np.ndarray, reach: float, y0: int, x0: int, bh: int, bw: int) -> np.ndarray | None:
    """Distance (px) from block pixels to the pen polyline, or None if no segment comes near."""
    dist = None
    ys = np.arange(y0, y0 + bh, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(x0, x0 + bw, dtype=np.float32)[None, :] + 0.5
    for (ay, ax), (by, bx) in zip(pen[:-1], pen[1:]):
        if (
            min(ay, by) - reach > y0 + bh
            or max(ay, by) + reach < y0
            or min(ax, bx) - reach > x0 + bw
            or max(ax, bx) + reach < x0
        ):
            continue
        vy, vx = by - ay, bx - ax
        ll = vy * vy + vx * vx + 1e-9
        t = np.clip(((ys - ay) * vy + (xs - ax) * vx) / ll, 0, 1)
        d = np.hypot(ys - ay - t * vy, xs - ax - t * vx)
        dist = d if dist is None else np.minimum(dist, d)
    return dist


def _render_block(
    m: _Model, y0: int, x0: int, bh: int, bw: int, band_nuclei: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """RGB uint8 (bh, bw, 3) of level-0 pixels [y0, y0+bh) x [x0, x0+bw).

    `noise` is a standard-normal float32 texture at least (2*bh, 2*bw); a window of it at a
    seeded offset serves as per-pixel noise, much cheaper than drawing fresh normals per block.
    """
    rng = np.random.default_rng([m.seed, y0, x0])
    oy = int(rng.integers(0, noise.shape[0] - bh + 1))
    ox = int(rng.integers(0, noise.shape[1] - bw + 1))
    grain = noise[oy : oy + bh, ox : ox + bw]
    od = np.zeros((3, bh, bw), np.float32)
    painted = False

    # Only the columns whose grid nodes come near tissue get the expensive tissue model.
    ay = _Axis(np.arange(y0, y0 + bh) + 0.5, m.step, m.fields.shape[1])
    g_rows = slice(int(ay.i0.min()), int(ay.i0.max()) + 2)
    g_c0 = int(x0 // m.step)
    g_c1 = min(int(math.ceil((x0 + bw) / m.step)) + 1, m.fields.shape[2])
    near = m.fields[0, g_rows, g_c0:g_c1].max(0) > m.thr_tissue - 4 * m.w_tissue
    if near.any():
        hit = np.flatnonzero(near) + g_c0
        sx0 = max(x0, int((hit[0] - 1) * m.step))
        sx1 = min(x0 + bw, int((hit[-1] + 1) * m.step) + 1)
        _render_tissue(m, y0, sx0, bh, sx1 - sx0, band_nuclei, grain[:, sx0 - x0 : sx1 - x0], ay,
                       od[:, :, sx0 - x0 : sx1 - x0])
        painted = True
    if m.pen is not None:
        pen_d = _pen_distance(m.pen, m.pen_width, y0, x0, bh, bw)
        if pen_d is not None:
            ink = m.pen_strength * np.clip((m.pen_width / 2 - pen_d) / 2 + 0.5, 0, 1)
            ink *= 1 + 0.15 * grain
            od += ink[None] * m.pen_od[:, None, None]
            painted = True
    rgb = np.empty((bh, bw, 3), np.uint8)
    for c in range(3):
        if painted:
            val = m.background[c] * np.exp(-od[c])
            val += 1.2 * grain  # sensor noise, on glass too
        else:
            val = m.background[c] + 1.2 * grain
        val += 0.5
        np.clip(val, 0, 255, out=val)
        rgb[..., c] = val
    return rgb


def _render_tissue(
    m: _Model, y0: int, x0: int, bh: int, bw: int, band_nuclei: np.ndarray, grain: np.ndarray,
    ay: _Axis, od: np.ndarray,
) -> None:
    """Add tissue optical density (3, bh, bw) for level-0 pixels [y0, y0+bh) x [x0, x0+bw) to `od`."""
    ax = _Axis(np.arange(x0, x0 + bw) + 0.5, m.step, m.fields.shape[2])
    f = _sample_grid(m.fields, ay, ax)
    alpha = np.clip((f[0] - m.thr_tissue) / m.w_tissue + 0.5, 0, 1)
    tum = np.clip((f[1] - m.thr_tumor) / m.w_tumor + 0.5, 0, 1) * alpha
    blur = f[2]
    sharp = 1.0 - blur
    ys = np.arange(y0, y0 + bh, dtype=np.float32)[:, None]
    xs = np.arange(x0, x0 + bw, dtype=np.float32)[None, :]
    fib = np.zeros((bh, bw), np.float32)
    wrap = _TEX - 1
    for j in range(3):
        sy, sx = m.fibre_shift[j]
        iy = (ys + sy * f[7 + j]).astype(np.int32) & wrap
        ix = (xs + sx * f[7 + j]).astype(np.int32) & wrap
        iy *= _TEX
        iy += ix
        fib += f[4 + j] * m.textures[j].ravel()[iy]
    # 0.5 = the texture's mean: blur and dense stroma both flatten it.
    fib = sharp * (f[10] * fib + (1 - f[10]) * 0.5) + blur * 0.5
    # Collagen: streaky eosin with pale clefts; tumor nests: more homogeneous cytoplasm.
    e_conc = (1 - tum) * (0.12 + 0.8 * fib) + tum * (0.30 + 0.2 * fib)
    e_conc *= alpha * f[3] * m.e_scale
    hn = np.zeros((bh, bw), np.float32)
    nuc = m.nuclei
    if len(band_nuclei):
        cx, ext = nuc["cx"][band_nuclei], nuc["ext"][band_nuclei]
        sel = band_nuclei[(cx + ext >= x0) & (cx - ext < x0 + bw)]
        if len(sel):
            _stamp_nuclei(hn, nuc, sel, y0, x0)
    hn *= 1 + 0.1 * grain * sharp  # granular chromatin
    h_conc = alpha * m.h_scale * ((1 - tum) * 0.05 + tum * 0.17 + hn * (1 - 0.3 * blur))
    noise = grain * (0.025 * alpha * (0.25 + 0.75 * sharp))
    for c in range(3):
        od[c] += h_conc * _OD_H[c] + e_conc * _OD_E[c] + noise


def _downsample(img: np.ndarray) -> np.ndarray:
    """4x4 box mean of (h, w, 3) uint8 -> (ceil(h/4), ceil(w/4), 3); edges replicate the last pixel."""
    h, w = img.shape[:2]
    ph, pw = (-h) % LEVEL_FACTOR, (-w) % LEVEL_FACTOR
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
    rows = img[0::4].astype(np.uint16)
    for k in range(1, LEVEL_FACTOR):
        rows += img[k::4]
    s = rows[:, 0::4]
    for k in range(1, LEVEL_FACTOR):
        s += rows[:, k::4]
    s += 8
    s //= 16
    return s.astype(np.uint8)


def _level0_tiles(m: _Model, tile: int, block_tiles: int, level1: np.ndarray) -> Iterator[np.ndarray]:
    """Level-0 tiles in row-major order; fills `level1` (4x downsampled) on the way."""
    nuc = m.nuclei
    cy = nuc["cy"]
    noise = np.random.default_rng([m.seed, 2]).standard_normal((2 * tile, 2 * tile * block_tiles), np.float32)
    for y0 in range(0, m.height, tile):
        lo = np.searchsorted(cy, y0 - m.ext_max - 1)
        hi = np.searchsorted(cy, y0 + tile + m.ext_max + 1)
        band = np.arange(lo, hi)
        if len(band):
            band = band[(cy[band] + nuc["ext"][band] >= y0) & (cy[band] - nuc["ext"][band] < y0 + tile)]
        for x0 in range(0, m.width, tile * block_tiles):
            bw = min(tile * block_tiles, -(-(m.width - x0) // tile) * tile)
            block = _render_block(m, y0, x0, tile, bw, band, noise)
            vh, vw = min(tile, m.height - y0), min(bw, m.width - x0)
            small = _downsample(block[:vh, :vw])
            ly, lx = y0 // LEVEL_FACTOR, x0 // LEVEL_FACTOR
            level1[ly : ly + small.shape[0], lx : lx + small.shape[1]] = small
            for tx in range(0, bw, tile):
                yield block[:, tx : tx + tile]


def _array_tiles(img: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    h, w = img.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = img[y : y + tile, x : x + tile]
            if t.shape[:2] != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
            yield t


def _field_map(m: _Model, index: int, ds: int, rows: slice | None = None) -> np.ndarray:
    """Field `index` sampled at the centres of ds x ds level-0 cells: (ceil(H/ds), ceil(W/ds))."""
    mh, mw = -(-m.height // ds), -(-m.width // ds)
    r = range(mh)[rows] if rows is not None else range(mh)
    ay = _Axis((np.arange(r.start, r.stop) + 0.5) * ds, m.step, m.fields.shape[1])
    ax = _Axis((np.arange(mw) + 0.5) * ds, m.step, m.fields.shape[2])
    return _sample_grid(m.fields[index : index + 1], ay, ax)[0]


def _mask(m: _Model, ds: int) -> tuple[np.ndarray, float, float]:
    """Tumor mask (uint8 0/255) on the mask grid, tumor/tissue fraction and tissue/area fraction."""
    mh, mw = -(-m.height // ds), -(-m.width // ds)
    mask = np.zeros((mh, mw), np.uint8)
    n_tissue = 0
    rows_per = max(1, 2_000_000 // mw)
    for r0 in range(0, mh, rows_per):
        rows = slice(r0, min(mh, r0 + rows_per))
        tissue = _field_map(m, 0, ds, rows) > m.thr_tissue
        n_tissue += int(tissue.sum())
        mask[rows] = np.where(tissue & (_field_map(m, 1, ds, rows) > m.thr_tumor), 255, 0)
    n_tumor = int(np.count_nonzero(mask))
    return mask, n_tumor / max(n_tissue, 1), n_tissue / (mh * mw)


def _aperio_description(
    width: int, height: int, w: int, h: int, tile: int, quality: int, mpp: float | None, slide_id: str
) -> str:
    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if (w, h) != (width, height):
        head += f" -> {w}x{h}"
    parts = [f"{head} JPEG/RGB Q={quality}"]
    if mpp is not None:
        parts += [f"AppMag = {max(1, round(10.0 / mpp))}", f"MPP = {mpp!r}"]
    parts += [
        "ScanScope ID = WSIMAMBA-SYNTH",
        f"Filename = {slide_id}",
        "Date = 01/01/25",
        "Time = 00:00:00",
        "User = wsimamba synth",
    ]
    return "|".join(parts)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise WsimambaError(msg)


def synth_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    seed: int,
    tumor_fraction: float = 0.0,
    mpp: float | None = 0.25,
    fmt: str | None = None,
    tile: int = 256,
    quality: int = 85,
    mask_path: str | os.PathLike | None = None,
    mask_downsample: int = 32,
    slide_id: str | None = None,
    case_id: str | None = None,
    block_tiles: int = 4,
) -> SynthSlide:
    """Write one synthetic H&E slide (and optionally its tumor mask PNG).

    Args:
        path: output file; written under a temporary name in the same folder, then renamed.
        width, height: level-0 size in pixels (>= 64).
        seed: everything (pixels, mask) is a function of the seed and the other arguments.
        tumor_fraction: tumor area / tissue area; 0 gives a negative slide with an empty mask.
        mpp: level-0 micrometres per pixel; None writes no resolution at all.
        fmt: "svs" or "tiff"; default from the file suffix (".tif"/".tiff" -> tiff, else svs).
        tile: tile edge in pixels, a multiple of 16 (JPEG 4:2:0 blocks).
        quality: JPEG quality 1-100.
        mask_path: where to write the mask PNG; None writes none (the mask is still returned).
        mask_downsample: level-0 pixels per mask pixel.
        block_tiles: tiles rendered per block (memory per block ~ 60 bytes x tile^2 x block_tiles).

    Returns:
        SynthSlide with `mask` (ceil(height/ds), ceil(width/ds)) uint8 0/255.
    """
    path = Path(path)
    if fmt is None:
        fmt = "tiff" if path.suffix.lower() in (".tif", ".tiff") else "svs"
    _check(fmt in FORMATS, f"unknown slide format {fmt!r} (expected one of {', '.join(FORMATS)})")
    _check(int(width) == width and width >= 64, f"slide width must be an integer >= 64, got {width!r}")
    _check(int(height) == height and height >= 64, f"slide height must be an integer >= 64, got {height!r}")
    _check(0.0 <= tumor_fraction <= 0.9, f"tumor_fraction must be in [0, 0.9], got {tumor_fraction!r}")
    _check(mpp is None or (math.isfinite(mpp) and mpp > 0), f"mpp must be positive or None, got {mpp!r}")
    _check(tile >= 16 and tile % 16 == 0, f"tile must be a positive multiple of 16, got {tile!r}")
    _check(1 <= quality <= 100, f"JPEG quality must be in 1..100, got {quality!r}")
    _check(int(mask_downsample) == mask_downsample and mask_downsample >= 1,
           f"mask_downsample must be an integer >= 1, got {mask_downsample!r}")
    _check(block_tiles >= 1, f"block_tiles must be >= 1, got {block_tiles!r}")
    width, height, mask_downsample = int(width), int(height), int(mask_downsample)
    mpp = float(mpp) if mpp is not None else None
    slide_id = slide_id or path.name.split(".")[0]
    case_id = case_id or slide_id

    m = _build_model(width, height, seed, tumor_fraction, mpp)
    mask, frac, tissue_frac = _mask(m, mask_downsample)
    if tumor_fraction > 0 and not mask.any():
        # The nodules exist but fall between mask samples (tiny slide, coarse mask): mark the
        # cell of the strongest tumor signal so that label 1 never comes with an empty mask.
        mh, mw = mask.shape
        tissue = _field_map(m, 0, mask_downsample) > m.thr_tissue
        score = np.where(tissue, _field_map(m, 1, mask_downsample), -np.inf)
        mask.flat[int(np.argmax(score))] = 255
        frac = 1.0 / max(1, int(tissue.sum()))

    dims = pyramid_dims(width, height, tile)
    with atomic_path(path) as tmp:
        _write_tiff(tmp, m, dims, fmt=fmt, tile=tile, quality=int(quality), mpp=mpp,
                    slide_id=slide_id, block_tiles=int(block_tiles))

    if mask_path is not None:
        _write_mask(Path(mask_path), mask, mask_downsample, slide_id, width, height, frac)
    return SynthSlide(
        slide_id=slide_id,
        case_id=case_id,
        label=int(tumor_fraction > 0),
        path=path,
        mask_path=Path(mask_path) if mask_path is not None else None,
        width=width,
        height=height,
        mpp=mpp,
        mask_downsample=mask_downsample,
        tumor_fraction=frac,
        fmt=fmt,
        tissue_fraction=tissue_frac,
        level_dimensions=tuple(dims),
        mask=mask,
    )


def _write_tiff(
    path: Path, m: _Model, dims: list[tuple[int, int]], *, fmt: str, tile: int, quality: int,
    mpp: float | None, slide_id: str, block_tiles: int,
) -> None:
    """Stream level 0 tile by tile, then the lower levels (and the SVS thumbnail) from level 1."""
    width, height = dims[0]
    # Level 1 (1/16 of level 0) is the only image held whole; single-level slides keep it for
    # the thumbnail.
    level1 = np.zeros((-(-height // LEVEL_FACTOR), -(-width // LEVEL_FACTOR), 3), np.uint8)
    # Classic TIFF has 32-bit offsets; JPEG at q<=95 stays far below raw size, so raw/2 is safe.
    bigtiff = width * height * 3 // 2 > 2**32 - 2**28
    common = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        metadata=None,
        software="wsimamba synth",
    )

    def resolution(downsample: int) -> dict:
        if fmt == "tiff" and mpp is not None:
            per_cm = 1e4 / (mpp * downsample)
            return dict(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        return dict(resolution=(1, 1), resolutionunit="NONE")

    def description(w: int, h: int) -> str:
        if fmt == "svs":
            return _aperio_description(width, height, w, h, tile, quality, mpp, slide_id)
        level = f" {w}x{h}" if (w, h) != (width, height) else ""
        return f"wsimamba synthetic slide {slide_id}{level}"

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        tw.write(
            _level0_tiles(m, tile, block_tiles, level1),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            description=description(width, height),
            subfiletype=0,
            **resolution(1),
            **common,
        )
        levels = [level1] if len(dims) > 1 else []
        for _ in dims[2:]:
            levels.append(_downsample(levels[-1]))
        if fmt == "svs":
            small = levels[-1] if levels else level1
            scale = min(1.0, THUMBNAIL_MAX / max(small.shape[:2]))
            if scale < 1.0:
                size = (max(1, round(small.shape[1] * scale)), max(1, round(small.shape[0] * scale)))
                small = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BOX))
            tw.write(  # stripped, not tiled: that is how OpenSlide tells the thumbnail from a level
                small,
                description=description(small.shape[1], small.shape[0]),
                subfiletype=0,
                rowsperstrip=16,
                **resolution(1),
                **common,
            )
        for k, lvl in enumerate(levels, start=1):
            tw.write(
                _array_tiles(lvl, tile),
                shape=lvl.shape,
                dtype=np.uint8,
                tile=(tile, tile),
                description=description(lvl.shape[1], lvl.shape[0]),
                # OpenSlide's generic-tiff backend takes only reduced-resolution IFDs as levels.
                subfiletype=1 if fmt == "tiff" else 0,
                **resolution(LEVEL_FACTOR**k),
                **common,
            )


def _write_mask(
    path: Path, mask: np.ndarray, ds: int, slide_id: str, width: int, height: int, frac: float
) -> None:
    """Mask PNG (8-bit grey) with the mask grid recorded in text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("mask_downsample", str(ds))
    info.add_text("slide_id", slide_id)
    info.add_text("level0_width", str(width))
    info.add_text("level0_height", str(height))
    info.add_text("tumor_fraction_of_tissue", f"{frac:.6f}")
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", pnginfo=info, optimize=False)
    _write_atomic(path, buf.getvalue())


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ----------------------------------------------------------------------------------------------
# cohorts


def _plan_cohort(
    n: int, seed: int, size: tuple[int, int], tumor_fraction: tuple[float, float], size_jitter: float
) -> list[dict]:
    """Per-slide id, case, label, size, tumor fraction and seed; deterministic in (n, seed, ...)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0407]))
    n_pos = n // 2 + (int(rng.random() < 0.5) if n % 2 else 0)
    labels = np.zeros(n, np.int64)
    labels[rng.permutation(n)[:n_pos]] = 1
    # Cases: consecutive slide pairs share a patient in about one case in six (at least one when
    # n >= 3, never all so that a case-level split stays possible).
    n_pairs = 0 if n < 3 else max(1, n // 6)
    starts = np.sort(rng.choice(np.arange(0, n - 1, 2), size=n_pairs, replace=False)) if n_pairs else []
    paired = set(int(s) for s in starts)
    digits = max(3, len(str(n - 1)))
    plan = []
    case = 0
    i = 0
    while i < n:
        members = [i, i + 1] if i in paired else [i]
        for j in members:
            lo, hi = 1 - size_jitter, 1 + size_jitter
            w = max(64, int(round(size[0] * rng.uniform(lo, hi) / 16)) * 16) if size_jitter else size[0]
            h = max(64, int(round(size[1] * rng.uniform(lo, hi) / 16)) * 16) if size_jitter else size[1]
            frac = float(rng.uniform(*tumor_fraction)) if labels[j] else 0.0
            plan.append(
                dict(
                    slide_id=f"synth_{j:0{digits}d}",
                    case_id=f"case_{case:0{digits}d}",
                    label=int(labels[j]),
                    width=w,
                    height=h,
                    tumor_fraction=frac,
                    seed=int(np.random.SeedSequence([seed, j]).generate_state(1)[0]),
                )
            )
        case += 1
        i += len(members)
    return plan


def synth_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 8,
    *,
    seed: int = 0,
    size: tuple[int, int] = (8192, 8192),
    tumor_fraction: tuple[float, float] = (0.02, 0.10),
    fmt: str = "svs",
    mpp: float | None = 0.25,
    mask_downsample: int = 32,
    size_jitter: float = 0.1,
    tile: int = 256,
    quality: int = 85,
    progress: Callable[[int, int], None] | None = None,
) -> list[SynthSlide]:
    """Write a synthetic cohort to `out_dir`; existing files of the same names are replaced.

    Layout: `slides/<slide_id>.<fmt>`, `masks/<slide_id>.png`, `labels.csv`
    (`slide_id,case_id,label`, label 1 = tumor, 0 = normal) and `cohort.json` (arguments and one
    record per slide: id, case_id, label, width, height, mpp, mask_downsample,
    tumor_fraction_of_tissue, format, paths relative to out_dir).

    Labels are per slide: floor or ceil of n/2 slides are positive (with n >= 2 at least one of
    each), drawn from the seed. Some cases hold two slides (a patient with two lymph nodes); their
    labels are drawn independently, so a case may mix a positive and a negative slide, as in
    Camelyon17. Each positive slide's tumor fraction of tissue is uniform in `tumor_fraction`.
    Width and height vary by up to +-`size_jitter` (rounded to 16 px) so that slides differ;
    pass 0 for exactly `size`. `progress(done, total)` is called after each slide.
    """
    _check(int(n_slides) == n_slides and n_slides >= 1, f"n_slides must be an integer >= 1, got {n_slides!r}")
    _check(fmt in FORMATS, f"unknown slide format {fmt!r} (expected one of {', '.join(FORMATS)})")
    _check(
        len(size) == 2 and all(int(s) == s and s >= 64 for s in size),
        f"size must be two integers >= 64, got {size!r}",
    )
    lo, hi = tumor_fraction
    _check(
        0 < lo <= hi <= 0.9,
        f"tumor_fraction range must satisfy 0 < LO <= HI <= 0.9, got {tuple(tumor_fraction)!r}",
    )
    _check(0 <= size_jitter < 0.5, f"size_jitter must be in [0, 0.5), got {size_jitter!r}")
    out = Path(out_dir)
    plan = _plan_cohort(int(n_slides), seed, (int(size[0]), int(size[1])), (lo, hi), size_jitter)
    slides = []
    for k, p in enumerate(plan):
        s = synth_slide(
            out / "slides" / f"{p['slide_id']}.{fmt}",
            p["width"],
            p["height"],
            seed=p["seed"],
            tumor_fraction=p["tumor_fraction"],
            mpp=mpp,
            fmt=fmt,
            tile=tile,
            quality=quality,
            mask_path=out / "masks" / f"{p['slide_id']}.png",
            mask_downsample=mask_downsample,
            slide_id=p["slide_id"],
            case_id=p["case_id"],
        )
        slides.append(s)
        if progress is not None:
            progress(k + 1, len(plan))

    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["slide_id", "case_id", "label"])
    for s in slides:
        wr.writerow([s.slide_id, s.case_id, s.label])
    _write_atomic(out / "labels.csv", buf.getvalue().encode())
    meta = {
        "generator": "wsimamba.slide.synth",
        "seed": seed,
        "n_slides": int(n_slides),
        "size": [int(size[0]), int(size[1])],
        "size_jitter": size_jitter,
        "tumor_fraction": [lo, hi],
        "format": fmt,
        "mpp": mpp,
        "mask_downsample": mask_downsample,
        "tile": tile,
        "quality": quality,
        "slides": [s.record(out) for s in slides],
    }
    _write_atomic(out / "cohort.json", (json.dumps(meta, indent=2) + "\n").encode())
    return slides
