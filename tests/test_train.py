"""`wsimamba train`: the run folder, overrides and errors, resume / repeat, failures, configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from tests.fixtures_train import TINY_MODEL, read_csv, train_args
from wsimamba.cli import main
from wsimamba.config import load_train_config
from wsimamba.train.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_run_folder_holds_what_design_md_says(tiny_run, bag_cohort):
    _, feats, labels = bag_cohort
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "abmil" and cfg["model"]["d_model"] == 16  # the --set overrides
    assert Path(cfg["data"]["features"]).is_absolute() and Path(cfg["data"]["features"]) == feats.resolve()
    assert json.loads((tiny_run / "classes.json").read_text())["classes"] == ["normal", "tumor"]
    seen = []
    for k in range(3):
        fold = tiny_run / f"fold_{k}"
        assert (fold / "checkpoint.ckpt").is_file() and (fold / "logs" / "metrics.csv").is_file()
        logged = read_csv(fold / "logs" / "metrics.csv")
        train_epochs = {int(r["epoch"]) for r in logged if r.get("train_loss")}
        assert train_epochs == {int(r["epoch"]) for r in logged if r.get("val_auc")} and len(train_epochs) >= 1
        rows = read_csv(fold / "predictions.csv")
        assert list(rows[0]) == ["slide_id", "case_id", "label", "pred", "prob_normal", "prob_tumor"]
        probs = np.array([[float(r["prob_normal"]), float(r["prob_tumor"])] for r in rows])
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        y = np.array([r["label"] == "tumor" for r in rows])
        m = json.loads((fold / "metrics.json").read_text())
        assert m["test"]["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-6)
        assert m["precision"] == "32-true" and m["n_test"] == len(rows)
        seen += [r["slide_id"] for r in rows]
    assert sorted(seen) == sorted(r["slide_id"] for r in read_csv(labels))  # every slide tested once
    s = json.loads((tiny_run / "summary.json").read_text())
    assert s["folds_done"] == [0, 1, 2]
    for key in METRICS:
        vals = [json.loads((tiny_run / f"fold_{k}" / "metrics.json").read_text())["test"][key] for k in range(3)]
        assert s["metrics"][key]["mean"] == pytest.approx(np.mean(vals))
        assert s["metrics"][key]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert not list(tiny_run.rglob(".*partial*"))


def test_no_case_on_two_sides(tiny_run):
    rows = read_csv(tiny_run / "splits.csv")
    for k in {r["fold"] for r in rows}:
        sides: dict[str, set] = {}
        for r in rows:
            if r["fold"] == k:
                sides.setdefault(r["case_id"], set()).add(r["part"])
        assert all(len(parts) == 1 for parts in sides.values())
    # the cohort has two-slide cases, so this checks something
    assert len({r["case_id"] for r in rows}) < len({r["slide_id"] for r in rows})


@pytest.mark.parametrize("override, message", [
    ("model.nmae=abmil", "unknown key 'model.nmae'"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("model.rate=4", "model.rate does not apply to 'abmil'"),
    ("data.format=tiff", "data.format: Input should be"),
])
def test_bad_overrides_are_one_line_errors(bag_cohort, tmp_path, capsys, override, message):
    _, feats, labels = bag_cohort
    assert run_cli(*train_args(feats, labels, tmp_path, "bad", override)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "bad").exists()


def test_cfg_file_plus_set(bag_cohort, tmp_path, capsys):
    _, feats, labels = bag_cohort
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "fromfile", "data": {"features": str(feats), "labels": str(labels)},
                                   "model": {"name": "meanpool", "d_model": 8}, "train": {"folds": 2, "max_epochs": 1},
                                   "out": str(tmp_path)}))
    # --set takes several key=value pairs; the last word wins over the file
    assert run_cli("train", "--cfg", cfg, "--set", "model.d_model=12", "train.val_fraction=0.25", "--no-progress") == 0
    saved = yaml.safe_load((tmp_path / "fromfile" / "config.yaml").read_text())
    assert saved["model"] == {**saved["model"], "name": "meanpool", "d_model": 12}
    assert saved["train"]["val_fraction"] == 0.25
    assert run_cli("train", "--cfg", tmp_path / "nope.yaml") == 1
    assert "nope.yaml: no such config file" in capsys.readouterr().err


def test_resume_skips_done_folds_and_repeats_a_deleted_one_exactly(tiny_run, bag_cohort, tmp_path, one_thread):
    _, feats, labels = bag_cohort
    work = tmp_path / "runs"
    shutil.copytree(tiny_run, work / "tiny")
    fold0 = work / "tiny" / "fold_0" / "metrics.json"
    stamp = fold0.stat().st_mtime_ns
    shutil.rmtree(work / "tiny" / "fold_1")
    (work / "tiny" / "summary.json").unlink()
    assert run_cli(*train_args(feats, labels, work)) == 0
    assert fold0.stat().st_mtime_ns == stamp  # done earlier: not retrained
    # the repeated fold gives the same predictions, to the printed digit (same seed, same splits, CPU)
    assert (work / "tiny" / "fold_1" / "predictions.csv").read_text() == (tiny_run / "fold_1" / "predictions.csv").read_text()
    assert json.loads((work / "tiny" / "summary.json").read_text())["metrics"] == \
        json.loads((tiny_run / "summary.json").read_text())["metrics"]


def test_changed_config_is_refused_until_overwrite(tiny_run, bag_cohort, tmp_path, capsys):
    _, feats, labels = bag_cohort
    work = tmp_path / "runs"
    shutil.copytree(tiny_run, work / "tiny")
    assert run_cli(*train_args(feats, labels, work, "tiny", "train.max_epochs=1")) == 1
    err = capsys.readouterr().err
    assert "holds a run with another config (train.max_epochs: 4 → 1)" in err and "--overwrite" in err
    assert run_cli(*train_args(feats, labels, work, "tiny", "train.max_epochs=1"), "--overwrite") == 0
    assert all(json.loads((work / "tiny" / f"fold_{k}" / "metrics.json").read_text())["epochs"] == 1 for k in range(3))


def test_splits_from_another_run(tiny_run, bag_cohort, tmp_path):
    _, feats, labels = bag_cohort
    args = train_args(feats, labels, tmp_path, "again", f"train.splits_from={tiny_run}", "train.max_epochs=1",
                      "train.seed=5")
    assert run_cli(*args) == 0
    assert (tmp_path / "again" / "splits.csv").read_text() == (tiny_run / "splits.csv").read_text()


def test_missing_features_are_listed_or_skipped(bag_cohort, tmp_path, capsys):
    _, feats, labels = bag_cohort
    more = tmp_path / "labels.csv"
    more.write_text(labels.read_text() + "lost_1,lost_case,tumor\nlost_2,lost_case2,normal\n")
    assert run_cli(*train_args(feats, more, tmp_path, "m", "train.max_epochs=1")) == 1
    err = capsys.readouterr().err
    assert "2 of 32 labelled slides have no feature file" in err and "lost_1, lost_2" in err and "--skip-missing" in err
    assert run_cli(*train_args(feats, more, tmp_path, "m", "train.max_epochs=1"), "--skip-missing") == 0
    captured = capsys.readouterr()
    assert "skipped 2 labelled slide(s) without features: lost_1, lost_2" in captured.err
    assert len(read_csv(tmp_path / "m" / "splits.csv")) == 3 * 30


def test_nan_loss_stops_the_fold_with_a_message(bag_cohort, tmp_path, capsys):
    _, feats, labels = bag_cohort
    # a learning rate this large overflows the weights within a few steps
    args = train_args(feats, labels, tmp_path, "nan", "train.lr=1e30", "train.folds=2", "train.max_epochs=3",
                      "train.scheduler=none")
    assert run_cli(*args) == 1
    err = capsys.readouterr().err
    assert "fold 0 stopped: the training loss became nan" in err and "train.lr" in err
    assert "rerun the same command to retry" in err
    assert (tmp_path / "nan" / "fold_0" / "failed.txt").is_file()
    assert not (tmp_path / "nan" / "fold_0" / "metrics.json").exists()


def test_preloaded_and_lazy_bags_train_the_same(bag_cohort, tmp_path, one_thread):
    _, feats, labels = bag_cohort
    preds = {}
    for preload in ("true", "false"):
        out = tmp_path / preload
        assert run_cli(*train_args(feats, labels, out, "p", "train.folds=2", "train.max_epochs=2",
                                   f"data.preload={preload}")) == 0
        preds[preload] = [(out / "p" / f"fold_{k}" / "predictions.csv").read_text() for k in range(2)]
    assert preds["true"] == preds["false"]


def test_multiclass_with_string_labels(tmp_path, one_thread):
    """Three classes: none, A-type or B-type witnesses."""
    from wsimamba.data.synthetic import SyntheticBags, write_cohort

    rng = np.random.default_rng(0)
    dirs = np.eye(8, dtype=np.float32) * 5
    bags, labels = [], []
    for i in range(36):
        c = i % 3
        x = rng.standard_normal((30, 8)).astype(np.float32)
        if c:
            x[rng.choice(30, 4, replace=False)] += dirs[c]
        bags.append(x)
        labels.append(c)
    feats, lab = write_cohort(tmp_path, SyntheticBags(bags, np.array(labels), []), prefix="mc")
    text = lab.read_text().replace(",0\n", ",benign\n").replace(",1\n", ",typeA\n").replace(",2\n", ",typeB\n")
    lab.write_text(text)
    args = ["train", "--set", "name=mc", f"data.features={feats}", f"data.labels={lab}", f"out={tmp_path}", *TINY_MODEL,
            "train.folds=3", "train.max_epochs=12", "train.lr=5e-3", "--no-progress"]
    assert run_cli(*args) == 0
    rows = read_csv(tmp_path / "mc" / "fold_0" / "predictions.csv")
    assert {"prob_benign", "prob_typeA", "prob_typeB"} <= set(rows[0])
    s = json.loads((tmp_path / "mc" / "summary.json").read_text())
    assert s["classes"] == ["benign", "typeA", "typeB"]
    assert s["pooled"]["auc"] > 0.8  # macro one-vs-rest
    assert run_cli("eval", tmp_path / "mc") == 0  # one-vs-rest ROC, 3 × 3 confusion matrix
    assert (tmp_path / "mc" / "eval" / "confusion.png").is_file()


def test_max_instances_subsamples_in_patch_order():
    import torch

    from wsimamba.train.module import MILModule

    module = MILModule("meanpool", 4, 2, {"d_model": 8}, max_instances=10)
    x = torch.arange(50, dtype=torch.float32)[None, :, None].expand(1, 50, 4)
    sub = module._subsample(x)
    kept = sub[0, :, 0]
    assert sub.shape == (1, 10, 4) and (kept.diff() > 0).all()  # a sorted subset: order survives
    assert module._subsample(x[:, :7]).shape[1] == 7


def test_shipped_configs_validate():
    cam = load_train_config(ROOT / "configs" / "camelyon.yaml")
    assert cam.model.name == "lbmambamil" and cam.train.folds == 5 and cam.train.precision == "auto"
    assert cam.model.d_model == 512 and cam.train.max_epochs >= 50
    from wsimamba.train.demo import TRAIN

    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()) == TRAIN
    from wsimamba.train.run import resolve_precision

    assert resolve_precision("auto", "cpu") == "32-true"


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("n_bags, bad_step, with_val, epoch, steps_run, val_steps_run", [
    (40, 5, False, 0, 32, 0),   # found at the check every 32 steps, not at once
    (40, 36, False, 0, 40, 0),  # found at the end of the epoch
    (10, 12, True, 1, 20, 2),   # found before the second validation runs
])
def test_nan_loss_names_the_first_step_when_checked_later(one_thread, n_bags, bad_step, with_val, epoch, steps_run,
                                                          val_steps_run):
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from wsimamba.train.module import MILModule, NonFiniteLossError
    from wsimamba.train.run import _quiet_lightning

    g = torch.Generator().manual_seed(0)
    bags = [{"features": torch.randn(6, 4, generator=g), "label": i % 2} for i in range(n_bags)]
    counts = {"train": 0, "val": 0}

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            counts["train"] += 1
            if trainer.global_step == bad_step:
                batch["features"].fill_(float("nan"))

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            counts["val"] += 1

    module = MILModule("meanpool", 4, 2, {"d_model": 8}, max_epochs=3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Poison()])
    val = DataLoader(bags[:2], batch_size=1) if with_val else None
    with _quiet_lightning(), pytest.raises(NonFiniteLossError,
                                           match=f"became nan at epoch {epoch}, step {bad_step} .*train.lr"):
        trainer.fit(module, DataLoader(bags, batch_size=1), val)
    assert counts == {"train": steps_run, "val": val_steps_run}


def test_train_loss_is_each_epochs_mean_over_its_bags(one_thread):
    """train_loss is summed on the device and logged once an epoch: the mean of that epoch's step losses."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from wsimamba.train.module import MILModule
    from wsimamba.train.run import _quiet_lightning

    g = torch.Generator().manual_seed(1)
    bags = [{"features": torch.randn(5 + i, 4, generator=g), "label": i % 2} for i in range(7)]
    steps, logged = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            steps.append((trainer.current_epoch, float(outputs["loss"])))

        # the module logs it in its own on_train_epoch_end, which Lightning calls after the callbacks' one
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch:
                logged.append(float(trainer.callback_metrics["train_loss"]))

        def on_train_end(self, trainer, module):
            logged.append(float(trainer.callback_metrics["train_loss"]))

    module = MILModule("meanpool", 4, 2, {"d_model": 8}, max_epochs=3, lr=1e-2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    with _quiet_lightning():
        trainer.fit(module, DataLoader(bags, batch_size=1, collate_fn=lambda b: {
            "features": b[0]["features"][None], "label": torch.tensor([b[0]["label"]])}))
    want = [np.mean([loss for e, loss in steps if e == epoch]) for epoch in range(3)]
    assert len(steps) == 21 and logged == pytest.approx(want, rel=1e-6)
    assert len(set(logged)) == 3  # the model learns: the three epochs differ
