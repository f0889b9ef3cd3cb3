"""The settings of `wsimamba demo`: the synthetic cohort, the extraction and the training config.

`configs/demo.yaml` is the same training config written out for users to copy (a test keeps the
two equal). The cohort is sized so that the whole demo runs in a few minutes on two CPU cores
with a random-init ResNet-50 (see README).
"""

from __future__ import annotations

from pathlib import Path

# synth: 32 slides of 3072² px at 0.5 µm/px (1.5 × 1.5 mm of tissue section). Tumor is 10-30 % of
# the tissue of a positive slide: with synth's default 2-10 % such small sections hold 0-3 tumor patches
# and many positive slides none at all, which leaves nothing to learn from 24 training slides.
COHORT = dict(n=32, size=(3072, 3072), mpp=0.5, seed=0, tumor_fraction=(0.10, 0.30))
# extract: 128-px patches at 1 µm/px (256 level-0 px), ~40-70 patches per slide
EXTRACT = dict(encoder="resnet50-trunc", target_mpp=1.0, patch_size=128, batch_size=32)

TRAIN = {
    "name": "demo",
    "data": {"features": "demo_out/features", "labels": "demo_out/cohort/labels.csv", "preload": True},
    "model": {"name": "lbmambamil", "d_model": 64, "layers": 2, "d_state": 8, "dropout": 0.25},
    "train": {
        "folds": 4, "val_fraction": 0.2, "max_epochs": 20, "lr": 5e-4, "weight_decay": 1e-2,
        "early_stopping": {"patience": 8}, "seed": 0,
    },
    "out": "demo_out/runs",
}


def demo_train_dict(out_dir: Path) -> dict:
    """TRAIN with the paths under `out_dir` (demo_out → out_dir)."""
    import copy

    d = copy.deepcopy(TRAIN)
    d["data"]["features"] = str(Path(out_dir) / "features")
    d["data"]["labels"] = str(Path(out_dir) / "cohort" / "labels.csv")
    d["out"] = str(Path(out_dir) / "runs")
    return d
