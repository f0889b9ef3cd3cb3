"""Run a trained segmenter over a slide's tiles and stitch the predicted mask over the slide thumbnail
(`wsimamba segment RUN_DIR --slide S.svs`).

The tiles are cut as `wsimamba tiles` cut the training data: the µm/px and tile size of the run's
``data.root/tiles.json`` (or given), on detected tissue. Each tile's class probabilities are resized to
the tile's footprint on the thumbnail and averaged where tiles meet; a pixel's class is the argmax
(background where no tile lies). Outputs, in ``out_dir``::

    <slide_id>_mask.png      the predicted class map at thumbnail size (binary: 0/255 tumour)
    <slide_id>_overlay.png   the thumbnail with the prediction tinted (and a ground-truth mask outlined)
    <slide_id>.json          tiles, µm/px, sizes, tumour share, and Dice / IoU against the ground truth
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from wsimamba.atomic import atomic_path, write_text_atomic
from wsimamba.errors import WsimambaError


@dataclass
class StitchResult:
    slide_id: str
    overlay_png: Path
    mask_png: Path
    json_path: Path
    info: dict


def _run_settings(run_dir: Path) -> tuple[dict, dict | None]:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise WsimambaError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    if cfg.get("task") != "segment":
        raise WsimambaError(f"{run_dir}: not a segmentation run (task: {cfg.get('task', 'mil')})")
    tiles = None
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        tiles = json.loads(metrics.read_text()).get("tiles")
    if tiles is None:
        tj = Path(cfg["data"]["root"]) / "tiles.json"
        if tj.is_file():
            tiles = json.loads(tj.read_text())
    return cfg, tiles


def _default_mask(slide_path: Path) -> Path | None:
    cand = slide_path.parent.parent / "masks" / f"{slide_path.stem}.png"
    return cand if cand.is_file() else None


@torch.no_grad()
def segment_slide(run_dir: str | Path, slide_path: str | Path, out_dir: str | Path | None = None,
                  mask: str | Path | None = None, thumb_size: int = 1024, device: str = "auto", batch_size: int = 16,
                  mpp: float | None = None, size: int | None = None, min_tissue: float = 0.1,
                  mpp_override: float | None = None) -> StitchResult:
    """Predict `slide_path` tile by tile with the run's checkpoint and write the stitched mask and overlay
    (module docstring). `mask`: a ground-truth mask PNG (default: ``masks/<slide_id>.png`` beside the
    slides folder, when it exists)."""
    from wsimamba.data.segmentation import normalize, to_float
    from wsimamba.features.extract import pick_device
    from wsimamba.eval.segmentation import overlay
    from wsimamba.slide.reader import open_slide
    from wsimamba.slide.segtiles import load_slide_mask
    from wsimamba.slide.tiling import make_grid
    from wsimamba.slide.tissue import detect_tissue
    from wsimamba.train.segment import load_segment_module

    run_dir, slide_path = Path(run_dir), Path(slide_path)
    cfg, tiles = _run_settings(run_dir)
    mpp = mpp if mpp is not None else (tiles or {}).get("mpp")
    size = size if size is not None else (tiles or {}).get("size")
    if mpp is None or size is None:
        raise WsimambaError(f"{run_dir}: the run's data has no tiles.json (not cut by `wsimamba tiles`); "
                            "give --mpp and --size")
    if cfg["data"].get("spatial_dims", 2) != 2:
        raise WsimambaError(f"{run_dir}: a 3D segmenter cannot segment slides")
    device = pick_device(device)  # "auto": the GPU when there is one; a bad name is a one-line error
    module = load_segment_module(run_dir / "checkpoint.ckpt").to(device)
    n_classes = int(module.hparams.num_classes)
    norm = cfg["data"].get("normalize", "auto")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "segmentations"
    with open_slide(slide_path, mpp_override) as slide:
        sid = slide.slide_id
        w0, h0 = slide.dimensions
        ds = max(1.0, max(w0, h0) / thumb_size)
        thumb = slide.thumbnail(ds)
        th, tw = thumb.shape[:2]
        sx, sy = w0 / tw, h0 / th
        grid = make_grid(slide, detect_tissue(slide), mpp, size, 0, min_tissue)
        s0 = grid.patch_size_level0
        probs = torch.zeros(n_classes, th, tw)
        count = torch.zeros(th, tw)
        coords = grid.coords
        for start in range(0, len(coords), batch_size):
            chunk = coords[start:start + batch_size]
            xs = []
            for x, y in chunk:
                t, u8 = to_float(np.moveaxis(slide.read_at((int(x), int(y)), s0, size), -1, 0))
                xs.append(normalize(t, norm, u8))
            p = module(torch.stack(xs).to(device)).float().softmax(1).cpu()
            for (x, y), pi in zip(chunk, p):
                x0, x1 = int(round(x / sx)), min(tw, int(round((x + s0) / sx)))
                y0, y1 = int(round(y / sy)), min(th, int(round((y + s0) / sy)))
                if x1 <= x0 or y1 <= y0:
                    continue
                probs[:, y0:y1, x0:x1] += F.interpolate(pi[None], size=(y1 - y0, x1 - x0), mode="area")[0]
                count[y0:y1, x0:x1] += 1
        covered = count > 0
        pred = torch.where(covered, (probs / count.clamp_min(1)).argmax(0), 0).numpy().astype(np.uint8)
        gt = None
        mask = Path(mask) if mask is not None else _default_mask(slide_path)
        if mask is not None:
            sm = load_slide_mask(mask, slide)
            cols = np.clip(((np.arange(tw) + 0.5) * sx / sm.scale_x).astype(np.int64), 0, sm.array.shape[1] - 1)
            rows = np.clip(((np.arange(th) + 0.5) * sy / sm.scale_y).astype(np.int64), 0, sm.array.shape[0] - 1)
            gt = sm.array[np.ix_(rows, cols)]
            gt = (gt > 0).astype(np.uint8) if n_classes == 2 else gt.astype(np.uint8)
    scale = 255 // max(1, n_classes - 1)
    mask_png, overlay_png, json_path = out_dir / f"{sid}_mask.png", out_dir / f"{sid}_overlay.png", out_dir / f"{sid}.json"
    with atomic_path(mask_png) as tmp:
        Image.fromarray((pred * scale).astype(np.uint8)).save(tmp, format="PNG")
    with atomic_path(overlay_png) as tmp:
        Image.fromarray(overlay(thumb, pred, gt, alpha=0.45, contour_width=2)).save(tmp, format="PNG")
    info = {"slide": str(slide_path), "run_dir": str(run_dir), "tiles": int(len(coords)), "mpp": mpp, "size": size,
            "thumbnail": [tw, th], "downsample": ds, "predicted_share": {
                str(c): float((pred == c).mean()) for c in range(n_classes)},
            "mask": str(mask) if mask is not None else None}
    if gt is not None:
        for c in range(1, n_classes):
            p, g = pred == c, gt == c
            inter, union, total = np.logical_and(p, g).sum(), np.logical_or(p, g).sum(), p.sum() + g.sum()
            info.setdefault("dice", {})[str(c)] = float(2 * inter / total) if total else None
            info.setdefault("iou", {})[str(c)] = float(inter / union) if union else None
    write_text_atomic(json_path, json.dumps(info, indent=2) + "\n")
    return StitchResult(sid, overlay_png, mask_png, json_path, info)
