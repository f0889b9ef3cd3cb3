"""Segmentation (`wsimamba train` with task: segment, `wsimamba tiles`, `wsimamba segment`): metrics against
hand-computed cases, configs, tile cutting from synthetic slides, 2D/3D datasets, the run folder, stitching,
and each Mamba segmenter learning tumour on synthetic pathology tiles."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.fixtures_train import ONE_THREAD
from wsimamba.cli import main
from wsimamba.config import ClassifyConfig, SegmentConfig, TrainConfig, load_train_config
from wsimamba.data.segmentation import SegmentationDataError, SegmentationDataset, find_pairs
from wsimamba.errors import ConfigError
from wsimamba.eval.segmentation import SegmentationMetrics, hd95
from wsimamba.models.seg import list_segmenters, register_segmenter

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("lightm_unet", "msvm_unet", "mhs_vmunet")

# Tiny settings of each network for CPU tests (from the segmentation-networks handoff,
# /tmp/handoff/seg_small.md); `reduction` of each must divide the tile size used below (32).
TINY = {
    "lightm_unet": ["channels=[8,16,32,64]", "blocks=[1,1,1,1]", "d_state=4"],
    "msvm_unet": ["dims=16", "depths=[1,1,1,1]", "decoder_depths=[1,1,1]", "d_state=2", "patch_size=2",
                  "mlp_ratio=2.0", "decoder_mlp_ratio=2.0", "drop_path_rate=0.0"],
    "mhs_vmunet": ["dims=16", "depths=[1,1,1,1]", "decoder_depths=[1,1,1,1]", "heads=4", "d_state=4", "patch_size=2",
                   "drop_path_rate=0.0"],
}

# peak learning rate of the short held-out run (LightM-UNet's validation Dice swung at 4e-3)
HELD_OUT_LR = {"lightm_unet": 2e-3, "msvm_unet": 4e-3, "mhs_vmunet": 4e-3}


# ---------------------------------------------------------------------------------------------
# a tiny conv net for the pipeline tests (the Mamba networks are tested at the end)


class TinySeg(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 2, width: int = 8):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.net = nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(), conv(width, width, 3, padding=1),
                                 nn.ReLU(), conv(width, num_classes, 1))
        self.reduction, self.spatial_dims = 4, spatial_dims  # 4: exercises the padding of odd sizes

    def forward(self, x):
        assert all(s % 4 == 0 for s in x.shape[2:]), x.shape
        return self.net(x)


if "test_tiny_conv" not in list_segmenters():
    @register_segmenter("test_tiny_conv", "two 3×3 convolutions (tests only)")
    def _tiny(in_channels, num_classes, spatial_dims=2, width=8):
        return TinySeg(in_channels, num_classes, spatial_dims, width)


def run_cli(*args) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(before)


def seg_args(root: Path, out: Path, name: str, model: str, *extra: str) -> list[str]:
    return ["train", "--set", "task=segment", f"name={name}", f"data.root={root}", f"out={out}", f"model.name={model}",
            "data.workers=0", *extra, "--no-progress"]


# ---------------------------------------------------------------------------------------------
# metrics


def test_dice_and_iou_match_hand_computed_counts():
    pred = torch.zeros(2, 8, 8, dtype=torch.long)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    pred[0, :4] = 1    # 32 tumour pixels predicted
    target[0, :2] = 1  # 16 true, all inside the prediction
    m = SegmentationMetrics(2, hd95=False)
    rows = m.update(pred, target)
    out = m.compute(["background", "tumor"])
    t, b = out["per_class"]["tumor"], out["per_class"]["background"]
    assert t["dice"] == pytest.approx(2 * 16 / (32 + 16))
    assert t["iou"] == pytest.approx(16 / 32)
    # background: 96 predicted, 112 true, 96 shared (over both images)
    assert b["dice"] == pytest.approx(2 * 96 / (96 + 112))
    assert b["iou"] == pytest.approx(96 / 112)
    assert out["mean_dice"] == pytest.approx(t["dice"])  # mean over foreground classes
    assert t["pixel_share"] == pytest.approx(16 / 128)
    assert t["constant_dice"] == pytest.approx(2 * 16 / (16 + 128))
    assert rows[0]["dice"][1] == pytest.approx(2 / 3)
    assert math.isnan(rows[1]["dice"][1])  # no tumour in image 1, none predicted: undefined, not 0


def test_hd95_of_known_shapes():
    a = np.zeros((300, 300), bool)
    a[50:250, 50:250] = True
    for k in (1, 3, 5):
        shifted = np.zeros_like(a)
        shifted[50:250, 50 + k:250 + k] = True
        assert hd95(shifted, a) == pytest.approx(k)  # two squares offset by k pixels
        grown = np.zeros_like(a)
        grown[50 - k:250 + k, 50 - k:250 + k] = True
        assert hd95(grown, a) == pytest.approx(k)  # every edge k away; only the corners are farther …
        assert hd95(grown, a, percentile=100) == pytest.approx(k * math.sqrt(2))  # … and they set the maximum
    p, t = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    p[0, 0], t[3, 4] = True, True
    assert hd95(p, t) == pytest.approx(5.0)  # a 3-4-5 triangle
    assert hd95(p, t, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(6, 4))  # anisotropic pixels
    assert hd95(np.zeros_like(p), np.zeros_like(t)) == 0.0
    assert math.isnan(hd95(p, np.zeros_like(t)))
    c1, c2 = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    c1[5:12, 5:12, 5:12], c2[7:14, 5:12, 5:12] = True, True
    assert hd95(c1, c2) == pytest.approx(2.0)  # 3D cubes offset by 2 voxels


def test_hd95_max_equals_torchmetrics_hausdorff():
    """At the 100th percentile our surface distances give torchmetrics' Hausdorff distance."""
    from torchmetrics.functional.segmentation import hausdorff_distance

    rng = np.random.default_rng(0)
    for _ in range(3):
        a = np.zeros((40, 40), bool)
        b = np.zeros((40, 40), bool)
        y, x = rng.integers(5, 20, 2)
        a[y:y + 12, x:x + 15] = True
        y, x = rng.integers(5, 20, 2)
        b[y:y + 9, x:x + 18] = True
        ref = hausdorff_distance(torch.tensor(a)[None].long(), torch.tensor(b)[None].long(), num_classes=2,
                                 input_format="index")
        assert hd95(a, b, percentile=100) == pytest.approx(float(ref.flatten()[-1]), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# configs


def test_segment_config_validation_and_other_tasks_still_load(tmp_path):
    base = ["task=segment", "name=s", f"data.root={tmp_path}", "model.name=test_tiny_conv"]
    cfg = load_train_config(None, base)
    assert isinstance(cfg, SegmentConfig) and cfg.data.num_classes == 2 and cfg.model.kwargs() == {}
    assert cfg.data.class_names() == ["background", "tumor"]
    with pytest.raises(ConfigError, match="unknown key 'data.bogus'"):
        load_train_config(None, base + ["data.bogus=1"])
    with pytest.raises(ConfigError, match="model.depth does not apply to 'test_tiny_conv'"):
        load_train_config(None, base + ["model.depth=3"])
    with pytest.raises(ConfigError, match="unknown segmentation model 'nope'"):
        load_train_config(None, base + ["model.name=nope"])
    with pytest.raises(ConfigError, match="data.augment.crop has 2 sides for spatial_dims 3"):
        load_train_config(None, base + ["data.spatial_dims=3", "data.augment.crop=[8,8]"])
    with pytest.raises(ConfigError, match="model.num_classes is set from the data config"):
        load_train_config(None, base + ["model.num_classes=3"])
    with pytest.raises(ConfigError, match="task: must be 'mil', 'classify' or 'segment'"):
        load_train_config(None, ["task=segmentation", "name=s"])
    assert isinstance(load_train_config(ROOT / "configs" / "demo.yaml"), TrainConfig)
    assert isinstance(load_train_config(ROOT / "configs" / "food_demo.yaml"), ClassifyConfig)


@pytest.mark.parametrize("name", ["seg_demo", "seg_lightm_unet", "seg_msvm_unet", "seg_mhs_vmunet"])
def test_shipped_segment_configs_load(name):
    import yaml

    path = ROOT / "configs" / f"{name}.yaml"
    model = yaml.safe_load(path.read_text())["model"]["name"]
    if model not in list_segmenters():
        pytest.skip(f"{model} is not registered yet")
    cfg = load_train_config(path)
    assert isinstance(cfg, SegmentConfig) and cfg.task == "segment"


# ---------------------------------------------------------------------------------------------
# tiles from synthetic slides


@pytest.fixture(scope="module")
def seg_cohort(tmp_path_factory):
    """Eight 1536-px slides at 0.5 µm/px (half with tumour on 30-50 % of their tissue), masks at
    downsample 16, cut by `wsimamba tiles` into 32-px tiles at 2 µm/px (8 mask pixels per tile side)."""
    from wsimamba.slide.synth import synth_cohort

    root = tmp_path_factory.mktemp("segcohort")
    synth_cohort(root / "cohort", 8, seed=3, fmt="svs", size=(1536, 1536), mpp=0.5, size_jitter=0.0,
                 tumor_fraction=(0.3, 0.5), mask_downsample=16)
    tiles = root / "tiles"
    rc = run_cli("tiles", root / "cohort" / "slides", root / "cohort" / "masks", tiles, "--mpp", "2.0", "--size", "32",
                 "--min-tissue", "0.5", "--max-per-slide", "40", "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert rc == 0
    return root / "cohort", tiles


def _index(tiles: Path) -> list[dict]:
    with open(tiles / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiles_masks_agree_with_the_slide_masks_and_split_by_slide(seg_cohort):
    cohort, tiles = seg_cohort
    rows = _index(tiles)
    assert len(rows) > 100
    meta = json.loads((tiles / "tiles.json").read_text())
    assert meta["mpp"] == 2.0 and meta["size"] == 32
    for r in rows[::5]:
        img = np.asarray(Image.open(tiles / r["image"]))
        tile_mask = np.asarray(Image.open(tiles / r["mask"]))
        assert img.shape == (32, 32, 3) and tile_mask.shape == (32, 32)
        slide_mask = np.asarray(Image.open(cohort / "masks" / f"{r['slide']}.png"))
        x, y = int(r["x"]) // 16, int(r["y"]) // 16  # a tile is 128 level-0 px = 8 mask px; 4 tile px per mask px
        expected = slide_mask[y:y + 8, x:x + 8]
        assert np.array_equal(tile_mask[2::4, 2::4], expected), r["image"]
        assert np.array_equal(tile_mask, np.kron(expected, np.ones((4, 4), np.uint8)))
        assert float(r["tumor_fraction"]) == pytest.approx((expected > 0).mean())
    parts_of_slide: dict[str, set] = {}
    for r in rows:
        parts_of_slide.setdefault(r["slide"], set()).add(r["split"])
    assert all(len(p) == 1 for p in parts_of_slide.values())  # held-out tiles come from other slides
    for part in ("train", "val", "test"):
        assert any(r["split"] == part and float(r["tumor_fraction"]) > 0 for r in rows), part
    labels = {r["slide_id"]: r["case_id"] for r in csv.DictReader(open(cohort / "labels.csv"))}
    cases: dict[str, set] = {}
    for r in rows:
        assert r["case_id"] == labels[r["slide"]]
        cases.setdefault(r["case_id"], set()).add(r["split"])
    assert all(len(p) == 1 for p in cases.values())  # and from other patients


def test_tiles_names_a_slide_without_mask(seg_cohort, tmp_path, capsys):
    cohort, _ = seg_cohort
    masks = tmp_path / "masks"
    shutil.copytree(cohort / "masks", masks)
    (masks / "synth_002.png").unlink()
    rc = run_cli("tiles", cohort / "slides", masks, tmp_path / "out", "--mpp", "2.0", "--size", "32")
    err = capsys.readouterr().err
    assert rc == 1
    assert "synth_002.svs has no tumour mask" in err and str(masks / "synth_002.png") in err
    assert len(err.strip().splitlines()) == 1 or "error:" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "index.csv").exists()


def test_tiles_infers_the_mask_downsample_without_metadata(seg_cohort, tmp_path):
    from wsimamba.slide.reader import open_slide
    from wsimamba.slide.segtiles import load_slide_mask

    cohort, _ = seg_cohort
    plain = tmp_path / "synth_000.png"
    Image.fromarray(np.asarray(Image.open(cohort / "masks" / "synth_000.png"))).save(plain)  # no text chunk
    with open_slide(cohort / "slides" / "synth_000.svs") as slide:
        m = load_slide_mask(plain, slide)
    assert (m.scale_x, m.scale_y) == (16.0, 16.0) and m.source.startswith("inferred")


# ---------------------------------------------------------------------------------------------
# datasets


def _write_pairs_2d(root: Path, n: int = 3, size=(20, 28)) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray((rng.random(size) > 0.5).astype(np.uint8) * 255).save(root / "masks" / f"im{i}.png")


def test_2d_pairs_load_and_errors_name_the_file(tmp_path):
    root = tmp_path / "d2"
    _write_pairs_2d(root)
    splits = find_pairs(root, val_fraction=0.34)
    assert splits.counts() == {"train": 2, "val": 1, "test": 0}
    ds = SegmentationDataset(splits["train"], 2, 2)
    item = ds[0]
    assert item["image"].shape == (3, 20, 28) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (20, 28) and set(item["mask"].unique().tolist()) <= {0, 1}  # 0/255 → 0/1
    (root / "masks" / "im1.png").unlink()
    with pytest.raises(SegmentationDataError, match=r"im1\.png: no mask for this image"):
        find_pairs(root)
    Image.fromarray(np.full((20, 28), 3, np.uint8)).save(root / "masks" / "im1.png")
    with pytest.raises(SegmentationDataError, match=r"masks/im1\.png: mask values 3 are outside 0..1"):
        SegmentationDataset(find_pairs(root, val_fraction=0)["train"], 2, 2).load(1)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / "im1.png")
    with pytest.raises(SegmentationDataError, match=r"masks/im1\.png: mask shape \(20, 20\) differs"):
        SegmentationDataset(find_pairs(root, val_fraction=0)["train"], 2, 2).load(1)


@pytest.mark.parametrize("fmt", ["npy", "nifti"])
def test_3d_volumes_load_with_channels_first(tmp_path, fmt):
    import nibabel as nib

    rng = np.random.default_rng(1)
    for part in ("train", "test"):
        (tmp_path / part / "images").mkdir(parents=True)
        (tmp_path / part / "masks").mkdir(parents=True)
        for i in range(2):
            vol = rng.normal(size=(9, 10, 11)).astype(np.float32)
            lab = rng.integers(0, 3, (9, 10, 11)).astype(np.uint8)
            if fmt == "npy":
                np.save(tmp_path / part / "images" / f"v{i}.npy", np.stack([vol, vol * 2]))  # (C, D, H, W)
                np.save(tmp_path / part / "masks" / f"v{i}.npy", lab)
            else:
                nib.save(nib.Nifti1Image(np.stack([vol, vol * 2], -1), np.eye(4)), tmp_path / part / "images" / f"v{i}.nii.gz")
                nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / part / "masks" / f"v{i}.nii.gz")
    splits = find_pairs(tmp_path, spatial_dims=3, val_fraction=0)
    assert splits.counts() == {"train": 2, "val": 0, "test": 2}
    ds = SegmentationDataset(splits["train"], 3, 3)
    item = ds[1]
    assert item["image"].shape == (2, 9, 10, 11) and item["mask"].shape == (9, 10, 11)
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2}
    assert ds.shapes() == [(9, 10, 11)] * 2
    with pytest.raises(SegmentationDataError, match="mask values 2 are outside 0..1"):
        SegmentationDataset(splits["train"], 3, 2).load(0)
    with pytest.raises(SegmentationDataError, match="no .* files in it"):
        find_pairs(tmp_path, spatial_dims=2)


# ---------------------------------------------------------------------------------------------
# the run folder, end to end through the CLI


@pytest.fixture(scope="module")
def tiny_run(seg_cohort, tmp_path_factory):
    _, tiles = seg_cohort
    out = tmp_path_factory.mktemp("segruns")
    args = seg_args(tiles, out, "tiny", "test_tiny_conv", "train.epochs=6", "train.batch_size=16", "train.lr=5e-3",
                    "data.augment.crop=28", "eval.overlays=3")
    assert run_cli(*args) == 0
    return out / "tiny", args


def test_train_segment_writes_the_run_folder_and_a_rerun_skips(tiny_run, capsys):
    run_dir, args = tiny_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "segment" and metrics["evaluated_on"] == "test" and metrics["epochs"] == 6
    tumor = metrics["eval"]["per_class"]["tumor"]
    assert 0 <= tumor["dice"] <= 1 and 0 <= tumor["iou"] <= 1 and tumor["hd95"] is not None
    assert metrics["tiles"]["mpp"] == 2.0
    assert (run_dir / "checkpoint.ckpt").is_file() and not (run_dir / "last.ckpt").exists()
    overlays = sorted((run_dir / "overlays").glob("*.png"))
    assert len(overlays) == 3 and Image.open(overlays[0]).size[0] > 2 * 32
    with open(run_dir / "per_image.csv", newline="") as f:
        per_image = list(csv.DictReader(f))
    assert len(per_image) == metrics["n_test"] and "hd95_tumor" in per_image[0]
    parts = {r["part"] for r in csv.DictReader(open(run_dir / "splits.csv"))}
    assert parts == {"train", "val", "test"}
    mtime = (run_dir / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(*args) == 0
    assert "done earlier" in capsys.readouterr().out
    assert (run_dir / "metrics.json").stat().st_mtime_ns == mtime
    assert run_cli(*args[:-1], "train.lr=1e-2", "--no-progress") == 1  # another config for the same run folder


def test_train_segment_3d_through_the_cli(tmp_path):
    rng = np.random.default_rng(2)
    for part in ("train", "val"):
        (tmp_path / part / "images").mkdir(parents=True)
        (tmp_path / part / "masks").mkdir(parents=True)
        for i in range(3):
            lab = np.zeros((10, 13, 12), np.uint8)
            lab[2:7, 3:9, 4:10] = 1
            vol = (lab * 2.0 + rng.normal(0, 0.3, lab.shape)).astype(np.float32)
            np.save(tmp_path / part / "images" / f"v{i}.npy", vol)
            np.save(tmp_path / part / "masks" / f"v{i}.npy", lab)
    out = tmp_path / "runs"
    assert run_cli(*seg_args(tmp_path, out, "vol", "test_tiny_conv", "data.spatial_dims=3", "train.epochs=15",
                             "train.batch_size=3", "train.lr=2e-2", "eval.overlays=1")) == 0
    m = json.loads((out / "vol" / "metrics.json").read_text())
    assert m["spatial_dims"] == 3 and m["evaluated_on"] == "val"
    assert m["eval"]["per_class"]["tumor"]["dice"] > 0.9  # a bright box in noise
    assert len(list((out / "vol" / "overlays").glob("*.png"))) == 1


def test_stitching_writes_pngs_of_the_thumbnail_size(tiny_run, seg_cohort, tmp_path):
    from wsimamba.slide.reader import open_slide

    run_dir, _ = tiny_run
    cohort, _ = seg_cohort
    slide = cohort / "slides" / "synth_000.svs"
    assert run_cli("segment", run_dir, "--slide", slide, "--out", tmp_path, "--thumb-size", "192") == 0
    with open_slide(slide) as s:
        w0, h0 = s.dimensions
        expected = s.thumbnail(max(w0, h0) / 192).shape[:2][::-1]
    for name in ("synth_000_mask.png", "synth_000_overlay.png"):
        assert Image.open(tmp_path / name).size == expected
    info = json.loads((tmp_path / "synth_000.json").read_text())
    assert info["tiles"] > 0 and info["mask"] is not None and "1" in info["dice"]
    mask = np.asarray(Image.open(tmp_path / "synth_000_mask.png"))
    assert set(np.unique(mask).tolist()) <= {0, 255}


# ---------------------------------------------------------------------------------------------
# the Mamba segmenters learn tumour on synthetic pathology tiles


def _overfit_root(tiles: Path, dest: Path, n: int = 6) -> Path:
    """`n` training tiles with tumour (and some background), the same pairs as train/ and test/."""
    rows = [r for r in _index(tiles) if r["split"] == "train" and 0.2 < float(r["tumor_fraction"]) < 0.8][:n]
    assert len(rows) == n
    for part in ("train", "test"):
        for kind in ("image", "mask"):
            folder = dest / part / f"{kind}s"
            folder.mkdir(parents=True, exist_ok=True)
            for r in rows:
                shutil.copy(tiles / r[kind], folder / Path(r[kind]).name)
    return dest


def _heldout_root(tiles: Path, dest: Path) -> tuple[Path, float]:
    """The tiles' index with only tumour-bearing test tiles kept; returns the root and the Dice of the best
    constant predictor (every pixel tumour) on those test tiles, computed from their masks."""
    dest.mkdir(parents=True)
    rows, kept = [], {}
    for r in _index(tiles):  # a short run: at most 24 tumour and 24 other tiles to train on, 16 to validate on
        tumor = float(r["tumor_fraction"]) > 0
        cap = {"train": 24, "val": 8, "test": 10**6 if tumor else 0}[r["split"]]
        key = (r["split"], tumor)
        if kept.get(key, 0) < cap:
            kept[key] = kept.get(key, 0) + 1
            rows.append(r)
    for kind in ("images", "masks"):
        (dest / kind).symlink_to(tiles / kind)
    with open(dest / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fg = [np.asarray(Image.open(tiles / r["mask"])) > 0 for r in rows if r["split"] == "test"]
    share = float(np.mean([m.mean() for m in fg]))
    return dest, 2 * share / (share + 1)


@pytest.mark.parametrize("model", MODELS)
def test_segmenter_overfits_and_beats_a_constant_predictor(model, seg_cohort, tmp_path):
    if model not in list_segmenters():
        pytest.skip(f"{model} is not registered yet")
    _, tiles = seg_cohort
    out = tmp_path / "runs"
    tiny = [f"model.{kv}" for kv in TINY[model]]
    common = ["data.augment.rot90=false", "data.augment.flip=false", "train.seed=0"]
    root = _overfit_root(tiles, tmp_path / "overfit")
    assert run_cli(*seg_args(root, out, "overfit", model, *tiny, *common, "data.val_fraction=0", "train.epochs=50",
                             "train.batch_size=6", "train.lr=5e-3", "train.weight_decay=0", "eval.overlays=0",
                             "eval.hd95=false")) == 0
    fit = json.loads((out / "overfit" / "metrics.json").read_text())["eval"]["per_class"]["tumor"]["dice"]
    print(f"{model}: Dice on its {6} training tiles {fit:.3f}")
    assert fit >= 0.9

    root, constant = _heldout_root(tiles, tmp_path / "heldout")
    assert run_cli(*seg_args(root, out, "heldout", model, *tiny, "train.epochs=10", "train.batch_size=8",
                             f"train.lr={HELD_OUT_LR[model]}", "train.warmup_epochs=1", "eval.overlays=0", "eval.hd95=false")) == 0
    m = json.loads((out / "heldout" / "metrics.json").read_text())
    dice = m["eval"]["per_class"]["tumor"]["dice"]
    print(f"{model}: held-out tumour tiles Dice {dice:.3f} vs constant predictor {constant:.3f}")
    assert m["eval"]["per_class"]["tumor"]["constant_dice"] == pytest.approx(constant, abs=1e-6)
    assert dice > constant + 0.02
