"""`wsimamba train` with `task: classify`: one image classifier (a Mamba vision backbone or a timm model).

Run folder (``<out>/<name>/``)::

    config.yaml        the resolved config (absolute paths)
    classes.json       class names in index order
    splits.csv         part,path,label for every image (paths relative to data.root); a rerun reuses it
    checkpoint.ckpt    the best epoch by validation top-1 (ties: lower validation loss); without a
                       validation part, the last epoch
    last.ckpt          the latest epoch with optimiser, scheduler and callback state, while training;
                       an interrupted run resumes from it (removed once metrics.json is written)
    predictions.csv    path,label,pred,prob_<class>… on the evaluated part: test if the data has one, else val
    confusion.png      the confusion matrix of predictions.csv (row shares)
    logs/metrics.csv   Lightning's CSV log (train_loss, lr, val_loss, val_top1, val_top<k> per epoch)
    metrics.json       top-1 / top-k accuracy, loss, balanced accuracy, macro F1 on the evaluated part,
                       epochs, timing; written last: its presence marks the run done

A rerun of a finished run skips it; an interrupted one resumes from last.ckpt with the saved splits.
A different config for the same run folder is an error unless ``overwrite`` (as for MIL runs).
top-k is top-5, or top-n_classes with fewer than 5 classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from wsimamba.atomic import atomic_path, write_text_atomic
from wsimamba.config import ClassifyConfig
from wsimamba.data.images import (ImageDataset, ImageSplits, cnfood241_splits, eval_transform, imagefolder_splits,
                                  load_splits_csv, splits_csv, train_transform)
from wsimamba.errors import ConfigError, WsimambaError
from wsimamba.train.module import NonFiniteLossError
from wsimamba.train.run import _end_distributed, _prepare_run_dir, _quiet_lightning, global_rank, resolve_precision

NO_DECAY_NAMES = ("A_log", "A_logs", "D", "Ds")  # Mamba's state matrix and skip: no weight decay, as in mamba-ssm


# ---------------------------------------------------------------------------------------------
# the model


def build_classifier(name: str, n_classes: int, kwargs: dict | None = None) -> nn.Module:
    """A registered backbone (wsimamba.models.vision) or ``timm:<arch>`` (random init) with an
    `n_classes` head; maps images (B, 3, H, W) to logits (B, n_classes)."""
    kwargs = dict(kwargs or {})
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        if arch not in timm.list_models():
            raise ConfigError(f"model.name: timm has no model {arch!r}")
        try:
            return timm.create_model(arch, pretrained=False, num_classes=n_classes, **kwargs)
        except TypeError as e:
            raise ConfigError(f"model: {arch!r} does not take {', '.join(sorted(kwargs))} ({e})") from None
    from wsimamba.models.vision import create_backbone

    return create_backbone(name, num_classes=n_classes, **kwargs)


def no_decay_parameter(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    """Norm weights, biases, Mamba's A_log and D, and names a model lists in no_weight_decay() (timm)."""
    return p.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or getattr(p, "_no_weight_decay", False)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate factor: linear from ~0 to 1 over `warmup` steps, then cosine down to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(module: L.LightningModule) -> dict:
    """AdamW (no decay on norms, biases, Mamba's A_log / D or the model's `no_weight_decay()`), linear
    warmup over `hparams.warmup_epochs` then cosine to `hparams.min_lr`, stepped per batch: the
    optimiser of the image tasks. `module.model` is the network; hparams hold lr, min_lr, weight_decay."""
    hp, model = module.hparams, module.model
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_decay_parameter(name, p, skip) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = int(round(total * hp.warmup_epochs / max(1, module.trainer.max_epochs)))
    min_ratio = hp.min_lr / hp.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup, min_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ClassifyModule(L.LightningModule):
    """Holds the classifier and the loss (cross-entropy with label smoothing; soft targets under
    MixUp / CutMix). Batches are dicts from :class:`wsimamba.data.images.ImageDataset`: ``image``
    (B, 3, S, S), ``label`` (B,). Logs ``train_loss``, ``val_loss``, ``val_top1``, ``val_top<k>``
    (torchmetrics, synced across devices) and ``val_select`` (top-1, ties broken by lower loss).
    """

    def __init__(self, model_name: str, classes: list[str], model_kwargs: dict | None = None, lr: float = 5e-4,
                 min_lr: float = 1e-6, weight_decay: float = 0.05, warmup_epochs: float = 0,
                 label_smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        n = len(classes)
        self.model = build_classifier(model_name, n, model_kwargs)
        self.k = min(5, n)
        self.val_top1 = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
        self.val_topk = MulticlassAccuracy(num_classes=n, top_k=self.k, average="micro")
        self.mix = _batch_mixer(n, mixup, cutmix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) normalised images → logits (B, n_classes)."""
        return self.model(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        target = y
        if self.mix is not None:
            x, target = self.mix(x, y)  # target: (B, n_classes) mixed one-hot
        loss = F.cross_entropy(self(x).float(), target, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                "(try a lower train.lr, train.grad_clip, or train.precision=32-true)"
            )
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=y.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        logits = self(x).float()
        self.val_top1.update(logits, y)
        self.val_topk.update(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, batch_size=y.shape[0],
                 sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        top1, topk = self.val_top1.compute(), self.val_topk.compute()
        self.val_top1.reset()
        self.val_topk.reset()
        self.log("val_top1", top1, sync_dist=True)
        self.log(f"val_top{self.k}", topk, sync_dist=True)
        loss = self.trainer.callback_metrics.get("val_loss")
        if loss is not None:
            self.log("val_select", top1 - 1e-4 * loss.to(top1), sync_dist=True)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self)


def _batch_mixer(n_classes: int, mixup: float, cutmix: float):
    """torchvision's MixUp / CutMix (one of them per batch when both are on), or None."""
    from torchvision.transforms import v2

    ops = []
    if mixup > 0:
        ops.append(v2.MixUp(alpha=mixup, num_classes=n_classes))
    if cutmix > 0:
        ops.append(v2.CutMix(alpha=cutmix, num_classes=n_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


# ---------------------------------------------------------------------------------------------
# data


class ImageDataModule(L.LightningDataModule):
    """Train / val loaders over :class:`ImageSplits`; the training order is shuffled from `seed`."""

    def __init__(self, splits: ImageSplits, cfg: ClassifyConfig):
        super().__init__()
        self.splits, self.cfg = splits, cfg

    def loader(self, part: str, train: bool = False) -> DataLoader:
        d, t = self.cfg.data, self.cfg.train
        if train:
            tf = train_transform(d.image_size, d.augment, d.interpolation)
        else:
            tf = eval_transform(d.image_size, d.eval_crop, d.interpolation)
        samples = self.splits[part]
        gen = torch.Generator().manual_seed(t.seed) if train else None
        return DataLoader(ImageDataset(samples, tf), batch_size=t.batch_size, shuffle=train, generator=gen,
                          drop_last=train and len(samples) > t.batch_size, num_workers=d.workers,
                          persistent_workers=d.workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")


def load_image_splits(cfg: ClassifyConfig, run_dir: Path) -> ImageSplits:
    """The saved splits of the run folder when there are, else the data's own (module docstring of
    wsimamba.data.images)."""
    d = cfg.data
    saved, classes_file = run_dir / "splits.csv", run_dir / "classes.json"
    if saved.is_file() and classes_file.is_file():
        classes = json.loads(classes_file.read_text())["classes"]
        return load_splits_csv(saved, d.root, classes)
    if d.format == "cnfood241":
        splits = cnfood241_splits(d.root, d.train_list, d.val_list, d.test_list, d.classes, d.val_fraction,
                                  cfg.train.seed)
    else:
        splits = imagefolder_splits(d.root, d.val_fraction, cfg.train.seed)
        if d.classes is not None:
            if sorted(d.classes) != sorted(splits.classes):
                raise ConfigError(f"data.classes {d.classes} are not the class folders of {d.root} ({splits.classes})")
            order = {c: i for i, c in enumerate(d.classes)}
            remap = [order[c] for c in splits.classes]
            splits.parts = {p: [(f, remap[y]) for f, y in s] for p, s in splits.parts.items()}
            splits.classes = list(d.classes)
    return splits


# ---------------------------------------------------------------------------------------------
# weights, predictions, outputs


def load_weights(model: nn.Module, path: Path) -> dict:
    """Load a local state dict (a plain one, or a checkpoint holding `state_dict` / `model`); tensors
    whose shape differs (a head for other classes) are left out. Returns what went into metrics.json."""
    if not path.is_file():
        raise ConfigError(f"model.weights: {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle, zip and format errors alike)
        raise ConfigError(f"model.weights: {path}: not a readable state-dict file ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights: {path}: holds no state dict")
    if state and all(k.startswith("model.") for k in state):  # a checkpoint of this module
        state = {k[len("model."):]: v for k, v in state.items()}
    own = model.state_dict()
    left_out = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    for k in left_out:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in left_out]
    if missing or unexpected:
        raise ConfigError(f"model.weights: {path} does not fit this model: {len(missing)} missing "
                          f"(e.g. {', '.join(missing[:3])}), {len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path), "sha256": digest, "left_out": left_out}


@torch.no_grad()
def predict_images(module: nn.Module, loader: DataLoader, device: torch.device,
                   precision: str = "32-true") -> np.ndarray:
    """Class probabilities (n, C) over `loader` in order. A plain loop (runs on rank 0 only after a
    distributed fit, where a Trainer would shard the images over ranks)."""
    module.eval().to(device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16}.get(precision)
    out = []
    for batch in loader:
        x = batch["image"].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = module(x)
        out.append(torch.softmax(logits.float(), -1).cpu())
    return torch.cat(out).numpy()


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """top-1 and top-k accuracy (k = min(5, C), torchmetrics), mean cross-entropy, balanced accuracy,
    macro F1 (scikit-learn) of class probabilities (n, C) against labels (n,)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from torchmetrics.functional.classification import multiclass_accuracy

    n_classes = probs.shape[1]
    k = min(5, n_classes)
    p, t = torch.from_numpy(probs), torch.from_numpy(np.asarray(y, np.int64))
    pred = probs.argmax(1)
    return {
        "top1": float(multiclass_accuracy(p, t, num_classes=n_classes, top_k=1, average="micro")),
        f"top{k}": float(multiclass_accuracy(p, t, num_classes=n_classes, top_k=k, average="micro")),
        "loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
    }


def predictions_csv(splits: ImageSplits, samples: list[tuple[Path, int]], probs: np.ndarray) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "pred"] + [f"prob_{c}" for c in splits.classes])
    for (path, y), p in zip(samples, probs):
        w.writerow([splits.relative(path), splits.classes[y], splits.classes[int(p.argmax())]] + [f"{v:.6f}" for v in p])
    return buf.getvalue()


def write_confusion_png(path: Path, y: np.ndarray, pred: np.ndarray, classes: list[str], title: str) -> Path:
    """Row-normalised confusion matrix as PNG (written atomically); counts in the cells up to 20
    classes, class names on the axes up to 40."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    n = len(classes)
    cm = confusion_matrix(y, pred, labels=list(range(n)))
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(24.0, max(4.5, 0.45 * n + 2.5))
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    if n <= 40:
        ax.set(xticks=range(n), yticks=range(n))
        ax.set_xticklabels(classes, rotation=90)
        ax.set_yticklabels(classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class ClassifyResult:
    run_dir: Path
    status: str  # "trained", "done" (found complete), "failed"
    metrics: dict | None = None
    message: str = ""


def fit_epochs(t, select_metric: str, module: L.LightningModule, dm: L.LightningDataModule, has_val: bool,
               n_train: int, run_dir: Path, progress_bar: bool, resume: Path | None) -> tuple[L.Trainer, object, object]:
    """Train an image task (classify, segment) with Lightning; returns (trainer, best-checkpoint callback, stopper).

    `t`: the task's train config (epochs, early stopping, devices; config._EpochTrainConfig). The best
    epoch by `val_select` (the module logs `select_metric` there) or by val_loss, as
    `t.early_stopping.monitor` says, goes to checkpoint.ckpt; last.ckpt holds every epoch for resuming.
    Without a validation part the last epoch is the result. `resume`: a last.ckpt to continue from (the
    CSV log's earlier rows are kept).
    """
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    es = t.early_stopping
    monitor, mode = ("val_select", "max") if es.monitor == select_metric else ("val_loss", "min")
    callbacks: list = [LearningRateMonitor(logging_interval="epoch")]
    stopper = None
    if has_val:
        ckpt = ModelCheckpoint(dirpath=run_dir, filename="checkpoint", monitor=monitor, mode=mode, save_top_k=1,
                               enable_version_counter=False, auto_insert_metric_name=False)
        if es.enabled:
            stopper = EarlyStopping(monitor=monitor, mode=mode, patience=es.patience, min_delta=es.min_delta,
                                    check_finite=True)
            callbacks.append(stopper)
    # every epoch, after `ckpt` so that it holds that callback's updated best score (save_last=True
    # would write last.ckpt only in the epochs that improve)
    last = ModelCheckpoint(dirpath=run_dir, filename="last", save_top_k=1, enable_version_counter=False)
    if has_val:
        callbacks += [ckpt, last]
    else:  # nothing to choose an epoch with: the last one is the result (two unmonitored checkpoints would clash)
        ckpt = last
        callbacks.append(last)
    if progress_bar:
        callbacks.append(RichProgressBar(leave=False))
    steps = max(1, n_train // t.batch_size)
    trainer = L.Trainer(
        max_epochs=t.epochs, min_epochs=t.min_epochs, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=resolve_precision(t.precision, t.accelerator),
        deterministic=t.deterministic, logger=CSVLogger(run_dir, name="logs", version=""), callbacks=callbacks,
        enable_progress_bar=progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if has_val else 0, log_every_n_steps=max(1, min(50, steps)),
        gradient_clip_val=t.grad_clip, accumulate_grad_batches=t.accumulate, default_root_dir=run_dir,
    )
    log_csv = run_dir / "logs" / "metrics.csv"
    earlier = _read_csv(log_csv) if resume is not None else []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
            trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume is not None else None)
    finally:
        if earlier and trainer.global_rank == 0:
            _prepend_log(log_csv, earlier)
    return trainer, ckpt, stopper


def load_best(module: L.LightningModule, ckpt, run_dir: Path) -> tuple[Path, dict]:
    """Load the best epoch that `fit_epochs` kept into `module`; returns its file and checkpoint dict."""
    best = Path(ckpt.best_model_path) if ckpt.best_model_path else None
    if best is None or not best.is_file():
        raise WsimambaError(f"no checkpoint was written in {run_dir}")
    state = torch.load(best, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    return best, state


def fit_facts(trainer: L.Trainer, ckpt, stopper, state: dict, resume: Path | None, seconds: float) -> dict:
    """What metrics.json says about the training of an image task: epochs, the best one, early stop, resume."""
    return {
        "epochs": trainer.current_epoch,
        "best_epoch": int(state.get("epoch", trainer.current_epoch)),
        "stopped_early": bool(stopper is not None and stopper.stopped_epoch > 0),
        "best_val": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "monitor": ckpt.monitor,
        "resumed": resume is not None,
        "seconds": round(seconds, 2),
    }


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _prepend_log(path: Path, earlier: list[dict]) -> None:
    """Lightning's CSVLogger starts metrics.csv afresh on a resumed fit: put back the rows of the
    epochs before it (those with a step the resumed fit did not log again)."""
    import csv
    import io

    new = _read_csv(path)
    first = min((int(r["step"]) for r in new if r.get("step")), default=None)
    kept = [r for r in earlier if first is None or (r.get("step") and int(r["step"]) < first)]
    columns = list(dict.fromkeys([k for r in kept + new for k in r]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(kept + new)
    write_text_atomic(path, buf.getvalue())


def classify_run(cfg: ClassifyConfig, overwrite: bool = False, progress_bar: bool = False,
                 on_event: Callable[[str, dict], None] | None = None) -> ClassifyResult:
    """Train (or resume, or skip) the classifier of `cfg`; write the run folder (module docstring).

    `on_event(kind, info)` is called with kind "classify_start", "classify_skip", "classify_done" or
    "classify_failed" for the caller to report. A non-finite training loss ends the run as failed
    (failed.txt, no metrics.json; a rerun starts it again).
    """
    cfg = cfg.resolved()
    rank0 = global_rank() == 0
    emit = on_event if (on_event is not None and rank0) else (lambda kind, info: None)
    run_dir = _prepare_run_dir(cfg, overwrite)
    marker = run_dir / "metrics.json"
    if marker.is_file():
        metrics = json.loads(marker.read_text())
        emit("classify_skip", {"run_dir": run_dir, "metrics": metrics})
        return ClassifyResult(run_dir, "done", metrics)
    splits = load_image_splits(cfg, run_dir)
    eval_part = "test" if splits["test"] else "val"
    if not splits[eval_part]:
        raise ConfigError(f"{cfg.data.root}: no validation or test images to evaluate on; add a val/test split or "
                          "set data.val_fraction > 0")
    t = cfg.train
    L.seed_everything(t.seed, workers=True, verbose=False)
    a = cfg.data.augment
    module = ClassifyModule(cfg.model.name, splits.classes, cfg.model.kwargs(), lr=t.lr, min_lr=t.min_lr,
                            weight_decay=t.weight_decay, warmup_epochs=t.warmup_epochs,
                            label_smoothing=t.label_smoothing, mixup=a.mixup, cutmix=a.cutmix)
    reduction = int(getattr(module.model, "reduction", 1) or 1)
    if cfg.data.image_size % reduction:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be divisible by {reduction} for "
                          f"{cfg.model.name!r}")
    resume = run_dir / "last.ckpt"
    resume = resume if resume.is_file() else None
    weights = load_weights(module.model, cfg.model.weights) if cfg.model.weights is not None else "random-init"
    if rank0:
        (run_dir / "failed.txt").unlink(missing_ok=True)
        if resume is None and run_dir.exists():  # leftovers of an attempt that saved no epoch
            for stale in ("checkpoint.ckpt", "predictions.csv", "confusion.png"):
                (run_dir / stale).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "logs", ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        write_text_atomic(run_dir / "classes.json", json.dumps({"classes": splits.classes}, indent=2) + "\n")
        if not (run_dir / "splits.csv").is_file():
            write_text_atomic(run_dir / "splits.csv", splits_csv(splits))
    params = sum(p.numel() for p in module.model.parameters())
    emit("classify_start", {"run_dir": run_dir, "model": cfg.model.name, "params": params,
                            "classes": len(splits.classes), "counts": splits.counts(), "source": splits.source,
                            "root": cfg.data.root, "eval_part": eval_part, "resume": resume,
                            "precision": resolve_precision(t.precision, t.accelerator)})
    t0 = time.perf_counter()
    try:
        with _quiet_lightning():
            trainer, ckpt, stopper = fit_epochs(cfg.train, "val_top1", module, ImageDataModule(splits, cfg),
                                                bool(splits["val"]), len(splits["train"]), run_dir, progress_bar, resume)
    except NonFiniteLossError as e:
        msg = f"training stopped: {e}"
        if rank0:
            write_text_atomic(run_dir / "failed.txt", msg + "\n")
        emit("classify_failed", {"run_dir": run_dir, "message": msg})
        _end_distributed()
        return ClassifyResult(run_dir, "failed", None, msg)
    seconds = time.perf_counter() - t0
    if trainer.global_rank != 0:
        _end_distributed()
        return ClassifyResult(run_dir, "trained")
    best, state = load_best(module, ckpt, run_dir)
    precision = trainer.precision
    loader = ImageDataModule(splits, cfg).loader(eval_part)
    probs = predict_images(module, loader, trainer.strategy.root_device, precision)
    samples = splits[eval_part]
    y = np.array([label for _, label in samples], np.int64)
    write_text_atomic(run_dir / "predictions.csv", predictions_csv(splits, samples, probs))
    write_confusion_png(run_dir / "confusion.png", y, probs.argmax(1), splits.classes,
                        f"{cfg.name}: {cfg.model.name} on {eval_part} ({len(y)} images)")
    if best.name != "checkpoint.ckpt":
        best.replace(run_dir / "checkpoint.ckpt")
    metrics = {
        "task": "classify",
        "model": cfg.model.name,
        "params": params,
        "weights": weights,
        "classes": len(splits.classes),
        "evaluated_on": eval_part,
        "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(splits["test"]),
        **fit_facts(trainer, ckpt, stopper, state, resume, seconds),
        "precision": precision,
        "image_size": cfg.data.image_size,
        "eval": classification_metrics(y, probs),
    }
    write_text_atomic(marker, json.dumps(metrics, indent=2) + "\n")
    (run_dir / "last.ckpt").unlink(missing_ok=True)  # only needed to resume; the run is complete now
    emit("classify_done", {"run_dir": run_dir, "metrics": metrics})
    _end_distributed()
    return ClassifyResult(run_dir, "trained", metrics)
