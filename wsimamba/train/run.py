"""`wsimamba train`: cross-validated MIL training into a run folder.

Run folder (``<out>/<name>/``)::

    config.yaml          the resolved config (absolute paths)
    classes.json         class names in index order (binary: the second is positive)
    splits.csv           fold,part,slide_id,case_id,label for every fold
    fold_<k>/checkpoint.ckpt   the best epoch by validation AUC (ties: lower validation loss)
    fold_<k>/predictions.csv   slide_id,case_id,label,pred,prob_<class>… on the fold's test part
    fold_<k>/metrics.json      test metrics, epochs, timing; written last: its presence marks the fold done
    fold_<k>/logs/metrics.csv  Lightning's CSV log (train_loss, val_loss, val_auc per epoch)
    summary.json         mean ± std over folds of AUC, accuracy, balanced accuracy, F1

A rerun skips folds that have metrics.json and trains the rest with the saved splits, so an
interrupted run resumes and a deleted fold is repeated exactly (same seed, same splits; on CPU
bit-for-bit). A different config for the same run folder is an error unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from wsimamba.config import TrainConfig
from wsimamba.data.bags import BagDataset, FeatureSource
from wsimamba.data.labels import LabelTable, read_labels
from wsimamba.data.splits import Fold, column_splits, kfold_splits, load_splits, save_splits
from wsimamba.errors import ConfigError, FeatureStoreError, WsimambaError
from wsimamba.train.metrics import METRICS, cohort_metrics, mean_std
from wsimamba.train.module import NonFiniteLossError
from wsimamba.atomic import write_text_atomic

# Keys that change where or how fast a run computes, not what it computes: a resumed run may differ in them.
_NON_RESULT_KEYS = {("data", "preload"), ("data", "workers"), ("data", "skip_missing"), ("data", "gpu_cache"),
                    ("model", "impl"), ("train", "cuda_graphs"), ("train", "devices"), ("train", "accelerator"), ("train", "strategy"),
                    ("train", "num_nodes"), ("out",)}
# Keys added after run folders were written, with the value that computes what those runs computed.
_ADDED_KEYS = {("train", "batch_size"): 1}


@dataclass
class FoldResult:
    fold: int
    status: str  # "trained", "done" (found complete), "failed"
    metrics: dict | None = None
    message: str = ""


@dataclass
class RunResult:
    run_dir: Path
    folds: list[FoldResult] = field(default_factory=list)
    summary: dict | None = None
    missing: list[str] = field(default_factory=list)


def global_rank() -> int:
    """This process's rank among all training processes (0 when not distributed)."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


# ---------------------------------------------------------------------------------------------
# cohort


@dataclass
class Cohort:
    table: LabelTable
    source: FeatureSource
    missing: list[str]


def load_cohort(cfg: TrainConfig) -> Cohort:
    """labels.csv restricted to slides with features; missing ones are an error unless skip_missing."""
    table = read_labels(cfg.data.labels, cfg.data.classes)
    source = FeatureSource(cfg.data.features, cfg.data.format)
    present = [i for i, sid in enumerate(table.slide_ids) if source.exists(sid)]
    missing = [sid for i, sid in enumerate(table.slide_ids) if i not in set(present)]
    if missing and not cfg.data.skip_missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FeatureStoreError(
            f"{len(missing)} of {len(table)} labelled slides have no feature file in {source.dir} "
            f"({source.layout} layout): {shown}; extract them or pass --skip-missing"
        )
    if not present:
        raise FeatureStoreError(f"none of the slides in {table.path} has a feature file in {source.dir}")
    return Cohort(table.subset(present) if missing else table, source, missing)


def _diff(a, b, prefix=()) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = prefix + (k,)
            if key in _NON_RESULT_KEYS:
                continue
            out += _diff(a.get(k), b.get(k), key)
        return out
    return [] if a == b else [f"{'.'.join(prefix)}: {a!r} → {b!r}"]


def _prepare_run_dir(cfg: TrainConfig, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if overwrite and run_dir.exists() and global_rank() == 0:
        if not saved.is_file():
            raise ConfigError(f"{run_dir} exists and holds no config.yaml: not a run folder, will not delete it")
        shutil.rmtree(run_dir)
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        old.setdefault("task", "mil")  # run folders written before the task switch existed
        for (section, key), value in _ADDED_KEYS.items():
            if isinstance(old.get(section), dict):
                old[section].setdefault(key, value)
        changes = _diff(old, cfg.model_dump(mode="json"))
        if changes:
            raise ConfigError(
                f"{run_dir} holds a run with another config ({'; '.join(changes[:4])}); "
                "use another name, or --overwrite to start it again"
            )
    return run_dir


def _make_folds(cfg: TrainConfig, cohort: Cohort, run_dir: Path) -> list[Fold]:
    saved = run_dir / "splits.csv"
    if saved.is_file():
        return load_splits(saved, cohort.table)
    if cfg.train.splits_from is not None:
        return load_splits(cfg.train.splits_from, cohort.table)
    if cfg.train.split == "column":
        return column_splits(cohort.table, cfg.train.val_fraction, cfg.train.seed)
    return kfold_splits(cohort.table, cfg.train.folds, cfg.train.val_fraction, cfg.train.seed)


# ---------------------------------------------------------------------------------------------
# one fold


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's own log lines and a few advisory warnings are noise for a CLI run of many folds."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (".*does not have many workers.*", ".*number of training batches.*log_every_n_steps.*",
                        ".*`isinstance\\(treespec, LeafSpec\\)`.*", ".*Checkpoint directory.*exists and is not empty.*",
                        ".*LeafSpec.*", ".*srun.*", ".*Precision 16-mixed is not supported.*"):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)


@torch.no_grad()
def predict_bags(model: torch.nn.Module, dataset: BagDataset, indices: list[int], device: torch.device,
                 precision: str = "32-true", batch_size: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, C) and per-patch attention (list of (N_i,)) for `indices`, one bag at a time,
    or `batch_size` bags at a time through ``model.forward_bags`` (packed where the model takes it).

    `model` maps raw features (1, N, D) to a MILOutput (a MILModule, which standardises them first).

    A plain loop rather than ``Trainer.predict``: it runs on rank 0 only after a distributed fit,
    where a Trainer would shard the test bags over ranks.
    """
    model.eval().to(device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16}.get(precision)
    probs, attn = [], []
    for at in range(0, len(indices), batch_size):
        bags = [dataset[i]["features"].to(device) for i in indices[at:at + batch_size]]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(bags[0][None]) if batch_size == 1 else model.forward_bags(bags)
        p, a = torch.softmax(out.logits.float(), -1).cpu().numpy(), out.attention.float().cpu().numpy()
        for row, bag in enumerate(bags):
            probs.append(p[row])
            attn.append(a[row, : bag.shape[0]])
    return np.stack(probs), attn


def _predictions_csv(table: LabelTable, idx: list[int], probs: np.ndarray) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "case_id", "label", "pred"] + [f"prob_{c}" for c in table.classes])
    for i, p in zip(idx, probs):
        w.writerow([table.slide_ids[i], table.case_ids[i], table.classes[table.labels[i]], table.classes[int(p.argmax())]]
                   + [f"{v:.6f}" for v in p])
    return buf.getvalue()


def _train_fold(cfg: TrainConfig, cohort: Cohort, dataset: BagDataset, fold: Fold, fold_dir: Path,
                progress_bar: bool) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from wsimamba.train.datamodule import MILDataModule
    from wsimamba.train.module import MILModule, balanced_class_weights, feature_stats

    t = cfg.train
    table = cohort.table
    n_classes = len(table.classes)
    has_val = bool(fold.val)
    L.seed_everything(t.seed + fold.index, workers=True, verbose=False)
    weights = balanced_class_weights(table.labels[fold.train], n_classes) if t.class_weights == "balanced" else None
    module = MILModule(cfg.model.name, dataset.in_dim, n_classes, cfg.model.kwargs(), lr=t.lr,
                       weight_decay=t.weight_decay, scheduler=t.scheduler, max_epochs=t.max_epochs,
                       class_weights=weights, max_instances=cfg.data.max_instances, normalize=cfg.data.normalize,
                       cuda_graphs=t.cuda_graphs, batch_size=t.batch_size)
    if cfg.data.normalize:
        module.set_feature_stats(*feature_stats(dataset[i]["features"] for i in fold.train))
    dm = MILDataModule(dataset, fold.train, fold.val, fold.test, workers=cfg.data.workers, seed=t.seed + fold.index,
                       gpu_cache=cfg.data.gpu_cache, batch_size=t.batch_size)
    es = t.early_stopping
    monitor, mode = ("val_select", "max") if es.monitor == "val_auc" else ("val_loss", "min")
    callbacks = []
    stopper = None
    if has_val:
        ckpt = ModelCheckpoint(dirpath=fold_dir, filename="checkpoint", monitor=monitor, mode=mode, save_top_k=1,
                               enable_version_counter=False, auto_insert_metric_name=False)
        if es.enabled:
            stopper = EarlyStopping(monitor=monitor, mode=mode, patience=es.patience, min_delta=es.min_delta,
                                    check_finite=True)
            callbacks.append(stopper)
    else:  # nothing to choose an epoch with: keep the last
        ckpt = ModelCheckpoint(dirpath=fold_dir, filename="checkpoint", save_top_k=1, save_last=False,
                               enable_version_counter=False)
    callbacks.append(ckpt)
    if progress_bar:
        callbacks.append(RichProgressBar(leave=False))
    precision = resolve_precision(t.precision, t.accelerator)
    trainer = L.Trainer(
        max_epochs=t.max_epochs, min_epochs=t.min_epochs, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=precision, deterministic=t.deterministic,
        logger=CSVLogger(fold_dir, name="logs", version=""), callbacks=callbacks,
        enable_progress_bar=progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if has_val else 0, log_every_n_steps=max(1, min(50, len(fold.train))),
        gradient_clip_val=t.grad_clip, accumulate_grad_batches=t.accumulate, default_root_dir=fold_dir,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return {}
    best = ckpt.best_model_path
    if not best or not Path(best).is_file():
        raise WsimambaError(f"fold {fold.index}: no checkpoint was written in {fold_dir}")
    state = torch.load(best, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    device = trainer.strategy.root_device  # the fit may have moved the model back to the CPU
    probs, _ = predict_bags(module, dataset, fold.test, device, precision, t.batch_size)
    y = table.labels[fold.test]
    write_text_atomic(fold_dir / "predictions.csv", _predictions_csv(table, fold.test, probs))
    best_epoch = int(state.get("epoch", trainer.current_epoch))
    ckpt_name = fold_dir / "checkpoint.ckpt"
    if Path(best) != ckpt_name:
        os.replace(best, ckpt_name)
    return {
        "fold": fold.index,
        "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
        "epochs": trainer.current_epoch, "best_epoch": best_epoch,
        "stopped_early": bool(stopper is not None and stopper.stopped_epoch > 0),
        "best_val": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "monitor": monitor if has_val else None,
        "seconds": round(seconds, 2),
        "precision": precision,
        "test": cohort_metrics(y, probs),
    }


# ---------------------------------------------------------------------------------------------
# the run


def summarize(cfg: TrainConfig, classes: list[str], fold_metrics: list[dict], n_folds: int, run_dir: Path) -> dict:
    """summary.json's content: mean ± std over completed folds, plus the metrics of all test
    predictions pooled (each slide appears in one test part)."""
    ys, ps = [], []
    index = {c: i for i, c in enumerate(classes)}
    import csv

    for m in fold_metrics:
        with open(run_dir / f"fold_{m['fold']}" / "predictions.csv", newline="") as f:
            for row in csv.DictReader(f):
                ys.append(index[row["label"]])
                ps.append([float(row[f"prob_{c}"]) for c in classes])
    return {
        "name": cfg.name,
        "model": cfg.model.name,
        "classes": classes,
        "folds": n_folds,
        "folds_done": sorted(m["fold"] for m in fold_metrics),
        "metrics": {k: mean_std([m["test"][k] for m in fold_metrics]) for k in METRICS},
        "pooled": cohort_metrics(np.array(ys), np.array(ps)) if ys else None,
        "std": "sample standard deviation over folds (ddof=1)",
    }


def train_run(cfg: TrainConfig, overwrite: bool = False, progress_bar: bool = False,
              on_event: Callable[[str, dict], None] | None = None) -> RunResult:
    """Train every fold of `cfg` that is not complete yet; write the run folder (module docstring).

    `on_event(kind, info)` is called with kind "start" (cohort facts), "fold_start", "fold_skip",
    "fold_done", "fold_failed" for the caller to report. A fold whose loss turns non-finite is
    recorded as failed (no metrics.json, so a rerun retries it) and the other folds go on.

    A ClassifyConfig (`task: classify`) goes to :func:`wsimamba.train.classify.classify_run` instead,
    which returns a ClassifyResult and reports its own events.
    A SegmentConfig (`task: segment`) goes to :func:`wsimamba.train.segment.segment_run`, which returns
    a SegmentResult.
    """
    if getattr(cfg, "task", "mil") == "classify":
        from wsimamba.train.classify import classify_run

        return classify_run(cfg, overwrite=overwrite, progress_bar=progress_bar, on_event=on_event)
    if getattr(cfg, "task", "mil") == "segment":
        from wsimamba.train.segment import segment_run

        return segment_run(cfg, overwrite=overwrite, progress_bar=progress_bar, on_event=on_event)
    cfg = cfg.resolved()
    rank0 = global_rank() == 0
    # every rank of a distributed run executes this function; only rank 0 reports
    emit = on_event if (on_event is not None and rank0) else (lambda kind, info: None)
    run_dir = _prepare_run_dir(cfg, overwrite)
    cohort = load_cohort(cfg)
    table = cohort.table
    folds = _make_folds(cfg, cohort, run_dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        write_text_atomic(run_dir / "classes.json", json.dumps({"classes": table.classes}, indent=2) + "\n")
        if not (run_dir / "splits.csv").is_file():
            save_splits(run_dir / "splits.csv", table, folds)
    dataset = BagDataset(cohort.source, table.slide_ids, table.labels, preload=cfg.data.preload)
    emit("start", {"run_dir": run_dir, "slides": len(table), "cases": len(set(table.case_ids)),
                   "classes": table.class_counts(), "missing": cohort.missing, "folds": len(folds),
                   "in_dim": dataset.in_dim, "layout": cohort.source.layout, "features": cohort.source.dir})
    result = RunResult(run_dir, missing=cohort.missing)
    done: list[dict] = []
    for fold in folds:
        fold_dir = run_dir / f"fold_{fold.index}"
        marker = fold_dir / "metrics.json"
        if marker.is_file():
            metrics = json.loads(marker.read_text())
            done.append(metrics)
            result.folds.append(FoldResult(fold.index, "done", metrics))
            emit("fold_skip", {"fold": fold.index, "metrics": metrics})
            continue
        if rank0 and fold_dir.exists():  # leftovers of an interrupted attempt
            shutil.rmtree(fold_dir)
        fold_dir.mkdir(parents=True, exist_ok=True)
        emit("fold_start", {"fold": fold.index, "n_train": len(fold.train), "n_val": len(fold.val),
                            "n_test": len(fold.test)})
        try:
            with _quiet_lightning():
                metrics = _train_fold(cfg, cohort, dataset, fold, fold_dir, progress_bar)
        except NonFiniteLossError as e:
            msg = f"fold {fold.index} stopped: {e}"
            if rank0:
                write_text_atomic(fold_dir / "failed.txt", msg + "\n")
            result.folds.append(FoldResult(fold.index, "failed", None, msg))
            emit("fold_failed", {"fold": fold.index, "message": msg})
            continue
        if not rank0:
            continue
        write_text_atomic(marker, json.dumps(metrics, indent=2) + "\n")
        done.append(metrics)
        result.folds.append(FoldResult(fold.index, "trained", metrics))
        emit("fold_done", {"fold": fold.index, "metrics": metrics})
    if rank0 and done:
        result.summary = summarize(cfg, table.classes, done, len(folds), run_dir)
        result.summary["failed"] = [f.message for f in result.folds if f.status == "failed"]
        write_text_atomic(run_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    _end_distributed()
    return result


def _end_distributed() -> None:
    """Wait for rank 0's last predictions, then take the process group down: a rank that exits with
    the group alive can abort in the communication library's threads (seen with gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
