"""Session fixtures for the MIL training tests: small bag cohorts and trained run folders.

Imported at the end of tests/conftest.py so that every test module shares one instance of each.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

# Tiny models on tiny bags run fastest on one thread; two threads on a shared 2-core machine spin.
ONE_THREAD = 1

TINY_MODEL = ["model.name=abmil", "model.d_model=16", "model.attn_dim=8"]
TINY_TRAIN = ["train.folds=3", "train.max_epochs=4", "train.lr=2e-3", "train.early_stopping.patience=3"]


def cases_for(n: int) -> list[str]:
    """Case ids for n slides: slides 0-1, 4-5, 8-9, … share a patient (two slides per case)."""
    return [f"pair_{i // 2:03d}" if (i // 2) % 2 == 0 else f"solo_{i:03d}" for i in range(n)]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bag_cohort(tmp_path_factory):
    """30 planted-witness bags (16-d, 40-80 instances) as wsimamba HDF5 files + labels.csv.

    Slides 0-1, 4-5, 8-9, … belong to one case each (two slides per patient), the others to their own.
    Returns (root, features dir, labels.csv).
    """
    from wsimamba.data.synthetic import witness_bags, write_cohort

    root = tmp_path_factory.mktemp("bags")
    data = witness_bags(30, dim=16, instances=(40, 80), witness_fraction=(0.08, 0.15), shift=5.0, seed=3)
    feats, labels = write_cohort(root, data, cases=cases_for(30), classes=("normal", "tumor"))
    return root, feats, labels


def train_args(features: Path, labels: Path, out: Path, name: str = "tiny", *extra: str) -> list[str]:
    return ["train", "--set", f"name={name}", f"data.features={features}", f"data.labels={labels}", f"out={out}",
            *TINY_MODEL, *TINY_TRAIN, *extra, "--no-progress"]


@pytest.fixture(scope="session")
def tiny_run(bag_cohort, tmp_path_factory):
    """A 3-fold abmil run on bag_cohort, trained through the CLI. Returns the run folder."""
    from wsimamba.cli import main

    _, feats, labels = bag_cohort
    out = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)
    try:
        assert main([str(a) for a in train_args(feats, labels, out)]) == 0
    finally:
        torch.set_num_threads(before)
    return out / "tiny"


@pytest.fixture(scope="session")
def slide_run(cohort, tmp_path_factory):
    """Features of the session's synthetic slides and a 2-fold abmil run on them (for heatmaps and the
    notebook). Returns (cohort root, features dir, run folder)."""
    from tests.conftest import EXTRACT_ARGS
    from wsimamba.cli import main

    root, slides = cohort
    work = tmp_path_factory.mktemp("slide_run")
    feats = work / "features"
    # one case per slide: with the cohort's two-slide case, four slides cannot make two stratified folds
    labels = work / "labels.csv"
    labels.write_text("slide_id,case_id,label\n" + "".join(f"{s.slide_id},{s.slide_id},{s.label}\n" for s in slides))
    assert main(["extract", str(root / "slides"), "--out", str(feats), *EXTRACT_ARGS, "--workers", "0", "--no-qc"]) == 0
    before = torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)
    try:
        code = main(["train", "--set", "name=slides", f"data.features={feats}", f"data.labels={labels}",
                     f"out={work / 'runs'}", *TINY_MODEL, "train.folds=2", "train.val_fraction=0",
                     "train.early_stopping.enabled=false", "train.max_epochs=3", "--no-progress"])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return root, feats, work / "runs" / "slides"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
