"""The feature store: one HDF5 file per slide (CLAM / TRIDENT layout), or one Zarr group per slide.

Layout (DESIGN.md "Formats"): `features` float32 (N, D); `coords` int64 (N, 2), top-left (x, y) in
level-0 pixels, with the grid's attributes; file / group attributes for the encoder, its weights,
the package version, tissue-detection parameters and the slide path.

A slide's output appears under its final name only when complete: writers fill a temporary file
(HDF5: `.<id>.h5.partial` beside the final file; Zarr: `.partial/<id>` beside the store) and
rename it into place in `finalize`. A run killed mid-slide leaves only the temporary, which the next
run removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from wsimamba.errors import FeatureStoreError

FORMATS = ("h5", "zarr")
ZARR_STORE = "features.zarr"


def _clean_attrs(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, Path):
            v = str(v)
        elif v is None:
            v = ""
        out[k] = v
    return out


class FeatureWriter:
    """Appends batches of (features, coords) for one slide, then publishes the result atomically."""

    def __init__(self, out_dir: Path, slide_id: str, dim: int, fmt: str = "h5"):
        if fmt not in FORMATS:
            raise FeatureStoreError(f"unknown feature format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.out_dir = Path(out_dir)
        self.slide_id = slide_id
        self.dim = int(dim)
        self.fmt = fmt
        self.n = 0
        self.final = final_path(self.out_dir, slide_id, fmt)
        self.tmp = partial_path(self.out_dir, slide_id, fmt)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        _remove(self.tmp)
        if fmt == "h5":
            import h5py

            self._f = h5py.File(self.tmp, "w")
            chunk = max(1, min(1024, (1 << 20) // max(1, self.dim * 4)))
            self._feat = self._f.create_dataset("features", shape=(0, self.dim), maxshape=(None, self.dim), dtype="float32", chunks=(chunk, self.dim))
            self._coords = self._f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(4096, 2))
        else:
            import zarr

            self._g = zarr.open_group(str(self.tmp), mode="w")
            chunk = max(1, min(4096, (4 << 20) // max(1, self.dim * 4)))
            self._feat = self._g.create_array("features", shape=(0, self.dim), chunks=(chunk, self.dim), dtype="float32")
            self._coords = self._g.create_array("coords", shape=(0, 2), chunks=(16384, 2), dtype="int64")

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        """features float (B, D); coords int (B, 2)."""
        features = np.asarray(features, dtype=np.float32)
        coords = np.asarray(coords, dtype=np.int64)
        if features.ndim != 2 or features.shape[1] != self.dim or coords.shape != (features.shape[0], 2):
            raise FeatureStoreError(
                f"{self.slide_id}: batch shapes features {features.shape} / coords {coords.shape} do not match dim {self.dim}"
            )
        b = features.shape[0]
        if b == 0:
            return
        n = self.n
        self._feat.resize((n + b, self.dim))
        self._coords.resize((n + b, 2))
        self._feat[n : n + b] = features
        self._coords[n : n + b] = coords
        self.n = n + b

    def finalize(self, coords_attrs: dict, file_attrs: dict) -> Path:
        """Write attributes, close, and rename into the final name. Returns the final path."""
        if self.fmt == "h5":
            self._coords.attrs.update(_clean_attrs(coords_attrs))
            self._f.attrs.update(_clean_attrs(file_attrs))
            self._f.close()
            os.replace(self.tmp, self.final)
        else:
            self._coords.attrs.update(_clean_attrs(coords_attrs))
            self._g.attrs.update(_clean_attrs(file_attrs))
            import zarr

            zarr.open_group(str(self.final.parent), mode="a")  # the store's root group (idempotent)
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        """Drop the temporary output (the final name is untouched)."""
        if self.fmt == "h5":
            try:
                self._f.close()
            except Exception:
                pass
        _remove(self.tmp)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def final_path(out_dir: Path, slide_id: str, fmt: str) -> Path:
    out_dir = Path(out_dir)
    if fmt == "h5":
        return out_dir / f"{slide_id}.h5"
    return out_dir / ZARR_STORE / slide_id


def partial_path(out_dir: Path, slide_id: str, fmt: str) -> Path:
    out_dir = Path(out_dir)
    if fmt == "h5":
        return out_dir / f".{slide_id}.h5.partial"
    return out_dir / ".partial" / slide_id


def is_complete(out_dir: Path, slide_id: str, fmt: str) -> bool:
    """Whether the slide's output exists under its final name (and so is complete)."""
    p = final_path(out_dir, slide_id, fmt)
    return p.is_file() if fmt == "h5" else (p / "zarr.json").is_file()


def remove_output(out_dir: Path, slide_id: str, fmt: str) -> None:
    _remove(final_path(out_dir, slide_id, fmt))
    _remove(partial_path(out_dir, slide_id, fmt))


def read_features(path: str | Path, slide_id: str | None = None) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Read one slide's features.

    `path`: an HDF5 file, or a Zarr store (`features.zarr`) with `slide_id`, or a slide's group
    folder inside one. Returns (features float32 (N, D), coords int64 (N, 2), coords attrs, file attrs).
    """
    path = Path(path)
    if path.suffix == ".h5" or path.is_file():
        import h5py

        if not path.is_file():
            raise FeatureStoreError(f"{path}: no such feature file")
        try:
            with h5py.File(path, "r") as f:
                for key in ("features", "coords"):
                    if key not in f:
                        raise FeatureStoreError(f"{path}: no dataset {key!r}")
                return f["features"][:], f["coords"][:], dict(f["coords"].attrs), dict(f.attrs)
        except OSError as e:
            raise FeatureStoreError(f"{path}: not a readable HDF5 file ({e})") from e
    import zarr

    group_path = path / slide_id if slide_id is not None else path
    if not (group_path / "zarr.json").is_file():
        raise FeatureStoreError(f"{group_path}: no Zarr group here")
    g = zarr.open_group(str(group_path), mode="r")
    for key in ("features", "coords"):
        if key not in g:
            raise FeatureStoreError(f"{group_path}: no array {key!r}")
    feats, coords = g["features"], g["coords"]
    return feats[:], coords[:], dict(coords.attrs), dict(g.attrs)
