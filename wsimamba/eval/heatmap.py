"""Attention heatmaps over slide thumbnails, and how well attention finds the tumor when a mask exists.

The model of one fold scores every patch of the slide's feature file (``MILOutput.attention``);
each patch's rectangle (from the stored level-0 coordinates and patch size) is painted on the
thumbnail with its score's percentile rank, so heatmaps of different slides and models share a scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsimamba.data.bags import Bag, FeatureSource
from wsimamba.eval.report import Run, RunError, load_run
from wsimamba.atomic import atomic_path, write_text_atomic
from wsimamba.errors import WsimambaError

TUMOR_FRACTION = 0.5  # a patch counts as tumor when at least this share of it is tumor in the mask


@dataclass
class HeatmapResult:
    slide_id: str
    fold: int
    held_out: bool  # the slide was in the fold's test part (the model never trained on it)
    png: Path
    json: Path
    probs: dict[str, float]
    label: str | None
    localisation: dict | None


def load_fold_model(run: Run, fold: int, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The MILModule of `fold` (feature standardisation + aggregator), from its checkpoint, in eval
    mode on `device`. Call it on raw features (B, N, D) → MILOutput."""
    from wsimamba.train.module import MILModule

    module = MILModule.load_from_checkpoint(run.checkpoint(fold), map_location="cpu", weights_only=False)
    return module.eval().to(device)


def patch_size_level0(bag: Bag, level_downsamples: list[float] | None = None) -> int:
    """The patch side in level-0 pixels: the ``patch_size_level0`` attribute (wsimamba, TRIDENT), else
    CLAM's ``patch_size`` at ``patch_level``, else the smallest step between coordinates."""
    a = bag.coords_attrs
    if "patch_size_level0" in a:
        return int(a["patch_size_level0"])
    if "patch_size" in a and "patch_level" in a and level_downsamples:
        level = int(a["patch_level"])
        if 0 <= level < len(level_downsamples):
            return int(round(int(a["patch_size"]) * level_downsamples[level]))
    steps = []
    for axis in (0, 1):
        u = np.unique(bag.coords[:, axis])
        if len(u) > 1:
            steps.append(int(np.diff(u).min()))
    if not steps:
        raise WsimambaError(f"{bag.path}: cannot tell the patch size (no patch_size_level0 attribute, one patch)")
    return min(steps)


def read_mask(path: Path, slide_dims: tuple[int, int]) -> tuple[np.ndarray, float]:
    """A tumor mask PNG → (bool (h, w), level-0 pixels per mask pixel). The downsample is the PNG's
    ``mask_downsample`` text (wsimamba synth), else the slide width over the mask width."""
    img = Image.open(path)
    ds = img.text.get("mask_downsample") if hasattr(img, "text") else None
    mask = np.asarray(img.convert("L")) > 127
    ds = float(ds) if ds else slide_dims[0] / mask.shape[1]
    return mask, ds


def patch_tumor_fraction(coords: np.ndarray, size0: int, mask: np.ndarray, ds: float) -> np.ndarray:
    """Share of each patch's area that is tumor in the mask; coords (N, 2) level-0 → float (N,)."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / ds).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / ds).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) / ds).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) / ds).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def localisation(scores: np.ndarray, tumor: np.ndarray, sums_to_one: bool) -> dict:
    """How well patch scores find tumor patches (bool (N,)).

    patch_auc: ROC AUC of the scores for tumor vs other patches (None with one kind only);
    precision_at_k: share of tumor among the k top-scored patches, k = number of tumor patches,
    next to chance_precision (the tumor share of all patches, what random scores get);
    attention_in_tumor: share of the attention mass on tumor patches (attention-pooling models).
    """
    from sklearn.metrics import roc_auc_score

    n_t = int(tumor.sum())
    out = {"patches": int(len(tumor)), "tumor_patches": n_t, "chance_precision": n_t / max(1, len(tumor)),
           "patch_auc": None, "precision_at_k": None, "attention_in_tumor": None}
    if 0 < n_t < len(tumor):
        out["patch_auc"] = float(roc_auc_score(tumor, scores))
    if n_t:
        top = np.argsort(-scores, kind="stable")[:n_t]
        out["precision_at_k"] = float(tumor[top].mean())
        if sums_to_one:
            out["attention_in_tumor"] = float(scores[tumor].sum() / max(scores.sum(), 1e-12))
    return out


def score_map(shape: tuple[int, int], coords: np.ndarray, size0: int, ds: float, values: np.ndarray) -> np.ndarray:
    """A float32 (h, w) map at `ds` level-0 pixels per pixel: each patch's square (level-0 top-left
    `coords` (N, 2), side `size0`) filled with its value (N,), NaN where no patch lies."""
    heat = np.full(shape, np.nan, np.float32)
    for (x, y), v in zip(coords, values):
        heat[int(y / ds): int(np.ceil((y + size0) / ds)), int(x / ds): int(np.ceil((x + size0) / ds))] = v
    return heat


def _find_mask(slide_path: Path, slide_id: str) -> Path | None:
    for cand in (slide_path.parent.parent / "masks" / f"{slide_id}.png", slide_path.parent / "masks" / f"{slide_id}.png"):
        if cand.is_file():
            return cand
    return None


def _slide_label(run: Run, slide_id: str) -> str | None:
    from wsimamba.data.labels import read_labels

    try:
        table = read_labels(run.config.data.labels, run.config.data.classes)
    except WsimambaError:
        return None
    if slide_id in table.slide_ids:
        return table.classes[table.labels[table.slide_ids.index(slide_id)]]
    return None


def slide_path_from_features(run: Run, slide_id: str) -> Path | None:
    """The slide file a feature file was extracted from (its ``slide_path`` attribute), when it still exists."""
    bag = FeatureSource(run.config.data.features, run.config.data.format).read(slide_id)
    p = bag.file_attrs.get("slide_path")
    return Path(p) if p and Path(p).is_file() else None


def attention_heatmap(run: Run | str | Path, slide: str | Path, fold: int | None = None,
                      mask: str | Path | None = None, out_dir: str | Path | None = None,
                      thumb_size: int = 1024, device: str = "cpu") -> HeatmapResult:
    """Draw the attention of `fold`'s model (default: the fold that held the slide out, else the first)
    over the thumbnail of `slide`; write <out_dir>/<slide_id>.png and .json (default RUN_DIR/heatmaps).

    `mask`: a tumor mask PNG; by default ``masks/<slide_id>.png`` beside the slides folder is used when
    present (synthetic cohorts), and the JSON then holds :func:`localisation`'s numbers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    from wsimamba.slide.reader import open_slide

    run = run if isinstance(run, Run) else load_run(run)
    slide = Path(slide)
    slide_id = slide.stem
    source = FeatureSource(run.config.data.features, run.config.data.format)
    bag = source.read(slide_id)
    if bag.coords is None:
        raise WsimambaError(f"{bag.path}: no patch coordinates in this feature file (pt layout); cannot draw a heatmap")
    done = [f.fold for f in run.folds]
    held = run.fold_of(slide_id)
    if fold is None:
        fold = held if held in done else done[0]
    elif fold not in done:
        raise RunError(f"{run.path}: fold {fold} is not complete (completed: {', '.join(map(str, done))})")
    model = load_fold_model(run, fold, device)
    with torch.no_grad():
        out = model(torch.from_numpy(bag.features)[None].to(device))
    probs = torch.softmax(out.logits.float(), -1)[0].cpu().numpy()
    scores = out.attention.float()[0].cpu().numpy()
    sums_to_one = bool(abs(scores.sum() - 1) < 1e-3 and (scores >= 0).all())

    with open_slide(slide) as s:
        w0, h0 = s.dimensions
        size0 = patch_size_level0(bag, list(s.level_downsamples))
        ds = max(w0, h0) / thumb_size
        thumb = s.thumbnail(max(1.0, ds))
    ds = w0 / thumb.shape[1]
    heat = score_map(thumb.shape[:2], bag.coords, size0, ds, rankdata(scores) / len(scores))

    mask_path = Path(mask) if mask is not None else _find_mask(slide, slide_id)
    loc, mask_img = None, None
    if mask_path is not None:
        if not mask_path.is_file():
            raise WsimambaError(f"{mask_path}: no such mask file")
        m, mds = read_mask(mask_path, (w0, h0))
        tumor = patch_tumor_fraction(bag.coords, size0, m, mds) >= TUMOR_FRACTION
        loc = localisation(scores, tumor, sums_to_one)
        loc.update(mask=str(mask_path), tumor_threshold=TUMOR_FRACTION)
        mask_img = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(thumb.shape[1::-1], Image.NEAREST)) > 127

    label = _slide_label(run, slide_id)
    out_dir = Path(out_dir) if out_dir is not None else run.path / "heatmaps"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6 * thumb.shape[0] / thumb.shape[1] + 0.8))
    axes[0].imshow(thumb)
    axes[0].set_title(f"{slide_id}" + (f" (label {label})" if label is not None else ""))
    axes[1].imshow(thumb)
    im = axes[1].imshow(np.ma.masked_invalid(heat), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
    if mask_img is not None and mask_img.any():
        axes[1].contour(mask_img, levels=[0.5], colors="lime", linewidths=1.2)
    pos = run.classes[-1]
    title = f"fold {fold}{'' if held == fold else ' (slide not held out)'}: P({pos}) = {probs[-1]:.3f}"
    if loc is not None and loc["patch_auc"] is not None:
        title += f"\npatch AUC {loc['patch_auc']:.2f}, top-k precision {loc['precision_at_k']:.2f} (chance {loc['chance_precision']:.2f})"
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.035, label="attention percentile")
    png = out_dir / f"{slide_id}.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    record = {"slide_id": slide_id, "slide": str(slide), "fold": fold, "held_out": held == fold,
              "model": run.config.model.name, "label": label,
              "probs": {c: float(p) for c, p in zip(run.classes, probs)}, "patches": int(len(scores)),
              "patch_size_level0": size0, "localisation": loc}
    js = out_dir / f"{slide_id}.json"
    write_text_atomic(js, json.dumps(record, indent=2) + "\n")
    return HeatmapResult(slide_id, fold, held == fold, png, js, record["probs"], label, loc)
