"""The LightningDataModule for MIL: one fold's train / val / test bags, one bag per batch."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from wsimamba.data.bags import BagDataset


class MILDataModule(L.LightningDataModule):
    """Loaders over index lists of a :class:`BagDataset`. Bags differ in length, so a batch is one bag
    (features (1, N, D)); ``train.accumulate`` gives larger effective batches. Training order is
    shuffled from `seed`, so a fold repeats exactly."""

    def __init__(self, dataset: BagDataset, train: list[int], val: list[int], test: list[int],
                 workers: int = 0, seed: int = 0):
        super().__init__()
        self.dataset, self.idx = dataset, {"train": train, "val": val, "test": test}
        self.workers, self.seed = workers, seed

    def _loader(self, part: str, shuffle: bool = False) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(Subset(self.dataset, self.idx[part]), batch_size=1, shuffle=shuffle, generator=gen,
                          num_workers=self.workers, persistent_workers=self.workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
