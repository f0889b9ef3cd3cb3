"""The LightningDataModule for MIL: one fold's train / val / test bags, one bag per batch, or with
``batch_size`` > 1 lists of bags (:func:`collate_bags`) that the module packs into one sequence.

On a CUDA device the bags can stay in GPU memory after their first read (``data.gpu_cache``): a
bag's model step takes milliseconds, and reading it from disk or RAM and copying ~40 MB from
pageable host memory every step costs as much again.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from wsimamba.data.bags import BagDataset
from wsimamba.errors import ConfigError

GpuCache = Literal["auto"] | bool


class DeviceBagCache(Dataset):
    """A :class:`BagDataset` whose features stay on `device` after their first read.

    Item i: as ``dataset[i]``, with ``features`` float32 (N, D), ``label`` and ``index`` (0-d int64) on
    `device`. The first access reads the file (or the RAM copy) and moves it; later ones return the
    same device tensors, touching neither the file nor host memory. The label and index live there too:
    a host tensor in the batch would make Lightning copy it from pageable memory each step, a copy that
    waits for the GPU to finish the previous step, so the host could not queue the next one meanwhile.
    A bag is cached only when served, so each distributed rank holds the bags it was given.
    """

    def __init__(self, dataset: BagDataset, device: torch.device | str):
        self.dataset, self.device = dataset, torch.device(device)
        self.items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.items.get(i)
        if item is None:
            item = self.items[i] = {k: (torch.as_tensor(v).to(self.device) if k in ("features", "label", "index") else v)
                                    for k, v in self.dataset[i].items()}
        return dict(item)

    @property
    def bags(self) -> dict[int, torch.Tensor]:
        """The cached features, by dataset index."""
        return {i: item["features"] for i, item in self.items.items()}

    @property
    def nbytes(self) -> int:
        """Bytes the cached features hold now."""
        return sum(t.numel() * t.element_size() for t in self.bags.values())


def free_memory(device: torch.device) -> int:
    """Bytes a cache on `device` could take: on CUDA what the driver reports free plus what PyTorch's
    allocator holds unused (a previous fold's freed cache stays reserved there); elsewhere the
    available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1


def decide_gpu_cache(mode: GpuCache, need: int, free: int, where: str = "cuda") -> bool:
    """Whether to cache bags of `need` bytes in a device with `free` bytes free.

    "auto": only within half the free memory (the model's activations need the rest); True: always,
    or ConfigError when they do not fit at all; False: never.
    """
    if mode is False:
        return False
    if mode == "auto":
        return need <= free // 2
    if need > free:
        raise ConfigError(
            f"data.gpu_cache=true: the fold's bags need {need} bytes ({need / 2**30:.2f} GiB) on {where}, "
            f"but {free} bytes ({free / 2**30:.2f} GiB) are free; set data.gpu_cache to auto or false"
        )
    return True


def collate_bags(items: list[dict]) -> dict:
    """Bags of different lengths as one batch: features a list of (N_b, D) tensors, label (B,), index (B,)
    (on the items' device: the device cache's labels and indices are already there)."""
    return {
        "features": [it["features"] for it in items],
        "label": torch.stack([torch.as_tensor(it["label"]) for it in items]),
        "index": torch.stack([torch.as_tensor(it["index"]) for it in items]),
    }


class MILDataModule(L.LightningDataModule):
    """Loaders over index lists of a :class:`BagDataset`. Bags differ in length, so a batch is one bag
    (features (1, N, D)), or with ``batch_size`` > 1 a list of bags (:func:`collate_bags`; the module runs
    them packed); ``train.accumulate`` gives larger effective batches. Training order is shuffled from
    `seed`, so a fold repeats exactly.

    `gpu_cache` ("auto" | True | False): keep the fold's bags on the trainer's CUDA device after their
    first read (:class:`DeviceBagCache`), decided in :meth:`setup` by :func:`decide_gpu_cache` from
    the features' sizes (file metadata) and the device's free memory. Off on the CPU. Where the cache
    is on, the loaders run without `workers` (worker processes cannot hand out CUDA tensors, and after
    the first epoch there is nothing left to read); where it is off, they use them. `cache_device` forces
    the device the cache lives on instead of the trainer's (any device type; tests use "cpu").
    """

    def __init__(self, dataset: BagDataset, train: list[int], val: list[int], test: list[int],
                 workers: int = 0, seed: int = 0, gpu_cache: GpuCache = "auto",
                 cache_device: torch.device | str | None = None, batch_size: int = 1):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.dataset, self.idx = dataset, {"train": train, "val": val, "test": test}
        self.workers, self.seed = workers, seed
        self.gpu_cache, self.cache_device = gpu_cache, cache_device
        self.cache: DeviceBagCache | None = None

    @property
    def served(self) -> Dataset:
        """The dataset the loaders index: the device cache when on, else the BagDataset."""
        return self.cache if self.cache is not None else self.dataset

    def _device(self) -> torch.device | None:
        if self.cache_device is not None:
            return torch.device(self.cache_device)
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else None
        return device if device is not None and device.type == "cuda" else None

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None or self.gpu_cache is False:
            return
        device = self._device()
        if device is None:
            return
        fold = sorted({i for part in self.idx.values() for i in part})
        need = sum(self.dataset.feature_bytes(i) for i in fold)
        if decide_gpu_cache(self.gpu_cache, need, free_memory(device), str(device)):
            self.cache = DeviceBagCache(self.dataset, device)

    def teardown(self, stage: str | None = None) -> None:
        # Free the cache when the trainer's stage ends: the loaders Lightning keeps would hold it until
        # the trainer is collected, and the next fold's cache needs the memory.
        if self.cache is not None:
            self.cache.items.clear()
            self.cache = None

    def on_exception(self, exception: BaseException) -> None:
        self.teardown()  # Lightning calls teardown only when the stage ends without an error

    def _loader(self, part: str, shuffle: bool = False) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        workers = 0 if self.cache is not None else self.workers
        return DataLoader(Subset(self.served, self.idx[part]), batch_size=self.batch_size, shuffle=shuffle,
                          generator=gen, num_workers=workers, persistent_workers=workers > 0,
                          collate_fn=collate_bags if self.batch_size > 1 else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
