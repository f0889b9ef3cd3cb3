"""Feature bags: one slide's patch features (and coordinates) read from any supported layout.

Layouts of a features folder (``data.format``):

- ``h5``: ``<dir>/<slide_id>.h5`` with ``features`` (N, D) and ``coords`` (N, 2): what
  ``wsimamba extract`` writes, and also TRIDENT's ``features_<encoder>/`` and CLAM's ``h5_files/``.
- ``zarr``: ``<dir>/features.zarr/<slide_id>`` (``wsimamba extract --format zarr``).
- ``clam``: a CLAM output folder with ``h5_files/<slide_id>.h5`` and/or ``pt_files/<slide_id>.pt``
  (a (N, D) tensor, no coordinates); the h5 file is used when both exist.
- ``pt``: ``<dir>/<slide_id>.pt`` tensors (N, D) (TRIDENT's ``--save_as pt``, CLAM's pt_files).
- ``trident``: a TRIDENT job folder; the patch features are in its one
  ``<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/`` folder (or ``features_<encoder>/``).
- ``auto`` (default): the first of zarr, clam, h5, trident, pt whose files are present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wsimamba.errors import FeatureStoreError

LAYOUTS = ("auto", "h5", "zarr", "clam", "pt", "trident")


@dataclass
class Bag:
    """features float32 (N, D); coords int64 (N, 2) level-0 top-left (x, y), or None (pt files)."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray | None
    coords_attrs: dict = field(default_factory=dict)
    file_attrs: dict = field(default_factory=dict)
    path: Path | None = None


def _read_h5(path: Path, slide_id: str) -> Bag:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise FeatureStoreError(f"{path}: no dataset 'features'")
            feats = f["features"][:]
            coords = f["coords"][:] if "coords" in f else None
            cattrs = dict(f["coords"].attrs) if "coords" in f else {}
            fattrs = dict(f.attrs)
    except OSError as e:
        raise FeatureStoreError(f"{path}: not a readable HDF5 file ({e})") from e
    return Bag(slide_id, feats, coords, cattrs, fattrs, path)


def _read_pt(path: Path, slide_id: str) -> Bag:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise FeatureStoreError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from e
    coords = None
    if isinstance(obj, dict):
        feats = obj.get("features", obj.get("feats"))
        coords = obj.get("coords")
        if feats is None:
            raise FeatureStoreError(f"{path}: a dict without 'features' (keys: {', '.join(map(str, obj))})")
    else:
        feats = obj
    if not isinstance(feats, torch.Tensor):
        raise FeatureStoreError(f"{path}: expected a (N, D) tensor, got {type(feats).__name__}")
    coords = coords.numpy() if isinstance(coords, torch.Tensor) else None
    return Bag(slide_id, feats.float().numpy(), coords, {}, {}, path)


def _read_zarr(store: Path, slide_id: str) -> Bag:
    from wsimamba.features.store import read_features

    feats, coords, cattrs, fattrs = read_features(store, slide_id)
    return Bag(slide_id, feats, coords, cattrs, fattrs, store / slide_id)


def _check_bag(bag: Bag) -> Bag:
    feats = np.asarray(bag.features)
    while feats.ndim > 2 and feats.shape[0] == 1:  # some writers keep a batch axis of one
        feats = feats[0]
    if feats.ndim != 2 or feats.shape[0] < 1:
        raise FeatureStoreError(f"{bag.path}: features must be (N >= 1, D), got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise FeatureStoreError(f"{bag.path}: features must be floating point, got {feats.dtype}")
    feats = feats.astype(np.float32, copy=False)
    if not np.isfinite(feats).all():
        raise FeatureStoreError(f"{bag.path}: features contain NaN or infinite values")
    coords = bag.coords
    if coords is not None:
        coords = np.asarray(coords)
        while coords.ndim > 2 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.shape != (feats.shape[0], 2):
            raise FeatureStoreError(f"{bag.path}: coords shape {coords.shape} does not match features {feats.shape}")
        coords = coords.astype(np.int64, copy=False)
    bag.features, bag.coords = feats, coords
    return bag


class FeatureSource:
    """Finds and reads the feature file of a slide id in a features folder of one layout."""

    def __init__(self, root: str | Path, layout: str = "auto"):
        self.root = Path(root)
        if layout not in LAYOUTS:
            raise FeatureStoreError(f"data.format must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if not self.root.is_dir():
            raise FeatureStoreError(f"{self.root}: no such features folder")
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        self.dir = self.root
        if self.layout == "trident":
            self.dir = _trident_features_dir(self.root)

    def __repr__(self) -> str:
        return f"FeatureSource({str(self.dir)!r}, layout={self.layout!r})"

    def candidates(self, slide_id: str) -> list[tuple[Path, str]]:
        """(path, reader) pairs where this slide's features may be, most preferred first."""
        d = self.dir
        if self.layout in ("h5", "trident"):
            return [(d / f"{slide_id}.h5", "h5")]
        if self.layout == "zarr":
            return [(d / "features.zarr" / slide_id, "zarr")]
        if self.layout == "clam":
            return [(d / "h5_files" / f"{slide_id}.h5", "h5"), (d / "pt_files" / f"{slide_id}.pt", "pt")]
        return [(d / f"{slide_id}.pt", "pt")]

    def locate(self, slide_id: str) -> tuple[Path, str] | None:
        for path, kind in self.candidates(slide_id):
            if (kind == "zarr" and (path / "zarr.json").is_file()) or (kind != "zarr" and path.is_file()):
                return path, kind
        return None

    def exists(self, slide_id: str) -> bool:
        return self.locate(slide_id) is not None

    def _found(self, slide_id: str) -> tuple[Path, str]:
        found = self.locate(slide_id)
        if found is None:
            where = " or ".join(str(p) for p, _ in self.candidates(slide_id))
            raise FeatureStoreError(f"no features for slide {slide_id!r} (looked for {where})")
        return found

    def shape(self, slide_id: str) -> tuple[int, int]:
        """(N, D) of a slide's features from the file's metadata, without reading the features
        (a pt file is memory-mapped, not read; one in torch's old, unmappable format is read)."""
        path, kind = self._found(slide_id)
        if kind == "h5":
            import h5py

            try:
                with h5py.File(path, "r") as f:
                    if "features" not in f:
                        raise FeatureStoreError(f"{path}: no dataset 'features'")
                    shape = tuple(f["features"].shape)
            except OSError as e:
                raise FeatureStoreError(f"{path}: not a readable HDF5 file ({e})") from e
        elif kind == "zarr":
            import zarr

            group = zarr.open_group(str(path), mode="r")
            if "features" not in group:
                raise FeatureStoreError(f"{path}: no array 'features'")
            shape = tuple(group["features"].shape)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                feats = obj.get("features", obj.get("feats")) if isinstance(obj, dict) else obj
                shape = tuple(feats.shape)
            except Exception:  # not mappable (legacy format) or malformed: read() says which, or reads it
                shape = tuple(self.read(slide_id).features.shape)
        while len(shape) > 2 and shape[0] == 1:  # the batch axis of one that _check_bag drops
            shape = shape[1:]
        if len(shape) != 2:
            raise FeatureStoreError(f"{path}: features must be (N >= 1, D), got shape {shape}")
        return int(shape[0]), int(shape[1])

    def read(self, slide_id: str) -> Bag:
        path, kind = self._found(slide_id)
        if kind == "h5":
            bag = _read_h5(path, slide_id)
        elif kind == "pt":
            bag = _read_pt(path, slide_id)
        else:
            bag = _read_zarr(self.dir / "features.zarr", slide_id)
        return _check_bag(bag)


def _trident_features_dir(root: Path) -> Path:
    if root.name.startswith("features_") and any(root.glob("*.h5")):
        return root
    found = sorted(p for p in list(root.glob("features_*")) + list(root.glob("*/features_*")) if p.is_dir())
    found = [p for p in found if any(p.glob("*.h5"))]
    if not found:
        raise FeatureStoreError(f"{root}: no TRIDENT features_<encoder>/ folder with .h5 files (looked in {root} and its subfolders)")
    if len(found) > 1:
        raise FeatureStoreError(
            f"{root}: several TRIDENT feature folders ({', '.join(str(p.relative_to(root)) for p in found)}); "
            "set data.features to the one to use"
        )
    return found[0]


def detect_layout(root: Path) -> str:
    """The layout of a features folder (see the module docstring), or FeatureStoreError."""
    root = Path(root)
    if (root / "features.zarr").is_dir():
        return "zarr"
    if (root / "h5_files").is_dir() or (root / "pt_files").is_dir():
        return "clam"
    if any(root.glob("*.h5")):
        return "h5"
    if any(p.is_dir() for p in list(root.glob("features_*")) + list(root.glob("*/features_*"))):
        return "trident"
    if any(root.glob("*.pt")):
        return "pt"
    raise FeatureStoreError(
        f"{root}: no feature files found (looked for <slide_id>.h5, features.zarr/, h5_files/ or pt_files/ "
        "(CLAM), features_<encoder>/ (TRIDENT), <slide_id>.pt)"
    )


class BagDataset(Dataset):
    """The bags of a list of slides with their class labels.

    Item i: ``{"features": float32 (N, D), "label": int64 (), "index": i}``. With ``preload`` every bag
    is read once here and kept in RAM; otherwise each access reads its file. Every bag must have
    the same feature width D (``in_dim``), read from the first slide.
    """

    def __init__(self, source: FeatureSource, slide_ids: list[str], labels: np.ndarray, preload: bool = False):
        if len(slide_ids) != len(labels):
            raise ValueError("slide_ids and labels differ in length")
        if not slide_ids:
            raise FeatureStoreError("no slides to read")
        self.source, self.slide_ids, self.labels = source, list(slide_ids), np.asarray(labels, np.int64)
        first = source.read(self.slide_ids[0])
        self.in_dim = int(first.features.shape[1])
        self._first_path = first.path
        self._cache: list[torch.Tensor] | None = None
        if preload:
            self._cache = [torch.from_numpy(first.features)]
            self._cache += [self._load(sid) for sid in self.slide_ids[1:]]

    def _load(self, slide_id: str) -> torch.Tensor:
        bag = self.source.read(slide_id)
        if bag.features.shape[1] != self.in_dim:
            raise FeatureStoreError(
                f"{bag.path}: {bag.features.shape[1]}-d features, but {self._first_path} has {self.in_dim}-d "
                "(mixed encoders in one features folder?)"
            )
        return torch.from_numpy(bag.features)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def feature_bytes(self, i: int) -> int:
        """Bytes of bag i's features as served (float32 (N, D)), from the file's metadata alone."""
        if self._cache is not None:
            return self._cache[i].numel() * 4
        n, d = self.source.shape(self.slide_ids[i])
        return n * d * 4

    def __getitem__(self, i: int) -> dict:
        feats = self._cache[i] if self._cache is not None else self._load(self.slide_ids[i])
        return {"features": feats, "label": torch.tensor(self.labels[i]), "index": i}
