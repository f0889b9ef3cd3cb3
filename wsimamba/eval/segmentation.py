"""Segmentation metrics (Dice, IoU, HD95 per class) and overlay pictures of predictions.

Dice and IoU come from torchmetrics (`DiceScore`, `MulticlassJaccardIndex`), accumulated over all pixels of the
evaluated images (global aggregation: tiles without a class do not count as failures). torchmetrics
has the Hausdorff distance but not its 95th percentile, so :func:`hd95` computes it from scipy
distance transforms, as MONAI's ``compute_hausdorff_distance(percentile=95)`` defines it: the surface
of a mask is its pixels that touch the background (face connectivity, the array border counting as
background); HD95 is the larger of the two directed 95th percentiles of surface-to-surface distances.
It is 0 when both masks are empty and undefined (NaN) when exactly one is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from wsimamba.atomic import atomic_path

# class colours of overlays (class 1 first); background is not painted
PALETTE = np.array([(255, 40, 40), (40, 120, 255), (40, 200, 60), (255, 170, 0), (200, 60, 255), (0, 210, 210)],
                   np.float32)
CONTOUR = np.array((255, 255, 0), np.float32)  # ground truth outlines


# ---------------------------------------------------------------------------------------------
# metrics


def surface(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean mask that touch the background along an axis (or the array border)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None,
         percentile: float = 95.0) -> float:
    """The `percentile` Hausdorff distance between two boolean masks of one shape (2D or 3D), in units
    of `spacing` (default: pixels). 0 when both are empty, NaN when one is."""
    from scipy import ndimage

    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"hd95: shapes differ: {pred.shape} vs {target.shape}")
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float("nan")
    sp, st = surface(pred), surface(target)
    to_target = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(max(np.percentile(to_target, percentile), np.percentile(to_pred, percentile)))


class SegmentationMetrics:
    """Accumulates per-class Dice and IoU (torchmetrics, global over pixels) and per-image HD95.

    update(pred, target): class indices (B, *S) each. compute() → dict with per-class values and the
    mean over foreground classes (classes 1..C-1), NaN where a class is absent from both.
    """

    def __init__(self, num_classes: int, hd95: bool = True, spacing: Sequence[float] | None = None):
        from torchmetrics.classification import MulticlassJaccardIndex
        from torchmetrics.segmentation import DiceScore

        self.num_classes, self.with_hd95, self.spacing = num_classes, hd95, spacing
        self.dice = DiceScore(num_classes=num_classes, include_background=True, average="none",
                              aggregation_level="global", input_format="index")
        # torchmetrics' MeanIoU averages per-image scores; the Jaccard index over all pixels matches the Dice above
        self.iou = MulticlassJaccardIndex(num_classes=num_classes, average="none", zero_division=float("nan"))
        self.hd: list[list[float]] = []  # per image, per class
        self.pixels = torch.zeros(num_classes, dtype=torch.float64)  # ground-truth pixels per class
        self.total = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> list[dict]:
        """Add a batch; returns per-image {dice: [...], hd95: [...]} (per class) for a per-image table."""
        from torchmetrics.functional.segmentation import dice_score

        pred, target = pred.long().cpu(), target.long().cpu()
        self.dice.update(pred, target)
        self.iou.update(pred.flatten(), target.flatten())
        self.pixels += torch.bincount(target.flatten(), minlength=self.num_classes).double()
        self.total += target.numel()
        rows = []
        for p, t in zip(pred, target):
            with np.errstate(all="ignore"):
                d = dice_score(p[None], t[None], num_classes=self.num_classes, include_background=True,
                               average="none", input_format="index")[0]
            pn, tn = p.numpy(), t.numpy()
            h = [hd95(pn == c, tn == c, self.spacing) for c in range(self.num_classes)] if self.with_hd95 else []
            self.hd.append(h)
            rows.append({"dice": [float(v) for v in d], "hd95": h})
        return rows

    def compute(self, classes: Sequence[str]) -> dict:
        dice = self.dice.compute().double().numpy()
        iou = self.iou.compute().double().numpy()
        hd = np.array(self.hd, np.float64).reshape(len(self.hd), -1) if self.with_hd95 else None
        with np.errstate(all="ignore"):
            hd_mean = np.nanmean(hd, 0) if hd is not None and len(hd) else None
        share = self.pixels.numpy() / max(self.total, 1)
        per_class = {}
        for c, name in enumerate(classes):
            per_class[name] = {
                "dice": _num(dice[c]), "iou": _num(iou[c]),
                "hd95": _num(hd_mean[c]) if hd_mean is not None else None,
                "hd95_images": int(np.isfinite(hd[:, c]).sum()) if hd is not None else None,
                "pixel_share": float(share[c]),
                # Dice of the best constant prediction (every pixel this class): 2·n_c / (n_c + N)
                "constant_dice": float(2 * share[c] / (share[c] + 1)),
            }
        fg = list(classes)[1:]

        def mean(key):
            vals = [per_class[c][key] for c in fg if per_class[c][key] is not None]
            return float(np.mean(vals)) if vals else None

        return {"per_class": per_class, "mean_dice": mean("dice"), "mean_iou": mean("iou"),
                "mean_hd95": mean("hd95"), "images": len(self.hd)}


def _num(v) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else v


# ---------------------------------------------------------------------------------------------
# overlays


def display_rgb(image: np.ndarray) -> np.ndarray:
    """A raw 2D image (C, H, W) as viewable uint8 RGB (H, W, 3): 8-bit RGB as is, else per-image
    min-max of the first channel(s)."""
    img = np.asarray(image)
    if img.dtype == np.uint8 and img.shape[0] == 3:
        return np.ascontiguousarray(np.moveaxis(img, 0, -1))
    img = img[:3] if img.shape[0] >= 3 else img[:1]
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, 0.5), np.percentile(img, 99.5)
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    img = np.moveaxis((img * 255).round().astype(np.uint8), 0, -1)
    return np.repeat(img, 3, -1) if img.shape[-1] == 1 else img


def overlay(rgb: np.ndarray, pred: np.ndarray | None = None, target: np.ndarray | None = None,
            alpha: float = 0.4, contour_width: int = 1) -> np.ndarray:
    """uint8 RGB (H, W, 3): `pred` classes ≥ 1 tinted in PALETTE colours, `target` class outlines in yellow."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    out = rgb.astype(np.float32).copy()
    if pred is not None:
        for c in np.unique(pred):
            if c == 0:
                continue
            m = pred == c
            out[m] = (1 - alpha) * out[m] + alpha * PALETTE[(int(c) - 1) % len(PALETTE)]
    if target is not None and np.any(target):
        edge = find_boundaries(target, mode="inner")
        if contour_width > 1:
            edge = ndimage.binary_dilation(edge, iterations=contour_width - 1)
        out[edge] = CONTOUR
    return out.round().clip(0, 255).astype(np.uint8)


def pick_slice(target: np.ndarray, pred: np.ndarray) -> int:
    """The index along the first axis of a volume with the most foreground (ground truth, else prediction)."""
    fg = (target > 0).reshape(target.shape[0], -1).sum(1)
    if not fg.any():
        fg = (pred > 0).reshape(pred.shape[0], -1).sum(1)
    return int(np.argmax(fg)) if fg.any() else target.shape[0] // 2


def write_overlay_png(path: str | Path, image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                      min_side: int = 256) -> Path:
    """Two panels side by side — the image, and the image with the prediction tinted and the ground
    truth outlined — as a PNG written atomically. image (C, *S) raw; target, pred (*S) class indices;
    a volume is shown at its slice with the most foreground. Small images are enlarged (nearest)."""
    from PIL import Image

    image, target, pred = np.asarray(image), np.asarray(target), np.asarray(pred)
    if target.ndim == 3:
        k = pick_slice(target, pred)
        image, target, pred = image[:, k], target[k], pred[k]
    rgb = display_rgb(image)
    scale = max(1, int(np.ceil(min_side / max(1, min(rgb.shape[:2])))))
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, 0), scale, 1)
        target = np.repeat(np.repeat(target, scale, 0), scale, 1)
        pred = np.repeat(np.repeat(pred, scale, 0), scale, 1)
    right = overlay(rgb, pred, target, contour_width=max(1, scale // 2 + 1))
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    panel = np.concatenate([rgb, gap, right], 1)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(panel).save(tmp, format="PNG")
    return path
