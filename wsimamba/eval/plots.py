"""Cohort plots as PNG (matplotlib, Agg): ROC curves, confusion matrix, calibration."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import auc as _auc  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from wsimamba.atomic import atomic_path  # noqa: E402
from wsimamba.eval.report import Run  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_figure(run: Run):
    """Binary: one ROC curve per fold, their vertical mean, chance. Multi-class: one-vs-rest per class
    on the pooled test predictions."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    if len(run.classes) == 2:
        grid = np.linspace(0, 1, 201)
        tprs = []
        for f in run.folds:
            if len(np.unique(f.y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(f.y, f.probs[:, 1])
            ax.plot(fpr, tpr, lw=1, alpha=0.6, label=f"fold {f.fold} (AUC {_auc(fpr, tpr):.3f})")
            tprs.append(np.interp(grid, fpr, tpr))
            tprs[-1][0] = 0.0
        if tprs:
            mean = np.mean(tprs, 0)
            mean[-1] = 1.0
            ax.plot(grid, mean, color="k", lw=2, label=f"mean (AUC {_auc(grid, mean):.3f})")
        title = f"ROC, positive class {run.classes[1]!r}"
    else:
        y, p = run.y, run.probs
        for c, name in enumerate(run.classes):
            if (y == c).any() and (y != c).any():
                fpr, tpr, _ = roc_curve(y == c, p[:, c])
                ax.plot(fpr, tpr, lw=1.5, label=f"{name} vs rest (AUC {_auc(fpr, tpr):.3f})")
        title = "ROC one-vs-rest, pooled test predictions"
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"{run.config.name}: {title}")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def confusion_figure(run: Run):
    """Confusion matrix of the pooled test predictions (argmax), counts and row shares."""
    cm = confusion_matrix(run.y, run.probs.argmax(1), labels=list(range(len(run.classes))))
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(run.classes) + 2.8, 1.2 * len(run.classes) + 2.2))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    ticks = range(len(run.classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=run.classes, yticklabels=run.classes,
           xlabel="predicted", ylabel="true", title=f"{run.config.name}: confusion (all folds' test parts)")
    return fig


def calibration_figure(run: Run, bins: int = 5):
    """Reliability diagram of the positive (binary) or predicted (multi-class) class probability."""
    fig, ax = plt.subplots(figsize=(5, 5))
    y, p = run.y, run.probs
    if len(run.classes) == 2:
        target, conf, what = (y == 1), p[:, 1], f"P({run.classes[1]})"
    else:
        pred = p.argmax(1)
        target, conf, what = (y == pred), p.max(1), "confidence of the predicted class"
    if len(np.unique(target)) > 1:
        frac, mean = calibration_curve(target, conf, n_bins=bins, strategy="quantile")
        ax.plot(mean, frac, "o-", label=f"{run.config.name}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfectly calibrated")
    ax.set(xlabel=f"mean predicted {what}", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title="calibration (pooled test predictions)")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def write_plots(run: Run, out_dir: str | Path | None = None) -> dict[str, Path]:
    """roc.png, confusion.png and calibration.png in `out_dir` (default RUN_DIR/eval)."""
    out = Path(out_dir) if out_dir is not None else run.path / "eval"
    return {
        "roc": _save(roc_figure(run), out / "roc.png"),
        "confusion": _save(confusion_figure(run), out / "confusion.png"),
        "calibration": _save(calibration_figure(run), out / "calibration.png"),
    }
