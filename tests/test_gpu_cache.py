"""data.gpu_cache: bags kept on the training device after their first read (MILDataModule).

The decision and the cache are device-agnostic, so most of this runs on the CPU (``cache_device="cpu"``
and a stand-in for the free-memory query); one test trains on a real CUDA device.
"""

from __future__ import annotations

import json
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

from tests.fixtures_train import read_csv, train_args
from wsimamba.data.bags import BagDataset, FeatureSource
from wsimamba.data.labels import read_labels
from wsimamba.data.synthetic import witness_bags, write_cohort
from wsimamba.errors import ConfigError
from wsimamba.train import datamodule
from wsimamba.train.datamodule import MILDataModule, decide_gpu_cache

TRAIN, VAL, TEST = list(range(20)), list(range(20, 25)), list(range(25, 30))


@pytest.fixture
def reads(monkeypatch):
    """Counts FeatureSource.read calls per slide id (a file read each)."""
    counts: Counter = Counter()
    real = FeatureSource.read

    def counting(self, slide_id):
        counts[slide_id] += 1
        return real(self, slide_id)

    monkeypatch.setattr(FeatureSource, "read", counting)
    return counts


@pytest.fixture
def dataset(bag_cohort):
    _, feats, labels = bag_cohort
    t = read_labels(labels)
    return BagDataset(FeatureSource(feats), t.slide_ids, t.labels)


def fold_bytes(bag_cohort) -> int:
    """float32 bytes of every bag, from the files themselves."""
    total = 0
    for path in sorted(bag_cohort[1].glob("*.h5")):
        with h5py.File(path, "r") as f:
            total += int(np.prod(f["features"].shape)) * 4
    return total


def free(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(datamodule, "free_memory", lambda device: nbytes)


def epoch(dm: MILDataModule) -> list[dict]:
    return [b for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()) for b in loader]


def test_cached_bags_are_read_once_and_served_unchanged(bag_cohort, dataset, reads, monkeypatch):
    free(monkeypatch, 1 << 40)
    dm = MILDataModule(dataset, TRAIN, VAL, TEST, gpu_cache=True, cache_device="cpu")
    dm.setup("fit")
    assert dm.cache is not None and not reads  # the sizes came from metadata, not from reading features
    first, second = epoch(dm), epoch(dm)
    assert reads == Counter({sid: 1 for sid in dataset.slide_ids})  # later epochs never touch the files
    assert len(dm.cache.bags) == 30 and dm.cache.nbytes == fold_bytes(bag_cohort)
    plain = MILDataModule(dataset, TRAIN, VAL, TEST, gpu_cache=False)
    plain.setup("fit")
    assert plain.cache is None
    for cached_epoch in (first, second):
        # same seed, same shuffled order; every key as the uncached loader serves it
        for a, b in zip(cached_epoch, epoch(plain), strict=True):
            assert a.keys() == b.keys() and a["features"].shape[0] == 1
            assert torch.equal(a["features"], b["features"])
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
    # the served batch is a copy: a model writing into its input cannot corrupt the cache
    batch = next(iter(dm.train_dataloader()))
    i = int(batch["index"])
    batch["features"].zero_()
    assert dm.cache.bags[i].abs().sum() > 0
    dm.teardown("fit")
    assert dm.cache is None


def test_auto_needs_half_the_free_memory_and_true_fails_clearly(bag_cohort, dataset, monkeypatch):
    need = fold_bytes(bag_cohort)
    cases = [("auto", 2 * need, True), ("auto", 2 * need - 1, False), (True, need, True), (False, 1 << 40, False)]
    for mode, nbytes, on in cases:
        free(monkeypatch, nbytes)
        dm = MILDataModule(dataset, TRAIN, VAL, TEST, gpu_cache=mode, cache_device="cpu")
        dm.setup("fit")
        assert (dm.cache is not None) == on, (mode, nbytes)
    free(monkeypatch, need - 1)
    dm = MILDataModule(dataset, TRAIN, VAL, TEST, gpu_cache=True, cache_device="cpu")
    with pytest.raises(ConfigError, match=f"data.gpu_cache=true: the fold's bags need {need} bytes .* but {need - 1} "
                                          "bytes .* are free; set data.gpu_cache to auto or false"):
        dm.setup("fit")
    assert decide_gpu_cache("auto", 10, 20) and not decide_gpu_cache("auto", 11, 20)


def test_the_cache_serves_without_workers_and_a_cpu_trainer_turns_it_off(dataset, monkeypatch):
    free(monkeypatch, 1 << 40)
    # DataLoader worker processes cannot hand out CUDA tensors: with the cache on, the loaders run in-process
    dm = MILDataModule(dataset, TRAIN, VAL, TEST, workers=2, gpu_cache=True, cache_device="cpu")
    dm.setup("fit")
    assert dm.cache is not None and dm.train_dataloader().num_workers == 0
    # and where the cache declines, the workers read as before
    free(monkeypatch, 1)
    dm = MILDataModule(dataset, TRAIN, VAL, TEST, workers=2, gpu_cache="auto", cache_device="cpu")
    dm.setup("fit")
    assert dm.cache is None and dm.served is dataset and dm.train_dataloader().num_workers == 2
    # without a forced device the trainer's decides, and a CPU one (or none) keeps the plain path
    dm = MILDataModule(dataset, TRAIN, VAL, TEST, gpu_cache=True)
    dm.setup("fit")
    assert dm.cache is None


def test_sizes_come_from_metadata(tmp_path, reads):
    data = witness_bags(2, dim=5, instances=(6, 9), seed=1)
    for fmt in ("h5", "zarr"):
        feats, _ = write_cohort(tmp_path / fmt, data, fmt=fmt)
        src = FeatureSource(feats)
        assert [src.shape(f"bag_{i:04d}") for i in range(2)] == [x.shape for x in data.bags]
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(torch.zeros(1, 7, 3), pt / "s.pt")  # with the batch axis of one some writers keep
    assert FeatureSource(pt, "pt").shape("s") == (7, 3)
    assert not reads


def test_train_command_passes_the_key_and_trains_the_same(bag_cohort, tiny_run, tmp_path, reads, monkeypatch,
                                                          one_thread):
    """tiny_run trained without a cache; the same run with the cache (forced onto the CPU) predicts the same
    and reads each bag once per fold for the cache, not once per epoch."""
    _, feats, labels = bag_cohort
    monkeypatch.setattr(MILDataModule, "_device", lambda self: torch.device("cpu"))
    free(monkeypatch, 2 * fold_bytes(bag_cohort) - 1)  # "auto" would decline: the cache is on only if true got through
    from wsimamba.cli import main

    assert main([str(a) for a in train_args(feats, labels, tmp_path, "tiny", "data.gpu_cache=true")]) == 0
    run = tmp_path / "tiny"
    for k in range(3):
        assert (run / f"fold_{k}" / "predictions.csv").read_text() == (tiny_run / f"fold_{k}" / "predictions.csv").read_text()
        assert json.loads((run / f"fold_{k}" / "metrics.json").read_text())["epochs"] > 1
    # per fold: training bags once for the feature statistics and once into the cache, validation bags
    # once into the cache, test bags once for the predictions; plus the first bag when the dataset opens
    parts = Counter((r["fold"], r["part"]) for r in read_csv(run / "splits.csv"))
    expected = 1 + sum(2 * parts[(str(k), "train")] + parts[(str(k), "val")] + parts[(str(k), "test")] for k in range(3))
    assert sum(reads.values()) == expected


@pytest.mark.gpu
def test_gpu_cache_on_cuda(dataset, reads):
    import lightning as L

    from wsimamba.train.module import MILModule

    seen = {}

    class Inspect(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            dm = trainer.datamodule
            # every tensor of a batch as the loader serves it, before Lightning's transfer, is on the GPU already:
            # none is copied from the host each step
            batch = next(iter(dm.train_dataloader()))
            seen["batch"] = {v.device.type for v in batch.values() if torch.is_tensor(v)}
            seen[trainer.current_epoch] = {i: t.device.type for i, t in dm.cache.bags.items()}

    dm = MILDataModule(dataset, TRAIN, VAL, TEST, gpu_cache=True)
    module = MILModule("abmil", dataset.in_dim, 2, {"d_model": 16, "attn_dim": 8}, lr=2e-3, max_epochs=2)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Inspect()])
    reads.clear()
    trainer.fit(module, datamodule=dm)
    assert seen.pop("batch") == {"cuda"}
    assert set(seen) == {0, 1}
    for bags in seen.values():  # train and validation bags, all on the GPU
        assert sorted(bags) == TRAIN + VAL and set(bags.values()) == {"cuda"}
    assert reads == Counter({dataset.slide_ids[i]: 1 for i in TRAIN + VAL})
    assert torch.isfinite(trainer.callback_metrics["train_loss"]) and dm.cache is None  # freed at the end of fit
