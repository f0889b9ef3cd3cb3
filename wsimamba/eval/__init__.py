"""Cohort evaluation: reading run folders, ROC / confusion / calibration plots, attention heatmaps."""

from wsimamba.eval.report import FoldPredictions, Run, RunError, load_run

__all__ = ["FoldPredictions", "Run", "RunError", "load_run"]
