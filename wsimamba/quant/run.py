"""`wsimamba quantize`: quantize every fold of a run folder and compare with the float model.

For each fold with a checkpoint: calibrate on ``calib_slides`` training slides of that fold (from
splits.csv, a seeded choice), evaluate the float model and each method on the fold's test slides,
and write (default ``RUN_DIR/quant/``)::

    quant_table.csv       fold,method,w_bits,a_bits,n_calib,n_test,auc,accuracy,balanced_accuracy,f1,mean_abs_dprob,seconds
    quant_summary.json    per method: mean ± std over folds of each metric, and the settings
    quant_summary.md      the same as a markdown table
    fold_<k>/<method>_w<w>a<a>.pt   the quantized model: {"format", "quant", "hparams", "state_dict", ...};
                                    :func:`load_quantized_checkpoint` reads it back

``mean_abs_dprob`` is the mean |P(class) − P_float(class)| over test slides and classes: how far the
quantized model's probabilities moved. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from wsimamba.atomic import atomic_path, write_text_atomic
from wsimamba.errors import QuantError
from wsimamba.quant.model import load_quantized_state, quantize_model
from wsimamba.quant.spec import METHODS, QuantSpec

FORMAT = "wsimamba-quant/1"
COLUMNS = ("fold", "method", "w_bits", "a_bits", "n_calib", "n_test", "auc", "accuracy", "balanced_accuracy", "f1",
           "mean_abs_dprob", "seconds")


@dataclass
class QuantRunResult:
    out_dir: Path
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)


def check_run_dir(run_dir: str | Path):
    """The run folder's TrainConfig; QuantError naming the folder when it is not a complete run folder."""
    return _read_run(Path(run_dir))


def _read_run(run_dir: Path):
    from wsimamba.config import TrainConfig, build_config

    if not run_dir.is_dir():
        raise QuantError(f"{run_dir}: no such run folder")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise QuantError(f"{run_dir}: not a run folder (no config.yaml); give a folder written by `wsimamba train`")
    if not (run_dir / "splits.csv").is_file():
        raise QuantError(f"{run_dir / 'splits.csv'}: missing; the run folder is incomplete")
    return build_config(TrainConfig, yaml.safe_load(cfg_path.read_text()) or {}, where=str(cfg_path))


def _load_module(path: Path):
    from wsimamba.train.module import MILModule

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        module = MILModule(**state["hyper_parameters"])
        module.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError, OSError, TypeError) as e:
        raise QuantError(f"{path}: not a readable MIL checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return module.eval()


def load_quantized_checkpoint(path: str | Path, map_location: str = "cpu"):
    """A quantized MILModule from a file written by :func:`quantize_run` (forward(x) → MILOutput)."""
    from wsimamba.train.module import MILModule

    path = Path(path)
    if not path.is_file():
        raise QuantError(f"{path}: no such quantized checkpoint")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise QuantError(f"{path}: not a wsimamba quantized checkpoint (format {FORMAT!r} expected)")
    module = MILModule(**state["hparams"])
    return load_quantized_state(module, state["quant"], state["state_dict"])


def _predict(model, dataset, indices, device) -> np.ndarray:
    from wsimamba.train.run import predict_bags

    probs, _ = predict_bags(model, dataset, indices, device, "32-true")
    return probs


def _markdown(summary: dict) -> str:
    lines = [f"# Quantization of {summary['run']}", "",
             f"W{summary['w_bits']}A{summary['a_bits']}, activations per {summary['granularity']}, "
             f"{summary['calib_slides']} calibration slide(s) per fold, {summary['folds']} fold(s), device {summary['device']}.",
             "", "| method | AUC | accuracy | balanced accuracy | F1 | mean abs Δp |", "|---|---|---|---|---|---|"]

    def pm(m):
        return "n/a" if m["mean"] is None else f"{m['mean']:.3f} ± {m['std']:.3f}"

    for method, m in summary["methods"].items():
        lines.append(f"| {method} | {pm(m['auc'])} | {pm(m['accuracy'])} | {pm(m['balanced_accuracy'])} | "
                     f"{pm(m['f1'])} | {pm(m['mean_abs_dprob'])} |")
    return "\n".join(lines) + "\n"


def quantize_run(run_dir: str | Path, methods: tuple[str, ...] = METHODS, calib_slides: int = 8, w_bits: int = 8,
                 a_bits: int = 8, out: str | Path | None = None, device: str = "cpu", granularity: str = "tensor",
                 percentile: float = 99.99, alpha: float = 0.5, seed: int = 0,
                 on_event: Callable[[str, dict], None] | None = None) -> QuantRunResult:
    """Quantize every completed fold of `run_dir` with each of `methods` (module docstring).

    `on_event(kind, info)`: "start" {folds, methods, steps}, "step" {fold, method, metrics} after the
    float evaluation ("float") and after each method, for the caller's progress bar.
    """
    from wsimamba.data.bags import BagDataset
    from wsimamba.data.splits import load_splits
    from wsimamba.train.metrics import METRICS, cohort_metrics, mean_std
    from wsimamba.train.run import load_cohort

    emit = on_event or (lambda kind, info: None)
    run_dir = Path(run_dir)
    methods = tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise QuantError(f"method: expected one of {', '.join(METHODS)} or all, got {m!r}")
    if calib_slides < 1:
        raise QuantError(f"calib_slides: expected at least 1, got {calib_slides}")
    specs = {m: QuantSpec(m, w_bits, a_bits, granularity, percentile, alpha, seed) for m in methods}
    cfg = _read_run(run_dir)
    cohort = load_cohort(cfg)
    folds = load_splits(run_dir / "splits.csv", cohort.table)
    done = [f for f in folds if (run_dir / f"fold_{f.index}" / "checkpoint.ckpt").is_file()]
    if not done:
        raise QuantError(f"{run_dir}: no fold_<k>/checkpoint.ckpt; train the run first")
    out_dir = Path(out) if out is not None else run_dir / "quant"
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dataset = BagDataset(cohort.source, cohort.table.slide_ids, cohort.table.labels, preload=False)
    table = cohort.table
    emit("start", {"folds": [f.index for f in done], "methods": methods, "steps": len(done) * (1 + len(methods)),
                   "device": str(dev)})
    result = QuantRunResult(out_dir)
    for fold in done:
        module = _load_module(run_dir / f"fold_{fold.index}" / "checkpoint.ckpt")
        rng = np.random.default_rng(seed + fold.index)
        calib_idx = [fold.train[i] for i in sorted(rng.permutation(len(fold.train))[:calib_slides])]
        batches = [dataset[i]["features"][None] for i in calib_idx]
        y = table.labels[fold.test]
        t0 = time.perf_counter()
        p_float = _predict(module, dataset, fold.test, dev)
        row = {"fold": fold.index, "method": "float", "w_bits": 32, "a_bits": 32, "n_calib": 0, "n_test": len(y),
               **cohort_metrics(y, p_float), "mean_abs_dprob": 0.0, "seconds": round(time.perf_counter() - t0, 3)}
        result.rows.append(row)
        emit("step", {"fold": fold.index, "method": "float", "metrics": row})
        module.to(dev)
        for method, spec in specs.items():
            t0 = time.perf_counter()
            q = quantize_model(module, batches, **spec.to_dict())
            probs = _predict(q, dataset, fold.test, dev)
            row = {"fold": fold.index, "method": method, "w_bits": w_bits, "a_bits": a_bits,
                   "n_calib": len(batches), "n_test": len(y), **cohort_metrics(y, probs),
                   "mean_abs_dprob": float(np.abs(probs - p_float).mean()),
                   "seconds": round(time.perf_counter() - t0, 3)}
            result.rows.append(row)
            path = out_dir / f"fold_{fold.index}" / f"{method}_w{w_bits}a{a_bits}.pt"
            payload = {"format": FORMAT, "quant": spec.to_dict(), "hparams": dict(module.hparams),
                       "state_dict": {k: v.detach().cpu() for k, v in q.state_dict().items()},
                       "fold": fold.index, "float_checkpoint": str(run_dir / f"fold_{fold.index}" / "checkpoint.ckpt"),
                       "calibration_slides": [table.slide_ids[i] for i in calib_idx], "test_metrics": row}
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
            result.checkpoints.append(path)
            emit("step", {"fold": fold.index, "method": method, "metrics": row})
            del q

    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text_atomic(out_dir / "quant_table.csv", buf.getvalue())
    names = ("float",) + methods
    result.summary = {
        "run": str(run_dir), "w_bits": w_bits, "a_bits": a_bits, "granularity": granularity,
        "percentile": percentile, "alpha": alpha, "seed": seed, "calib_slides": calib_slides,
        "folds": len(done), "device": str(dev),
        "methods": {n: {k: mean_std([r[k] for r in result.rows if r["method"] == n])
                        for k in (*METRICS, "mean_abs_dprob")} for n in names},
        "std": "sample standard deviation over folds (ddof=1)",
    }
    write_text_atomic(out_dir / "quant_summary.json", json.dumps(result.summary, indent=2) + "\n")
    write_text_atomic(out_dir / "quant_summary.md", _markdown(result.summary))
    return result
