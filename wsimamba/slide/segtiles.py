"""Image/mask tile pairs for segmentation, cut from slides and their tumour masks (`wsimamba tiles`).

For every slide: find tissue (wsimamba.slide.tissue), lay the patch grid at the target µm/px
(wsimamba.slide.tiling.make_grid), read each tile from the best pyramid level and sample the slide's
mask (``MASKS/<slide_id>.png``, any size) at the tile's pixel centres (nearest), so image and mask
cover the same level-0 area. The mask's downsample (level-0 pixels per mask pixel) comes from the
PNG's ``mask_downsample`` text chunk or the cohort.json that `wsimamba synth` writes, else from the
mask size against the slide size.

Output (``OUT/``)::

    images/<slide>_<x>_<y>.png   RGB tiles (x, y: top-left in level-0 pixels)
    masks/<slide>_<x>_<y>.png    class values (binary masks 0/255, as the slide masks)
    index.csv                    image,mask,slide,case_id,x,y,tumor_fraction,tissue_fraction,split
    tiles.json                   the arguments, per-slide counts and the slides of every split

Splits are by case (``case_id`` of labels.csv beside the slides folder, else the slide), so held-out
tiles come from other slides than training tiles; tumour-bearing and tumour-free cases are dealt
alternately into test and val so both held-out parts see tumour. With ``max_per_slide``, up to
``tumor_share`` of a slide's tiles are drawn from tiles with tumour and the rest from the others
(seeded). Files appear under their final names only when complete; a rerun skips tiles that exist.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from wsimamba.atomic import atomic_path, write_text_atomic
from wsimamba.errors import SlideError
from wsimamba.slide.reader import Slide, find_slides, open_slide, slide_id_of
from wsimamba.slide.tiling import make_grid
from wsimamba.slide.tissue import TissueParams, detect_tissue


@dataclass
class SlideMask:
    """A slide's mask: `array` (mh, mw) and level-0 pixels per mask pixel along x and y."""

    array: np.ndarray
    scale_x: float
    scale_y: float
    source: str  # where the scale came from


@dataclass
class TilesResult:
    out: Path
    rows: list[dict] = field(default_factory=list)
    per_slide: dict[str, int] = field(default_factory=dict)
    splits: dict[str, list[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"train": 0, "val": 0, "test": 0}
        for r in self.rows:
            out[r["split"]] += 1
        return out


def _cohort_downsamples(*folders: Path) -> dict[str, int]:
    """slide_id → mask_downsample from a synth cohort.json in any of `folders`."""
    for folder in folders:
        path = folder / "cohort.json"
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except ValueError:
                continue
            out = {}
            for rec in meta.get("slides", []):
                if rec.get("slide_id") and rec.get("mask_downsample"):
                    out[rec["slide_id"]] = int(rec["mask_downsample"])
            if not out and meta.get("mask_downsample"):
                return {"*": int(meta["mask_downsample"])}
            return out
    return {}


def load_slide_mask(path: Path, slide: Slide, downsample: int | float | None = None,
                    cohort: dict[str, int] | None = None) -> SlideMask:
    """The tumour mask of `slide` with its scale (module docstring for where the scale comes from)."""
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I", "1") else im)
    except FileNotFoundError:
        raise SlideError(f"{slide.path}: no tumour mask {path}") from None
    except Exception as e:  # noqa: BLE001
        raise SlideError(f"{path}: cannot read the tumour mask ({e})") from None
    w0, h0 = slide.dimensions
    mh, mw = arr.shape[:2]
    cohort = cohort or {}
    source = "argument"
    if downsample is None and text.get("mask_downsample"):
        downsample, source = float(text["mask_downsample"]), "png text"
    if downsample is None and (slide.slide_id in cohort or "*" in cohort):
        downsample, source = cohort.get(slide.slide_id, cohort.get("*")), "cohort.json"
    if downsample is None:
        ds = round(w0 / mw)
        if ds >= 1 and math.ceil(w0 / ds) == mw and math.ceil(h0 / ds) == mh:
            return SlideMask(arr, float(ds), float(ds), "inferred (integer)")
        return SlideMask(arr, w0 / mw, h0 / mh, "inferred (size ratio)")
    ds = float(downsample)
    if not (abs(math.ceil(w0 / ds) - mw) <= 1 and abs(math.ceil(h0 / ds) - mh) <= 1):
        raise SlideError(f"{path}: a {mw}×{mh} mask does not fit slide {slide.slide_id} ({w0}×{h0}) at downsample "
                         f"{ds:g} ({source})")
    return SlideMask(arr, ds, ds, source)


def mask_tile(mask: SlideMask, x: int, y: int, size0: int, size: int) -> np.ndarray:
    """The mask under a tile of `size0` level-0 pixels at (x, y), sampled at the centres of its
    `size` × `size` pixels (nearest mask pixel). Same dtype as the mask."""
    mh, mw = mask.array.shape[:2]
    centres = (np.arange(size) + 0.5) * (size0 / size)
    cols = np.clip(np.floor((x + centres) / mask.scale_x).astype(np.int64), 0, mw - 1)
    rows = np.clip(np.floor((y + centres) / mask.scale_y).astype(np.int64), 0, mh - 1)
    return mask.array[np.ix_(rows, cols)]


def _cases(slides_dir: Path) -> dict[str, str]:
    """slide_id → case_id from labels.csv beside (or in) the slides folder, if any."""
    for path in (slides_dir.parent / "labels.csv", slides_dir / "labels.csv"):
        if path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and "slide_id" in rows[0] and "case_id" in rows[0]:
                return {r["slide_id"]: r["case_id"] for r in rows}
    return {}


def split_groups(has_tumor: dict[str, bool], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """group → train / val / test. round(fraction · groups) groups per held-out part (at least one when
    the fraction is > 0), dealt alternately from tumour and tumour-free groups, keeping at least one
    of each kind for training."""
    rng = np.random.default_rng(seed)
    names = sorted(has_tumor)
    pos = [names[i] for i in rng.permutation(len(names)) if has_tumor[names[i]]]
    neg = [names[i] for i in rng.permutation(len(names)) if not has_tumor[names[i]]]
    part_of = {}
    for part, f in (("test", test_fraction), ("val", val_fraction)):
        if f <= 0:
            continue
        k = max(1, int(round(f * len(names))))
        for j in range(k):
            prefer, other = (pos, neg) if j % 2 == 0 else (neg, pos)
            src = prefer if len(prefer) > 1 else other if len(other) > 1 else None
            if src is None:
                break
            part_of[src.pop()] = part
    for g in names:
        part_of.setdefault(g, "train")
    return part_of


def _choose(tumor: np.ndarray, limit: int | None, tumor_share: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the tiles to keep (sorted): all, or `limit` with up to tumor_share from tumour tiles."""
    n = tumor.size
    if limit is None or n <= limit:
        return np.arange(n)
    t_idx, o_idx = np.flatnonzero(tumor > 0), np.flatnonzero(tumor <= 0)
    k_t = min(t_idx.size, int(round(limit * tumor_share)))
    k_o = min(o_idx.size, limit - k_t)
    k_t = min(t_idx.size, limit - k_o)  # fill with tumour tiles when there are too few others
    keep = np.concatenate([rng.choice(t_idx, k_t, replace=False), rng.choice(o_idx, k_o, replace=False)])
    return np.sort(keep)


def _save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def cut_tiles(slides_dir: str | Path, masks_dir: str | Path, out: str | Path, mpp: float = 1.0, size: int = 256,
              min_tissue: float = 0.5, max_per_slide: int | None = None, tumor_share: float = 0.5,
              val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0,
              mask_downsample: float | None = None, mpp_override: float | None = None,
              tissue: TissueParams = TissueParams(),
              progress: Callable[[int, int], None] | None = None) -> TilesResult:
    """Cut image/mask tile pairs from every slide of `slides_dir` (module docstring); returns the rows of
    index.csv. Every slide needs ``masks_dir/<slide_id>.png``: a missing one is a SlideError naming it,
    raised before anything is cut."""
    slides_dir, masks_dir, out = Path(slides_dir), Path(masks_dir), Path(out)
    if not 0 <= tumor_share <= 1:
        raise SlideError(f"--tumor-share must be in [0, 1], got {tumor_share}")
    if max_per_slide is not None and max_per_slide < 1:
        raise SlideError(f"--max-per-slide must be ≥ 1, got {max_per_slide}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise SlideError("--val-fraction and --test-fraction must be ≥ 0 and sum to less than 1")
    if not masks_dir.is_dir():
        raise SlideError(f"{masks_dir}: no such mask folder")
    paths = find_slides(slides_dir)
    if not paths:
        raise SlideError(f"{slides_dir}: no slide files in it")
    for p in paths:
        m = masks_dir / f"{slide_id_of(p)}.png"
        if not m.is_file():
            raise SlideError(f"slide {p.name} has no tumour mask: {m} not found")
    cohort = _cohort_downsamples(masks_dir.parent, slides_dir.parent, masks_dir)
    cases = _cases(slides_dir)
    result = TilesResult(out)
    rows: list[dict] = []
    per_slide_info = {}
    for k, path in enumerate(paths):
        sid = slide_id_of(path)
        with open_slide(path, mpp_override) as slide:
            mask = load_slide_mask(masks_dir / f"{sid}.png", slide, mask_downsample, cohort)
            grid = make_grid(slide, detect_tissue(slide, tissue), mpp, size, 0, min_tissue)
            s0 = grid.patch_size_level0
            tumor = np.array([float(np.mean(mask_tile(mask, x, y, s0, size) > 0)) for x, y in grid.coords])
            keep = _choose(tumor, max_per_slide, tumor_share, np.random.default_rng([seed, k]))
            for i in keep:
                x, y = (int(v) for v in grid.coords[i])
                name = f"{sid}_{x}_{y}.png"
                ipath, mpath = out / "images" / name, out / "masks" / name
                if not (ipath.is_file() and mpath.is_file()):
                    tile = mask_tile(mask, x, y, s0, size)
                    _save_png(ipath, slide.read_at((x, y), s0, size))
                    _save_png(mpath, tile)
                rows.append({"image": f"images/{name}", "mask": f"masks/{name}", "slide": sid,
                             "case_id": cases.get(sid, sid), "x": x, "y": y,
                             "tumor_fraction": round(float(tumor[i]), 6), "tissue_fraction": round(float(grid.tissue[i]), 6)})
            result.per_slide[sid] = int(keep.size)
            per_slide_info[sid] = {"tiles": int(keep.size), "grid": len(grid), "tumor_tiles": int((tumor[keep] > 0).sum()),
                                   "size_level0": s0, "level": grid.patch_level, "mask_scale": [mask.scale_x, mask.scale_y],
                                   "mask_scale_source": mask.source}
        if progress is not None:
            progress(k + 1, len(paths))
    if not rows:
        raise SlideError(f"{slides_dir}: no tile had at least {min_tissue:g} tissue at {mpp:g} µm/px and {size} px")
    has_tumor: dict[str, bool] = {}
    for r in rows:
        has_tumor[r["case_id"]] = has_tumor.get(r["case_id"], False) or r["tumor_fraction"] > 0
    part_of = split_groups(has_tumor, val_fraction, test_fraction, seed)
    for r in rows:
        r["split"] = part_of[r["case_id"]]
    result.rows = rows
    result.splits = {p: sorted({r["slide"] for r in rows if r["split"] == p}) for p in ("train", "val", "test")}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "index.csv", buf.getvalue())
    meta = {"mpp": mpp, "size": size, "min_tissue": min_tissue, "max_per_slide": max_per_slide,
            "tumor_share": tumor_share, "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
            "slides_dir": str(slides_dir.resolve()), "masks_dir": str(masks_dir.resolve()),
            "counts": result.counts(), "splits": result.splits, "slides": per_slide_info}
    write_text_atomic(out / "tiles.json", json.dumps(meta, indent=2) + "\n")
    return result
