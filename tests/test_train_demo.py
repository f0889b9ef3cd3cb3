"""`wsimamba demo` chains synth → extract → train → eval → heatmaps (here on a shrunken cohort)."""

from __future__ import annotations

import json
import re

from wsimamba.cli import main
from wsimamba.train import demo as spec


def test_demo_runs_every_step_and_reports_what_it_measured(tmp_path, monkeypatch, capsys, one_thread):
    # the real demo takes minutes (README); the same code path on 8 small slides and a tiny encoder
    monkeypatch.setattr(spec, "COHORT", dict(n=8, size=(1536, 1536), mpp=0.5, seed=1, tumor_fraction=(0.2, 0.3)))
    monkeypatch.setattr(spec, "EXTRACT", dict(encoder="timm:test_resnet", target_mpp=2.0, patch_size=64, batch_size=16))
    tiny = json.loads(json.dumps(spec.TRAIN))
    tiny["model"] = {"name": "lbmambamil", "d_model": 16, "d_state": 4, "expand": 1}
    tiny["train"] = {"folds": 2, "val_fraction": 0.0, "max_epochs": 2, "early_stopping": {"enabled": False}}
    monkeypatch.setattr(spec, "TRAIN", tiny)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--slides", "8", "--device", "cpu", "--workers", "0", "--heatmaps", "2"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM-INIT" in text
    assert re.search(r"demo finished in \d+\.\d min \(synth \d+ s, extract \d+ s, train \d+ s", text)
    summary = json.loads((out / "runs" / "demo" / "summary.json").read_text())
    auc = summary["metrics"]["auc"]
    assert f"cross-validated AUC {auc['mean']:.3f} ± {auc['std']:.3f} over 2 folds (8 slides)" in text
    assert len(list((out / "features").glob("*.h5"))) == 8
    assert (out / "runs" / "demo" / "eval" / "roc.png").is_file()
    assert len(list((out / "runs" / "demo" / "heatmaps").glob("*.png"))) == 2
    for where in ("cohort:", "features:", "run:", "plots:", "heatmaps:"):
        assert where in text
    # a second call reuses the cohort, the features and the finished folds
    assert main(["demo", "--out", str(out), "--slides", "8", "--device", "cpu", "--workers", "0", "--heatmaps", "0"]) == 0
    again = capsys.readouterr().out
    assert "0 extracted" in again and "8 already done" in again and "done earlier" in again
