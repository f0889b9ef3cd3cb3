"""`wsimamba eval` and `wsimamba heatmap`: tables, plots, attention over slides, tumor localisation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from wsimamba.cli import main
from wsimamba.eval.heatmap import localisation, patch_tumor_fraction, score_map


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_eval_prints_folds_and_summary_and_writes_pngs(tiny_run, capsys):
    assert run_cli("eval", tiny_run) == 0
    out = capsys.readouterr().out
    summary = json.loads((tiny_run / "summary.json").read_text())
    auc = summary["metrics"]["auc"]
    assert f"{auc['mean']:.3f} ± {auc['std']:.3f}" in out and "pooled" in out
    for k in range(3):
        m = json.loads((tiny_run / f"fold_{k}" / "metrics.json").read_text())["test"]
        assert f"{m['auc']:.3f}" in out
    for name in ("roc", "confusion", "calibration"):
        img = Image.open(tiny_run / "eval" / f"{name}.png")
        assert img.format == "PNG" and min(img.size) > 200
        assert np.asarray(img.convert("L")).std() > 10  # something is drawn


def test_eval_of_a_partial_run(tiny_run, tmp_path, capsys):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    (run / "fold_2" / "metrics.json").unlink()
    assert run_cli("eval", run, "--out", tmp_path / "plots") == 0
    captured = capsys.readouterr()
    assert "1 of 3 fold(s) not complete" in captured.err and (tmp_path / "plots" / "roc.png").is_file()
    for k in range(2):
        (run / f"fold_{k}" / "metrics.json").unlink()
    assert run_cli("eval", run) == 1
    assert "no completed fold" in capsys.readouterr().err
    assert run_cli("eval", tmp_path / "nothing") == 1
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err


def test_patch_tumor_fraction_matches_counting_pixels():
    rng = np.random.default_rng(0)
    mask = rng.random((50, 70)) < 0.3
    coords = rng.integers(0, 2000, (40, 2))
    size0, ds = 96, 32.0
    fast = patch_tumor_fraction(coords, size0, mask, ds)
    for (x, y), f in zip(coords, fast):  # the slow reference: count the mask pixels under the patch
        x0, y0 = int(np.floor(x / ds)), int(np.floor(y / ds))
        x1, y1 = int(np.ceil((x + size0) / ds)), int(np.ceil((y + size0) / ds))
        sub = mask[min(y0, 50):min(y1, 50), min(x0, 70):min(x1, 70)]
        expect = sub.sum() / max((min(x1, 70) - min(x0, 70)) * (min(y1, 50) - min(y0, 50)), 1)
        assert f == pytest.approx(expect)


def test_score_map_paints_each_patch_square():
    coords = np.array([[0, 0], [256, 0], [512, 256]])
    heat = score_map((4, 8), coords, 256, 128.0, np.array([0.1, 0.5, 0.9]))
    assert np.allclose(heat[0:2, 0:2], 0.1) and np.allclose(heat[0:2, 2:4], 0.5) and np.allclose(heat[2:4, 4:6], 0.9)
    assert np.isnan(heat[2:4, 0:4]).all() and np.isnan(heat[:, 6:]).all()


def test_localisation_numbers():
    tumor = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    perfect = localisation(np.array([0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]), tumor, True)
    assert perfect["patch_auc"] == 1 and perfect["precision_at_k"] == 1 and perfect["chance_precision"] == 0.25
    assert perfect["attention_in_tumor"] == pytest.approx(0.7)
    wrong = localisation(np.linspace(0, 1, 8), tumor, False)
    assert wrong["patch_auc"] == 0 and wrong["precision_at_k"] == 0 and wrong["attention_in_tumor"] is None
    none = localisation(np.ones(8) / 8, np.zeros(8, bool), True)
    assert none["tumor_patches"] == 0 and none["patch_auc"] is None


def test_heatmaps_on_synthetic_slides(slide_run, cohort, capsys, tmp_path):
    root, feats, run = slide_run
    _, slides = cohort
    tumor = [s for s in slides if s.label == 1]
    args = ["heatmap", run]
    for s in slides:
        args += ["--slide", s.path]
    assert run_cli(*args, "--thumb-size", 256) == 0
    out = capsys.readouterr().out
    for s in slides:
        png, js = run / "heatmaps" / f"{s.slide_id}.png", run / "heatmaps" / f"{s.slide_id}.json"
        assert Image.open(png).format == "PNG"
        rec = json.loads(js.read_text())
        assert rec["held_out"] and rec["label"] == ("1" if s.label else "0")
        assert rec["patch_size_level0"] == 256 and sum(rec["probs"].values()) == pytest.approx(1, abs=1e-5)
        loc = rec["localisation"]  # masks/<id>.png beside slides/ is found by itself
        assert loc is not None and loc["patches"] == rec["patches"]
        if s.label == 0:
            assert loc["tumor_patches"] == 0
        assert s.slide_id in out
    assert any(json.loads((run / "heatmaps" / f"{s.slide_id}.json").read_text())["localisation"]["tumor_patches"]
               for s in tumor)
    assert "tumor localisation: patch AUC" in out
    # without a mask there is nothing to localise against; a fold that does not exist is an error
    lone = tmp_path / "slides"
    lone.mkdir()
    shutil.copy(tumor[0].path, lone / tumor[0].path.name)
    assert run_cli("heatmap", run, "--slide", lone / tumor[0].path.name, "--out", tmp_path / "h", "--fold", 1) == 0
    assert json.loads((tmp_path / "h" / f"{tumor[0].slide_id}.json").read_text())["localisation"] is None
    assert run_cli("heatmap", run, "--slide", tumor[0].path, "--fold", 7) == 1
    assert "fold 7 is not complete" in capsys.readouterr().err
