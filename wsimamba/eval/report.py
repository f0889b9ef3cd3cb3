"""Reading a run folder back: config, classes, splits, per-fold predictions and metrics, summary."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from wsimamba.config import TrainConfig, build_config
from wsimamba.errors import WsimambaError
from wsimamba.train.metrics import METRICS, cohort_metrics, mean_std


class RunError(WsimambaError):
    """A run folder is missing, incomplete or malformed."""


@dataclass
class FoldPredictions:
    """One fold's test predictions. y int (n,) class indices; probs (n, C)."""

    fold: int
    slide_ids: list[str]
    case_ids: list[str]
    y: np.ndarray
    probs: np.ndarray
    metrics: dict = field(default_factory=dict)  # metrics.json
    path: Path | None = None


@dataclass
class Run:
    """A run folder read back (see ``wsimamba.train.run`` for the layout)."""

    path: Path
    config: TrainConfig
    classes: list[str]
    folds: list[FoldPredictions]
    n_folds: int
    splits: dict[int, dict[str, list[str]]]  # fold → part → slide ids

    @property
    def y(self) -> np.ndarray:
        return np.concatenate([f.y for f in self.folds])

    @property
    def probs(self) -> np.ndarray:
        return np.concatenate([f.probs for f in self.folds])

    def fold_of(self, slide_id: str) -> int | None:
        """The fold whose test part holds `slide_id`, or None."""
        for k, parts in self.splits.items():
            if slide_id in parts.get("test", []):
                return k
        return None

    def checkpoint(self, fold: int) -> Path:
        path = self.path / f"fold_{fold}" / "checkpoint.ckpt"
        if not path.is_file():
            raise RunError(f"{path}: no checkpoint (is fold {fold} complete?)")
        return path

    def summary(self) -> dict:
        """Mean ± std over the completed folds and the pooled metrics (as summary.json)."""
        per_fold = [cohort_metrics(f.y, f.probs) for f in self.folds]
        return {
            "metrics": {k: mean_std([m[k] for m in per_fold]) for k in METRICS},
            "pooled": cohort_metrics(self.y, self.probs) if self.folds else None,
            "per_fold": per_fold,
        }


def load_run(path: str | Path) -> Run:
    """Read a run folder; folds without metrics.json (not finished) are left out."""
    path = Path(path)
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise RunError(f"{path}: not a run folder (no config.yaml)")
    cfg = build_config(TrainConfig, yaml.safe_load(cfg_path.read_text()) or {}, where=str(cfg_path))
    classes_path = path / "classes.json"
    if not classes_path.is_file():
        raise RunError(f"{classes_path}: missing")
    classes = json.loads(classes_path.read_text())["classes"]
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[int, dict[str, list[str]]] = {}
    if (path / "splits.csv").is_file():
        with open(path / "splits.csv", newline="") as f:
            for row in csv.DictReader(f):
                splits.setdefault(int(row["fold"]), {}).setdefault(row["part"], []).append(row["slide_id"])
    folds = []
    for k in sorted(splits) or range(1000):
        fold_dir = path / f"fold_{k}"
        if not (fold_dir / "metrics.json").is_file():
            if not splits and not fold_dir.exists():
                break
            continue
        sids, cids, ys, ps = [], [], [], []
        with open(fold_dir / "predictions.csv", newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    ys.append(index[row["label"]])
                    ps.append([float(row[f"prob_{c}"]) for c in classes])
                except (KeyError, ValueError) as e:
                    raise RunError(f"{fold_dir / 'predictions.csv'}, line {line}: bad row ({e})") from None
                sids.append(row["slide_id"])
                cids.append(row.get("case_id", ""))
        folds.append(FoldPredictions(k, sids, cids, np.array(ys, np.int64), np.array(ps).reshape(-1, len(classes)),
                                     json.loads((fold_dir / "metrics.json").read_text()), fold_dir))
    if not folds:
        raise RunError(f"{path}: no completed fold (no fold_<k>/metrics.json); train it first")
    return Run(path, cfg, classes, folds, max(len(splits), len(folds)), splits)
