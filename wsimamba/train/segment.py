"""`wsimamba train` with `task: segment`: one segmentation network (wsimamba.models.seg) on image/mask pairs.

Run folder (``<out>/<name>/``)::

    config.yaml        the resolved config (absolute paths)
    classes.json       class names in index order (background first)
    splits.csv         part,image,mask for every pair (paths relative to data.root); a rerun reuses it
    checkpoint.ckpt    the best epoch by validation Dice (mean over foreground classes; ties: lower
                       validation loss); without a validation part, the last epoch
    last.ckpt          the latest epoch with optimiser, scheduler and callback state, while training;
                       an interrupted run resumes from it (removed once metrics.json is written)
    per_image.csv      image,dice_<class>…,hd95_<class>… for every evaluated image (test if the data has
                       one, else val)
    overlays/*.png     the first `eval.overlays` evaluated images: the image, and the image with the
                       prediction tinted and the ground truth outlined (volumes: the slice with most foreground)
    logs/metrics.csv   Lightning's CSV log (train_loss, lr, val_loss, val_dice per epoch)
    metrics.json       per-class Dice, IoU (torchmetrics, over all evaluated pixels), HD95 (mean over images,
                       scipy distance transforms), the constant predictor's Dice, epochs, timing; written
                       last: its presence marks the run done

The loss is cross-entropy plus soft Dice (mean over classes, background left out unless
``train.dice_include_background``). Inputs whose sides are not multiples of the network's ``reduction``
are zero-padded and the logits cropped back. A rerun of a finished run skips it; an interrupted one
resumes from last.ckpt with the saved splits. A different config for the same run folder is an error
unless ``overwrite`` (as for the other tasks).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsimamba.atomic import write_text_atomic
from wsimamba.config import SegmentConfig
from wsimamba.data.segmentation import (SegmentationDataset, SegSplits, file_stem, find_pairs, load_splits_csv,
                                        splits_csv, train_transform)
from wsimamba.errors import ConfigError, WsimambaError
from wsimamba.train.classify import adamw_warmup_cosine, fit_epochs, fit_facts, load_best
from wsimamba.train.module import NonFiniteLossError
from wsimamba.train.run import _end_distributed, _prepare_run_dir, _quiet_lightning, global_rank, resolve_precision


# ---------------------------------------------------------------------------------------------
# loss and the module


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                   eps: float = 1e-5) -> torch.Tensor:
    """1 − mean over classes of the soft Dice between softmax(logits) (B, C, *S) and one-hot target
    (B, *S), pooled over the batch and all pixels (classes absent from both count as Dice 1)."""
    n = logits.shape[1]
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, n).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    if not include_background and n > 1:
        dice = dice[1:]
    return 1 - dice.mean()


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of x (B, C, *S) at the end up to multiples of `multiple`; returns the
    padded tensor and the original spatial size."""
    size = tuple(x.shape[2:])
    if multiple <= 1:
        return x, size
    pad = []
    for s in reversed(size):
        pad += [0, (-s) % multiple]
    return (F.pad(x, pad) if any(pad) else x), size


class SegmentModule(L.LightningModule):
    """Holds the segmenter and the loss. Batches are dicts from
    :class:`wsimamba.data.segmentation.SegmentationDataset`: ``image`` (B, C, *S), ``mask`` (B, *S).
    Logs ``train_loss``, ``val_loss``, ``val_dice`` (torchmetrics DiceScore over all validation pixels,
    mean over foreground classes) and ``val_select`` (val_dice, ties broken by lower loss)."""

    def __init__(self, model_name: str, in_channels: int, num_classes: int, spatial_dims: int = 2,
                 model_kwargs: dict | None = None, lr: float = 1e-3, min_lr: float = 1e-6, weight_decay: float = 0.01,
                 warmup_epochs: float = 0, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 dice_include_background: bool = False):
        super().__init__()
        self.save_hyperparameters()
        from torchmetrics.segmentation import DiceScore

        from wsimamba.models.seg import create_segmenter

        self.model = create_segmenter(model_name, in_channels, num_classes, spatial_dims, **(model_kwargs or {}))
        self.reduction = int(getattr(self.model, "reduction", 1) or 1)
        self.val_dice = DiceScore(num_classes=num_classes, include_background=dice_include_background,
                                  average="macro", aggregation_level="global", input_format="index")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) normalised images → logits (B, num_classes, *S)."""
        padded, size = pad_to_multiple(x, self.reduction)
        logits = self.model(padded)
        if tuple(logits.shape[2:]) != size:
            logits = logits[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]
        return logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        logits = logits.float()
        total = logits.new_zeros(())
        if hp.ce_weight > 0:
            total = total + hp.ce_weight * F.cross_entropy(logits, target)
        if hp.dice_weight > 0:
            total = total + hp.dice_weight * soft_dice_loss(logits, target, hp.dice_include_background)
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["mask"]
        loss = self.loss(self(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                "(try a lower train.lr, train.grad_clip, or train.precision=32-true)"
            )
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=y.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch["image"], batch["mask"]
        logits = self(x).float()
        self.val_dice.update(logits.argmax(1), y)
        self.log("val_loss", self.loss(logits, y), on_step=False, on_epoch=True, batch_size=y.shape[0],
                 sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        dice = torch.nan_to_num(self.val_dice.compute().float(), nan=0.0)
        self.val_dice.reset()
        self.log("val_dice", dice, sync_dist=True)
        loss = self.trainer.callback_metrics.get("val_loss")
        if loss is not None:
            self.log("val_select", dice - 1e-4 * loss.to(dice), sync_dist=True)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self)


def load_segment_module(checkpoint: str | Path, map_location: str = "cpu") -> SegmentModule:
    """A trained SegmentModule from its checkpoint (the network must be registered in this process)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise WsimambaError(f"{checkpoint}: no such checkpoint")
    state = torch.load(checkpoint, map_location=map_location, weights_only=False)
    hp = state.get("hyper_parameters")
    if not hp or "model_name" not in hp or "spatial_dims" not in hp:
        raise WsimambaError(f"{checkpoint}: not a segmentation checkpoint (no segmenter hyper-parameters)")
    module = SegmentModule(**hp)
    module.load_state_dict(state["state_dict"])
    return module.eval()


# ---------------------------------------------------------------------------------------------
# data


def _dataset(cfg: SegmentConfig, pairs, train: bool, channels: int) -> SegmentationDataset:
    d = cfg.data
    tf = train_transform(d.augment, d.spatial_dims, channels) if train else None
    return SegmentationDataset(pairs, d.spatial_dims, d.num_classes, d.normalize, tf)


def _uniform(shapes: list[tuple]) -> bool:
    return len(set(shapes)) <= 1


class SegDataModule(L.LightningDataModule):
    """Train / val loaders over :class:`SegSplits`; the training order is shuffled from `seed`. Evaluation
    batches hold whole images: `batch_size` of them when all share a size, else one."""

    def __init__(self, splits: SegSplits, cfg: SegmentConfig, channels: int):
        super().__init__()
        self.splits, self.cfg, self.channels = splits, cfg, channels
        self._eval_bs: dict[str, int] = {}

    def dataset(self, part: str, train: bool = False) -> SegmentationDataset:
        return _dataset(self.cfg, self.splits[part], train, self.channels)

    def loader(self, part: str, train: bool = False) -> DataLoader:
        d, t = self.cfg.data, self.cfg.train
        ds = self.dataset(part, train)
        if train:
            bs = t.batch_size
        else:
            if part not in self._eval_bs:
                self._eval_bs[part] = t.batch_size if _uniform(ds.shapes()) else 1
            bs = self._eval_bs[part]
        gen = torch.Generator().manual_seed(t.seed) if train else None
        return DataLoader(ds, batch_size=bs, shuffle=train, generator=gen,
                          drop_last=train and len(ds) > t.batch_size, num_workers=d.workers,
                          persistent_workers=d.workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")


def load_seg_splits(cfg: SegmentConfig, run_dir: Path) -> SegSplits:
    """The saved splits of the run folder when there are, else the data's own."""
    d = cfg.data
    saved = run_dir / "splits.csv"
    if saved.is_file():
        return load_splits_csv(saved, d.root)
    return find_pairs(d.root, d.images, d.masks, d.index, d.spatial_dims, d.val_fraction, d.test_fraction,
                      cfg.train.seed)


def _check_data(cfg: SegmentConfig, splits: SegSplits) -> int:
    """Channels of the data (checked against data.in_channels); the training images must share a size
    unless crops are taken; the first pair of every part is read fully (mask values, shapes)."""
    d = cfg.data
    probe = SegmentationDataset(splits["train"][:1], d.spatial_dims, d.num_classes, d.normalize)
    channels = probe.channels()
    if d.in_channels is not None and d.in_channels != channels:
        raise ConfigError(f"data.in_channels is {d.in_channels} but {splits['train'][0][0]} has {channels} channel(s)")
    for part in ("train", "val", "test"):
        if splits[part]:
            SegmentationDataset(splits[part][:1], d.spatial_dims, d.num_classes, d.normalize).load(0)
    if d.augment.crop is None:
        shapes = SegmentationDataset(splits["train"], d.spatial_dims).shapes()
        if not _uniform(shapes):
            sizes = sorted(set(shapes))
            raise ConfigError(f"the training images differ in size ({sizes[0]}, {sizes[-1]}, …): set data.augment.crop "
                              "to train on crops of one size")
    return channels


# ---------------------------------------------------------------------------------------------
# evaluation and outputs


@torch.no_grad()
def predict_batches(module: SegmentModule, loader: DataLoader, device: torch.device, precision: str = "32-true"):
    """Yields (indices, predicted classes (B, *S), target (B, *S)) over `loader`. A plain loop (rank 0 only
    after a distributed fit, where a Trainer would shard the images over ranks)."""
    module.eval().to(device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16}.get(precision)
    for batch in loader:
        x = batch["image"].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = module(x)
        yield batch["index"].tolist(), logits.float().argmax(1).cpu(), batch["mask"]


def evaluate(module: SegmentModule, cfg: SegmentConfig, dm: SegDataModule, part: str, run_dir: Path,
             device: torch.device, precision: str, classes: list[str]) -> dict:
    """Metrics of `part` (SegmentationMetrics), per_image.csv and the overlay PNGs; returns the metrics."""
    from wsimamba.eval.segmentation import SegmentationMetrics, write_overlay_png

    metrics = SegmentationMetrics(len(classes), hd95=cfg.eval.hd95, spacing=cfg.eval.spacing)
    ds = dm.dataset(part)
    rows = []
    overlays = run_dir / "overlays"
    written = 0
    for idx, pred, target in predict_batches(module, dm.loader(part), device, precision):
        for i, r, p, t in zip(idx, metrics.update(pred, target), pred, target):
            rows.append((dm.splits.relative(ds.pairs[i][0]), r))
            if written < cfg.eval.overlays:
                image, _ = ds.load(i)
                write_overlay_png(overlays / f"{file_stem(ds.pairs[i][0])}.png", image, t.numpy(), p.numpy())
                written += 1
    fg = list(range(1, len(classes)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image"] + [f"dice_{classes[c]}" for c in fg] + ([f"hd95_{classes[c]}" for c in fg] if cfg.eval.hd95 else []))
    for name, r in rows:
        w.writerow([name] + [f"{r['dice'][c]:.6f}" for c in fg] + ([f"{r['hd95'][c]:.4f}" for c in fg] if r["hd95"] else []))
    write_text_atomic(run_dir / "per_image.csv", buf.getvalue())
    out = metrics.compute(classes)
    out["overlays"] = written
    return out


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class SegmentResult:
    run_dir: Path
    status: str  # "trained", "done" (found complete), "failed"
    metrics: dict | None = None
    message: str = ""


def segment_run(cfg: SegmentConfig, overwrite: bool = False, progress_bar: bool = False,
                on_event: Callable[[str, dict], None] | None = None) -> SegmentResult:
    """Train (or resume, or skip) the segmenter of `cfg`; write the run folder (module docstring).

    `on_event(kind, info)` is called with kind "segment_start", "segment_skip", "segment_done" or
    "segment_failed". A non-finite training loss ends the run as failed (failed.txt, no metrics.json).
    """
    cfg = cfg.resolved()
    rank0 = global_rank() == 0
    emit = on_event if (on_event is not None and rank0) else (lambda kind, info: None)
    run_dir = _prepare_run_dir(cfg, overwrite)
    marker = run_dir / "metrics.json"
    if marker.is_file():
        metrics = json.loads(marker.read_text())
        emit("segment_skip", {"run_dir": run_dir, "metrics": metrics})
        return SegmentResult(run_dir, "done", metrics)
    splits = load_seg_splits(cfg, run_dir)
    eval_part = "test" if splits["test"] else "val"
    if not splits[eval_part]:
        raise ConfigError(f"{cfg.data.root}: no validation or test pairs to evaluate on; add a val/test split or "
                          "set data.val_fraction > 0")
    d, t = cfg.data, cfg.train
    classes = d.class_names()
    L.seed_everything(t.seed, workers=True, verbose=False)
    channels = _check_data(cfg, splits)
    module = SegmentModule(cfg.model.name, channels, d.num_classes, d.spatial_dims, cfg.model.kwargs(),
                           lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, warmup_epochs=t.warmup_epochs,
                           dice_weight=t.dice_weight, ce_weight=t.ce_weight,
                           dice_include_background=t.dice_include_background)
    resume = run_dir / "last.ckpt"
    resume = resume if resume.is_file() else None
    if rank0:
        (run_dir / "failed.txt").unlink(missing_ok=True)
        if resume is None and run_dir.exists():  # leftovers of an attempt that saved no epoch
            for stale in ("checkpoint.ckpt", "per_image.csv"):
                (run_dir / stale).unlink(missing_ok=True)
            for stale_dir in ("logs", "overlays"):
                shutil.rmtree(run_dir / stale_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        write_text_atomic(run_dir / "classes.json", json.dumps({"classes": classes}, indent=2) + "\n")
        if not (run_dir / "splits.csv").is_file():
            write_text_atomic(run_dir / "splits.csv", splits_csv(splits))
    params = sum(p.numel() for p in module.model.parameters())
    precision = resolve_precision(t.precision, t.accelerator)
    emit("segment_start", {"run_dir": run_dir, "model": cfg.model.name, "params": params, "classes": classes,
                           "counts": splits.counts(), "source": splits.source, "root": d.root,
                           "eval_part": eval_part, "resume": resume, "precision": precision,
                           "channels": channels})
    dm = SegDataModule(splits, cfg, channels)
    t0 = time.perf_counter()
    try:
        with _quiet_lightning():
            trainer, ckpt, stopper = fit_epochs(cfg.train, "val_dice", module, dm, bool(dm.splits["val"]),
                                                len(dm.splits["train"]), run_dir, progress_bar, resume)
    except NonFiniteLossError as e:
        msg = f"training stopped: {e}"
        if rank0:
            write_text_atomic(run_dir / "failed.txt", msg + "\n")
        emit("segment_failed", {"run_dir": run_dir, "message": msg})
        _end_distributed()
        return SegmentResult(run_dir, "failed", None, msg)
    seconds = time.perf_counter() - t0
    if trainer.global_rank != 0:
        _end_distributed()
        return SegmentResult(run_dir, "trained")
    best, state = load_best(module, ckpt, run_dir)
    shutil.rmtree(run_dir / "overlays", ignore_errors=True)
    t1 = time.perf_counter()
    result = evaluate(module, cfg, dm, eval_part, run_dir, trainer.strategy.root_device, trainer.precision, classes)
    if best.name != "checkpoint.ckpt":
        best.replace(run_dir / "checkpoint.ckpt")
    tiles = d.root / "tiles.json"
    metrics = {
        "task": "segment",
        "model": cfg.model.name,
        "params": params,
        "classes": classes,
        "spatial_dims": d.spatial_dims,
        "in_channels": channels,
        "evaluated_on": eval_part,
        "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(splits["test"]),
        **fit_facts(trainer, ckpt, stopper, state, resume, seconds),
        "eval_seconds": round(time.perf_counter() - t1, 2),
        "precision": trainer.precision,
        "tiles": json.loads(tiles.read_text()) if tiles.is_file() else None,
        "eval": result,
    }
    write_text_atomic(marker, json.dumps(metrics, indent=2) + "\n")
    (run_dir / "last.ckpt").unlink(missing_ok=True)
    emit("segment_done", {"run_dir": run_dir, "metrics": metrics})
    _end_distributed()
    return SegmentResult(run_dir, "trained", metrics)
