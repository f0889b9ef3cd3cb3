"""pipelines/: the Camelyon16 recipe and the SLURM jobs, run on tiny synthetic data with the public CLI.

Where SLURM is missing the jobs run locally (their documented fallback) or print their commands (DRY_RUN=1).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXTRACT_ARGS

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
CLI = f"{sys.executable} -m wsimamba"


def bash(script: Path, *args, env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(WSIMAMBA=CLI, PYTHON=sys.executable, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(["bash", str(script), *map(str, args)], env=e, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def camelyon_like(cohort, tmp_path_factory):
    """The session's 4 synthetic slides under Camelyon16 names (as links), two of them again as test slides."""
    root, slides = cohort
    c16 = tmp_path_factory.mktemp("camelyon16")
    tumor = [s for s in slides if s.label == 1]
    normal = [s for s in slides if s.label == 0]
    layout = {"training/tumor/tumor_001": tumor[0], "training/tumor/tumor_002": tumor[1],
              "training/normal/normal_001": normal[0], "training/normal/normal_002": normal[1],
              "testing/images/test_001": tumor[1], "testing/images/test_002": normal[0]}
    for name, s in layout.items():
        (c16 / name).parent.mkdir(parents=True, exist_ok=True)
        (c16 / f"{name}.svs").symlink_to(s.path)
    (c16 / "reference.csv").write_text("test_001,Tumor,Macro,None\r\ntest_002,Normal,,\r\n")
    return c16


C16_ENV = {
    "RANDOM_INIT": "1", "ENCODER": "timm:test_resnet", "TARGET_MPP": "2.0", "PATCH_SIZE": "64", "DEVICE": "cpu",
    "WORKERS": "0", "BATCH_SIZE": "16", "EXTRACT_EXTRA": "--no-qc", "HEATMAPS": "2",
    "TRAIN_SET": "model.d_model=16 model.d_state=4 model.expand=1 data.workers=0 data.preload=true train.folds=3 "
                 "train.val_fraction=0 train.early_stopping.enabled=false train.max_epochs=2 train.min_epochs=0",
}


def test_camelyon16_recipe_end_to_end(camelyon_like, tmp_path):
    out = tmp_path / "study"
    proc = bash(PIPELINES / "camelyon16.sh", camelyon_like, camelyon_like / "reference.csv", out, env=C16_ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    labels = {r["slide_id"]: r["label"] for r in rows(out / "labels.csv")}
    assert labels == {"tumor_001": "tumor", "tumor_002": "tumor", "normal_001": "normal", "normal_002": "normal",
                      "test_001": "tumor", "test_002": "normal"}
    assert len(list((out / "features").glob("*.h5"))) == 6
    run = out / "runs" / "camelyon16-lbmambamil"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "lbmambamil" and cfg["train"]["folds"] == 3  # camelyon.yaml + TRAIN_SET
    assert json.loads((run / "summary.json").read_text())["folds_done"] == [0, 1, 2]
    assert (run / "eval" / "roc.png").is_file()
    assert sorted(p.stem for p in (run / "heatmaps").glob("*.png")) == ["test_001", "tumor_001"]
    # the official split: train on training/, test on testing/, reusing the extracted features
    proc = bash(PIPELINES / "camelyon16.sh", camelyon_like, camelyon_like / "reference.csv", out,
                env={**C16_ENV, "SPLIT": "official", "NAME": "official", "HEATMAPS": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "6 already done" in proc.stdout
    split = rows(out / "runs" / "official" / "splits.csv")
    assert sorted(r["slide_id"] for r in split if r["part"] == "test") == ["test_001", "test_002"]


def test_camelyon16_recipe_refuses_unknown_names(camelyon_like, tmp_path):
    odd = tmp_path / "slides"
    odd.mkdir()
    (odd / "patient7.svs").symlink_to((camelyon_like / "training/tumor/tumor_001.svs").resolve())
    proc = bash(PIPELINES / "camelyon16.sh", odd, camelyon_like / "reference.csv", tmp_path / "o", env=C16_ENV)
    assert proc.returncode == 1 and "patient7.svs: not a Camelyon16 slide name" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = bash(PIPELINES / "camelyon16.sh", tmp_path / "empty", camelyon_like / "reference.csv", tmp_path / "e",
                env=C16_ENV)
    assert proc.returncode == 1 and "no .tif/.tiff/.svs slides" in proc.stderr
    ref = tmp_path / "ref.csv"
    ref.write_text("test_002,Normal,,\n")  # test_001 unlisted
    proc = bash(PIPELINES / "camelyon16.sh", camelyon_like, ref, tmp_path / "r", env=C16_ENV)
    assert proc.returncode == 1 and "has no Tumor/Normal label for test_001" in proc.stderr


def test_extract_array_job_covers_the_cohort_shard_by_shard(cohort, tmp_path):
    root, slides = cohort
    args = [root / "slides", tmp_path / "f", *EXTRACT_ARGS, "--workers", "0", "--no-qc"]
    dry = bash(PIPELINES / "slurm" / "extract_array.sbatch", *args,
               env={"DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert dry.returncode == 0 and "extract" in dry.stdout and "--shard 3/4" in dry.stdout
    local = bash(PIPELINES / "slurm" / "extract_array.sbatch", *args, env={"LOCAL_SHARDS": "3"})
    assert local.returncode == 0, local.stderr[-2000:]
    manifest = rows(tmp_path / "f" / "manifest.csv")
    assert sorted(r["slide_id"] for r in manifest) == sorted(s.slide_id for s in slides)
    assert all(r["status"] == "ok" for r in manifest)
    assert local.stdout.count("extracted") == 3  # three shards, one process each


def test_multinode_train_job(bag_cohort, tmp_path):
    _, feats, labels = bag_cohort
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "ddp", "data": {"features": str(feats), "labels": str(labels)},
                                   "model": {"name": "abmil", "d_model": 16}, "train": {"folds": 2, "max_epochs": 2},
                                   "out": str(tmp_path / "runs")}))
    script = PIPELINES / "slurm" / "train_multinode.sbatch"
    dry = bash(script, cfg, "train.lr=1e-3",
               env={"DRY_RUN": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:4"})
    assert dry.returncode == 0
    assert dry.stdout.startswith("srun ") and "train.devices=4 train.num_nodes=2 train.strategy=ddp" in dry.stdout
    assert "train.lr=1e-3" in dry.stdout
    # no scheduler here: two local processes through torchrun, DDP over gloo on the CPU
    proc = bash(script, cfg, env={"LOCAL_PROCS": "2"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("fold 0: training on") == 1  # only rank 0 reports
    run = tmp_path / "runs" / "ddp"
    assert json.loads((run / "summary.json").read_text())["folds_done"] == [0, 1]
    assert len(rows(run / "fold_0" / "predictions.csv")) + len(rows(run / "fold_1" / "predictions.csv")) == 30
