"""Cohort metrics with scikit-learn: AUC, accuracy, balanced accuracy, F1; mean ± std over folds."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def cohort_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """y int (n,) class indices; probs (n, C) class probabilities. Predictions are the argmax.

    Binary: AUC of the last class's probability, F1 of the last (positive) class. Multi-class:
    one-vs-rest macro AUC and macro F1. AUC is NaN when `y` holds a single class.
    """
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    if len(np.unique(y)) < 2:
        auc = float("nan")
    elif n_classes == 2:
        auc = float(roc_auc_score(y, probs[:, 1]))
    else:
        present = np.unique(y)
        if len(present) < n_classes:  # OvR AUC only over the classes present
            p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
            auc = float(roc_auc_score(np.searchsorted(present, y), p, multi_class="ovr", average="macro")) \
                if len(present) > 2 else float(roc_auc_score(y == present[1], p[:, 1]))
        else:
            auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))
    f1 = f1_score(y, pred, average="binary" if n_classes == 2 else "macro", pos_label=1,
                  labels=list(range(n_classes)), zero_division=0)
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "f1": float(f1),
    }


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) over the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "values": values}
    arr = np.array(finite)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": values}
