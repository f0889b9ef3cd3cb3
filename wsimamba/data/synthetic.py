"""Synthetic bags with a known answer, for tests, benchmarks and sanity checks of aggregators.

- :func:`witness_bags`: planted witnesses. Instances are N(0, I); a positive bag also holds a few
  percent of instances from N(shift·u, I), u a fixed unit vector. Only those witnesses carry the label.
- :func:`order_bags`: an order-dependent task. Every bag holds the same markers (two A tokens and
  one B token among background tokens); it is positive when they stand as the contiguous triple
  A B A, i.e. when the B token has an A on *both* sides. Positive and negative bags contain the same
  multiset of instance distributions, so any order-invariant aggregator (mean / max / attention
  pooling) is at chance; telling them apart needs each token to see its left and right neighbours.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SyntheticBags:
    """bags: list of float32 (N_i, D); labels int64 (n,); witness: list of bool (N_i,) instance truth."""

    bags: list[np.ndarray]
    labels: np.ndarray
    witness: list[np.ndarray]


def witness_bags(n_bags: int, dim: int = 32, instances: tuple[int, int] = (150, 300),
                 witness_fraction: tuple[float, float] = (0.03, 0.06), shift: float = 5.0,
                 seed: int = 0) -> SyntheticBags:
    """Half the bags (rounded down) positive, in random order; bag sizes uniform in `instances`."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    labels = np.zeros(n_bags, np.int64)
    labels[rng.permutation(n_bags)[: n_bags // 2]] = 1
    bags, wit = [], []
    for y in labels:
        n = int(rng.integers(instances[0], instances[1] + 1))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        w = np.zeros(n, bool)
        if y:
            k = max(1, int(round(n * rng.uniform(*witness_fraction))))
            w[rng.choice(n, k, replace=False)] = True
            x[w] += (shift * u).astype(np.float32)
        bags.append(x)
        wit.append(w)
    return SyntheticBags(bags, labels, wit)


def order_bags(n_bags: int, dim: int = 16, length: int = 48, shift: float = 4.0, seed: int = 0) -> SyntheticBags:
    """Bags of `length` tokens: background N(0, I), A tokens N(shift·a, I), one B token N(shift·b, I).

    Positive (half): the triple A B A stands contiguously at a random place. Negative: the same two A
    and one B at random places, never as A B A (and never with B between two adjacent A's).
    `witness` marks the three marker tokens.
    """
    rng = np.random.default_rng(seed)
    a, b = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T  # two orthonormal directions
    labels = np.zeros(n_bags, np.int64)
    labels[rng.permutation(n_bags)[: n_bags // 2]] = 1
    bags, wit = [], []
    for y in labels:
        x = rng.standard_normal((length, dim)).astype(np.float32)
        if y:
            s = int(rng.integers(0, length - 2))
            pos_a, pos_b = [s, s + 2], s + 1
        else:
            while True:
                pos_a = sorted(rng.choice(length, 2, replace=False).tolist())
                pos_b = int(rng.integers(0, length))
                if pos_b in pos_a or (pos_a[0] == pos_b - 1 and pos_a[1] == pos_b + 1):
                    continue
                break
        x[pos_a] += (shift * a).astype(np.float32)
        x[pos_b] += (shift * b).astype(np.float32)
        w = np.zeros(length, bool)
        w[pos_a + [pos_b]] = True
        bags.append(x)
        wit.append(w)
    return SyntheticBags(bags, labels, wit)


def grid_coords(n: int, patch: int = 256) -> np.ndarray:
    """Top-left (x, y) of n patches laid row by row on the smallest square grid, int64 (n, 2)."""
    side = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    return np.stack([(i % side) * patch, (i // side) * patch], 1).astype(np.int64)


def write_cohort(out_dir: str | Path, data: SyntheticBags, fmt: str = "h5", prefix: str = "bag",
                 cases: list[str] | None = None, classes: tuple[str, str] | None = None,
                 patch: int = 256) -> tuple[Path, Path]:
    """Write the bags as feature files (wsimamba layout, `fmt` h5 or zarr) and a labels.csv.

    Returns (features folder, labels.csv). Slide ids are `<prefix>_<i:04d>`; cases default to one
    per slide; `classes` names label 0 and 1 (default: the integers).
    """
    from wsimamba.features.store import FeatureWriter

    out = Path(out_dir)
    feats_dir = out / "features"
    rows = []
    for i, (x, y) in enumerate(zip(data.bags, data.labels)):
        sid = f"{prefix}_{i:04d}"
        w = FeatureWriter(feats_dir, sid, x.shape[1], fmt)
        w.append(x, grid_coords(len(x), patch))
        w.finalize({"patch_size": patch, "patch_size_level0": patch, "patch_level": 0, "name": sid},
                   {"encoder": "synthetic", "encoder_weights_sha256": "none"})
        label = classes[int(y)] if classes else int(y)
        rows.append([sid, cases[i] if cases else f"case_{sid}", label])
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["slide_id", "case_id", "label"])
        wr.writerows(rows)
    return feats_dir, labels
