"""Image classification (`wsimamba train` with task: classify): config, data layouts, the synthetic
image generator, the run folder (skip / resume), and each Mamba backbone learning synthetic images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.fixtures_train import ONE_THREAD
from wsimamba.cli import main
from wsimamba.config import ClassifyConfig, TrainConfig, load_train_config
from wsimamba.data.images import (ImageDataError, cnfood241_splits, imagefolder_splits, read_image_list,
                                  synth_images)
from wsimamba.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Tiny settings of each backbone for 32 × 32 images (from the vision-backbones handoff).
BACKBONES = {
    "vim_tiny": ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.d_state=4"],
    "lbvim_tiny": ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
                   "model.d_state=4"],
    "vmamba_tiny": ["model.dims=16", "model.depths=[1,1,2,1]"],
    "resvmamba_small": ["model.dims=16", "model.depths=[1,1,2,1]"],
}
# A short CPU recipe: 240 training images of 4 classes, 15 epochs of 7 steps (the first a warmup: without
# it, vmamba_tiny stayed near chance at this learning rate).
SHORT = ["data.image_size=32", "data.workers=0", "data.augment.policy=none", "data.augment.crop_scale=[0.6,1.0]",
         "train.epochs=15", "train.warmup_epochs=1", "train.batch_size=32", "train.lr=3e-3", "train.min_lr=1e-5"]


def run_cli(*args) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)  # tiny models: one thread is fastest on a shared 2-core machine
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(before)


def classify_args(root: Path, out: Path, name: str, model: str, *extra: str) -> list[str]:
    return ["train", "--set", "task=classify", f"name={name}", f"data.root={root}", f"out={out}",
            f"model.name={model}", *extra, "--no-progress"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 classes × 100 synthetic 32-px images: 60 train, 20 val, 20 test per class (ImageFolder tree)."""
    root = tmp_path_factory.mktemp("shapes")
    made = synth_images(root, classes=4, per_class=100, size=32, seed=0)
    assert made.counts == {"train": 240, "val": 80, "test": 80}
    return root


class TinyCNN(nn.Module):
    """Two conv layers and a linear head, following the backbone contract of wsimamba.models.vision."""

    nan_after: int | None = None  # the test of a failed run makes training turn non-finite after this many calls

    def __init__(self, num_classes: int = 0, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.num_features, self.reduction = 2 * width, 4
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.calls = 0

    def forward_pyramid(self, x):
        return [self.stem(x)]

    def forward_features(self, x):
        return self.stem(x).mean((2, 3))

    def forward(self, x):
        out = self.head(self.forward_features(x))
        if self.training:
            self.calls += 1
            if TinyCNN.nan_after is not None and self.calls > TinyCNN.nan_after:
                out = out * float("nan")
        return out


@pytest.fixture
def tiny_cnn():
    from wsimamba.models.vision import registry

    registry.register_backbone("test_tinycnn", "tests only: two conv layers")(
        lambda num_classes=0, width=8: TinyCNN(num_classes, width))
    yield "test_tinycnn"
    TinyCNN.nan_after = None
    registry._REGISTRY.pop("test_tinycnn", None)
    registry._DESCRIPTIONS.pop("test_tinycnn", None)


# ---------------------------------------------------------------------------------------------
# config


def test_task_switch_and_shipped_configs():
    for name in ("camelyon.yaml", "demo.yaml"):
        cfg = load_train_config(ROOT / "configs" / name)
        assert isinstance(cfg, TrainConfig) and cfg.task == "mil"
    food = load_train_config(ROOT / "configs" / "food.yaml")
    assert isinstance(food, ClassifyConfig) and food.model.name == "resvmamba_small"
    assert food.data.format == "cnfood241" and food.data.image_size == 224
    assert food.model.kwargs() == {"drop_path_rate": 0.3}
    demo = load_train_config(ROOT / "configs" / "food_demo.yaml", ["train.epochs=3"])
    assert isinstance(demo, ClassifyConfig) and demo.train.epochs == 3
    # a MIL config may now say task: mil explicitly, and its resolved dump carries it
    assert load_train_config(ROOT / "configs" / "demo.yaml", ["task=mil"]).to_yaml().startswith("task: mil")


def test_mil_run_folder_from_before_the_task_switch_still_resumes(tmp_path):
    from wsimamba.train.run import _prepare_run_dir

    cfg = load_train_config(ROOT / "configs" / "demo.yaml", [f"out={tmp_path}"]).resolved()
    old = cfg.model_dump(mode="json")
    del old["task"]  # config.yaml as written before `task` existed
    (cfg.run_dir).mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert _prepare_run_dir(cfg, overwrite=False) == cfg.run_dir
    old["train"]["lr"] = 1.0
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="train.lr"):
        _prepare_run_dir(cfg, overwrite=False)


@pytest.mark.parametrize("override, message", [
    ("data.formt=cnfood241", "unknown key 'data.formt'"),
    ("data.format=coco", "data.format: Input should be 'imagefolder' or 'cnfood241'"),
    ("data.augment.policy=autoaugment", "data.augment.policy: Input should be"),
    ("data.augment.crop_scale=[0.5,2]", "data.augment.crop_scale"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("train.warmup_epochs=200", "train.warmup_epochs (200.0) must be less than train.epochs (100)"),
    ("model.depthh=3", "model.depthh does not apply to 'resvmamba_small'"),
    ("model.num_classes=3", "model.num_classes is set from the data"),
    ("model.name=nosuchnet", "model.name: unknown backbone 'nosuchnet'"),
    ("data.format=cnfood241", "data.train_list is required with format: cnfood241"),
    ("data.train_list=x.txt", "data.train_list applies to format: cnfood241 only"),
    ("task=segmentation", "task: must be 'mil', 'classify' or 'segment' (got 'segmentation')"),
])
def test_bad_config_is_a_one_line_error_naming_the_key(tmp_path, capsys, override, message):
    args = classify_args(tmp_path / "data", tmp_path, "bad", "resvmamba_small", override)
    assert run_cli(*args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "bad").exists()


def test_missing_data_and_bad_image_size_are_errors(shapes, tmp_path, capsys):
    assert run_cli(*classify_args(tmp_path / "nowhere", tmp_path, "a", "resvmamba_small")) == 1
    assert f"{tmp_path / 'nowhere'}: no such image folder" in capsys.readouterr().err
    # vmamba-style backbones need sides divisible by 32
    assert run_cli(*classify_args(shapes, tmp_path, "b", "vmamba_tiny", "data.image_size=48",
                                  *BACKBONES["vmamba_tiny"])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "48" in err and "32" in err, err


# ---------------------------------------------------------------------------------------------
# data layouts and the generator


def test_synthetic_images_are_deterministic(tmp_path):
    a = synth_images(tmp_path / "a", classes=3, per_class=5, size=24, seed=4)
    b = synth_images(tmp_path / "b", classes=3, per_class=5, size=24, seed=4)
    c = synth_images(tmp_path / "c", classes=3, per_class=5, size=24, seed=5)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*.png"))
    assert len(files) == 15 and a.classes == ["hstripes", "vstripes", "checker"]
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*.png"))
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files)
    assert sum((a.root / f).read_bytes() != (c.root / f).read_bytes() for f in files) == len(files)
    with pytest.raises(ImageDataError, match="--classes"):
        synth_images(tmp_path / "d", classes=11)


def test_synth_images_command(tmp_path, capsys):
    assert run_cli("synth-images", tmp_path / "s", "--classes", "3", "--per-class", "5", "--size", "16",
                   "--layout", "cnfood241", "--val-fraction", "0", "--test-fraction", "0.4") == 0
    assert "wrote 15 images (9 train, 6 test) of 3 classes" in capsys.readouterr().out
    assert (tmp_path / "s" / "train.txt").is_file() and (tmp_path / "s" / "test.txt").is_file()
    assert not (tmp_path / "s" / "val.txt").exists()


def test_imagefolder_layouts(shapes, tmp_path):
    s = imagefolder_splits(shapes)
    assert s.classes == sorted(["hstripes", "vstripes", "checker", "disc"])
    assert s.counts() == {"train": 240, "val": 80, "test": 80}
    assert {y for _, y in s["test"]} == {0, 1, 2, 3}
    # class folders directly under the root: val carved per class from the training images
    flat = synth_images(tmp_path / "flat", classes=3, per_class=10, size=16, val_fraction=0, test_fraction=0).root
    assert not (flat / "train").exists()
    s = imagefolder_splits(flat, val_fraction=0.2, seed=1)
    assert s.counts() == {"train": 24, "val": 6, "test": 0}
    assert sorted(y for _, y in s["val"]) == [0, 0, 1, 1, 2, 2]
    assert not {p for p, _ in s["val"]} & {p for p, _ in s["train"]}
    assert imagefolder_splits(flat, val_fraction=0.2, seed=1)["val"] == s["val"]
    # an empty class folder is named
    (flat / "empty_class").mkdir()
    with pytest.raises(ImageDataError, match=f"class folder without images.*{flat / 'empty_class'}"):
        imagefolder_splits(flat)
    # a val class the training data lacks is named
    tree = synth_images(tmp_path / "tree", classes=2, per_class=6, size=16).root
    (tree / "val" / "ghost").mkdir()
    (tree / "val" / "hstripes" / "hstripes_0001.png").rename(tree / "val" / "ghost" / "g.png")
    with pytest.raises(ImageDataError, match="not among the training classes: ghost"):
        imagefolder_splits(tree)


def test_cnfood241_layout(tmp_path):
    made = synth_images(tmp_path / "cn", classes=6, per_class=10, size=16, layout="cnfood241")
    lists = made.lists
    first = lists["train"].read_text().splitlines()[0]
    assert first.split() == ["000/000004.png", "0"]  # `relative/path label`, as CNFOOD-241's lists
    s = cnfood241_splits(made.image_root, lists["train"], lists["val"], lists["test"])
    assert s.classes == ["000", "001", "002", "003", "004", "005"]
    assert s.counts() == {"train": 36, "val": 12, "test": 12}
    assert s["train"][0] == (made.image_root / "000" / "000004.png", 0)
    named = cnfood241_splits(made.image_root, lists["train"], classes=list("abcdef"), val_fraction=0.17)
    assert named.classes == list("abcdef") and named.counts() == {"train": 30, "val": 6, "test": 0}
    # a listed image that is missing is named, with the list it came from
    (made.image_root / "002" / "000027.png").unlink()
    with pytest.raises(ImageDataError, match=r"train\.txt: 1 listed image\(s\) not found: .*002/000027\.png"):
        cnfood241_splits(made.image_root, lists["train"])
    bad = tmp_path / "bad.txt"
    bad.write_text("000/000004.png 0\n000/000005.png zero\n")
    with pytest.raises(ImageDataError, match=r"bad\.txt: line 2: expected"):
        read_image_list(bad, made.image_root)
    with pytest.raises(ImageDataError, match="no such list file"):
        read_image_list(tmp_path / "none.txt", made.image_root)


# ---------------------------------------------------------------------------------------------
# the run folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_the_run_folder_and_a_rerun_skips(shapes, tmp_path, tiny_cnn, capsys):
    args = classify_args(shapes, tmp_path, "cnn", tiny_cnn, *SHORT, "train.epochs=3", "train.warmup_epochs=1")
    assert run_cli(*args) == 0
    run = tmp_path / "cnn"
    for name in ("config.yaml", "classes.json", "splits.csv", "checkpoint.ckpt", "predictions.csv", "confusion.png",
                 "metrics.json", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    assert not (run / "last.ckpt").exists() and not list(run.rglob(".*partial*"))
    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((run / "metrics.json").read_text())
    assert m["evaluated_on"] == "test" and m["n_test"] == 80 and m["epochs"] == 3 and m["precision"] == "32-true"
    assert m["weights"] == "random-init" and set(m["eval"]) == {"top1", "top4", "loss", "balanced_accuracy",
                                                                "macro_f1"}
    rows = _rows(run / "predictions.csv")
    assert len(rows) == 80 and list(rows[0])[:4] == ["path", "label", "pred", "prob_checker"]
    top1 = sum(r["label"] == r["pred"] for r in rows) / len(rows)
    assert m["eval"]["top1"] == pytest.approx(top1)
    assert m["eval"]["top4"] == pytest.approx(1.0)  # top-k with k = n_classes < 5
    assert json.loads((run / "classes.json").read_text())["classes"] == sorted(["hstripes", "vstripes", "checker",
                                                                                "disc"])
    parts = [r["part"] for r in _rows(run / "splits.csv")]
    assert parts.count("train") == 240 and parts.count("val") == 80 and parts.count("test") == 80
    logged = _rows(run / "logs" / "metrics.csv")
    assert {"val_top1", "val_top4", "val_loss", "train_loss"} <= set(logged[0])
    out = capsys.readouterr().out
    assert "test (80 images): top-1" in out and "3 epochs" in out
    # a rerun finds the run complete and leaves it alone
    stamp = (run / "metrics.json").stat().st_mtime_ns
    assert run_cli(*args) == 0
    assert "done earlier" in capsys.readouterr().out
    assert (run / "metrics.json").stat().st_mtime_ns == stamp
    # another config for the same folder is refused
    assert run_cli(*args[:-1], "train.lr=0.1", "--no-progress") == 1
    assert "holds a run with another config (train.lr" in capsys.readouterr().err


def test_without_a_validation_part_the_last_epoch_is_the_result(tmp_path, tiny_cnn, capsys):
    made = synth_images(tmp_path / "nv", classes=3, per_class=12, size=32, val_fraction=0, test_fraction=0.25)
    args = classify_args(made.root, tmp_path, "nv", tiny_cnn, *SHORT, "data.val_fraction=0", "train.epochs=2")
    assert run_cli(*args) == 0, capsys.readouterr().err
    run = tmp_path / "nv"
    assert (run / "checkpoint.ckpt").is_file() and not (run / "last.ckpt").exists()
    assert torch.load(run / "checkpoint.ckpt", weights_only=False)["epoch"] == 1  # the last of 2 epochs
    m = json.loads((run / "metrics.json").read_text())
    assert m["evaluated_on"] == "test" and m["n_test"] == 9


def test_a_failed_run_resumes_from_its_last_epoch(tmp_path, tiny_cnn, capsys):
    made = synth_images(tmp_path / "cn", classes=6, per_class=20, size=32, layout="cnfood241")
    lists = [f"data.train_list={made.lists['train']}", f"data.val_list={made.lists['val']}",
             f"data.test_list={made.lists['test']}"]
    args = classify_args(made.image_root, tmp_path, "cn", tiny_cnn, "data.format=cnfood241", *lists, *SHORT,
                         "train.epochs=4", "train.batch_size=12")
    TinyCNN.nan_after = 2 * 6  # training steps of two epochs (72 images, 12 per step)
    assert run_cli(*args) == 1
    run = tmp_path / "cn"
    assert "training stopped: the training loss became nan" in capsys.readouterr().err
    assert (run / "failed.txt").is_file() and not (run / "metrics.json").exists()
    assert (run / "last.ckpt").is_file()
    assert torch.load(run / "last.ckpt", weights_only=False)["epoch"] == 1  # epochs 0 and 1 completed
    TinyCNN.nan_after = None
    assert run_cli(*args) == 0
    assert "resuming from" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed"] and m["epochs"] == 4 and not (run / "failed.txt").exists()
    assert set(m["eval"]) >= {"top1", "top5"} and m["classes"] == 6  # top-5 with ≥ 5 classes
    epochs = [int(r["epoch"]) for r in _rows(run / "logs" / "metrics.csv") if r.get("val_top1")]
    assert epochs == [0, 1, 2, 3]  # the log goes on; the first two epochs were not trained again


# ---------------------------------------------------------------------------------------------
# each backbone learns the synthetic images


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_learns_synthetic_images(name, shapes, tmp_path, capsys):
    from wsimamba.models.vision import list_backbones

    if name not in list_backbones():
        pytest.skip(f"backbone {name} is not registered yet")
    assert run_cli(*classify_args(shapes, tmp_path, name, name, *SHORT, *BACKBONES[name])) == 0
    m = json.loads((tmp_path / name / "metrics.json").read_text())
    print(f"{name}: held-out top-1 {m['eval']['top1']:.3f} after {m['epochs']} epochs, {m['seconds']:.0f} s")
    # 80 held-out images of 4 balanced classes: chance is 0.25, and 0.5 lies five standard deviations above it
    assert m["evaluated_on"] == "test" and m["n_test"] == 80
    assert m["eval"]["top1"] >= 0.5, m["eval"]
