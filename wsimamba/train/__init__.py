"""Training: the MIL LightningModule and DataModule, cohort metrics, and the cross-validated run."""

from wsimamba.train.metrics import cohort_metrics, mean_std
from wsimamba.train.run import RunResult, load_cohort, predict_bags, train_run

__all__ = ["RunResult", "cohort_metrics", "load_cohort", "mean_std", "predict_bags", "train_run"]
