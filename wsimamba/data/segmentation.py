"""Segmentation data: image/mask pairs in folders, 2D images or 3D volumes, joint augmentations.

Layouts (``data.root``):

- ``root/images/`` + ``root/masks/``: a mask has its image's file stem (``a.png`` ↔ ``masks/a.png``;
  ``v.nii.gz`` ↔ ``masks/v.nii.gz``; suffixes may differ). With ``root/index.csv`` (or ``data.index``),
  a CSV with an ``image`` column (paths relative to root) and optionally ``mask``, ``split``
  (train / val / test) and a group column (``group``, ``case_id`` or ``slide``), only the listed pairs
  are used — `wsimamba tiles` writes such an index, with splits by slide. Without a split column,
  ``val_fraction`` / ``test_fraction`` of the groups (each image its own group when there is no group
  column) are held out, seeded.
- ``root/train/`` with optional ``root/val/`` and ``root/test/``, each holding ``images/`` + ``masks/``.

Files: 2D images are PNG, TIFF or JPEG (grey or RGB; RGBA and palette images are read as RGB), masks
PNG or TIFF of integer class values. 3D (``spatial_dims: 3``) volumes are ``.npy`` — ``(D, H, W)`` or
channel-first ``(C, D, H, W)`` — or NIfTI ``.nii`` / ``.nii.gz`` (read with nibabel) — ``(X, Y, Z)`` or
``(X, Y, Z, C)`` — with masks of the same spatial shape. Mask values must lie in 0..num_classes-1;
binary masks saved as 0/255 (viewable PNGs, as `wsimamba synth` and `wsimamba tiles` write) are read
as 0/1. An image without its mask, a shape mismatch or an out-of-range mask value is a
:class:`SegmentationDataError` naming the file.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from wsimamba.errors import WsimambaError

SUFFIXES_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
SUFFIXES_3D = (".npy", ".nii", ".nii.gz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARTS = ("train", "val", "test")


class SegmentationDataError(WsimambaError):
    """An image or mask is missing, unreadable, of the wrong shape, or holds values outside the classes."""


def _shown(items: Sequence, limit: int = 3) -> str:
    text = ", ".join(str(p) for p in list(items)[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def file_stem(path: Path) -> str:
    """The name without its suffix (``.nii.gz`` counts as one)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def suffixes_for(spatial_dims: int) -> tuple[str, ...]:
    return SUFFIXES_3D if spatial_dims == 3 else SUFFIXES_2D


# ---------------------------------------------------------------------------------------------
# reading files


def read_array(path: str | Path, is_mask: bool = False) -> np.ndarray:
    """The raw array of an image or mask file (PNG/TIFF/JPEG, .npy, NIfTI), as stored.

    2D images come back (H, W) or (H, W, C); NIfTI (X, Y, Z[, C]); .npy as saved.
    """
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            img = nib.load(str(path))
            # dataobj keeps the stored dtype (get_fdata would turn label maps into float64)
            return np.asanyarray(img.dataobj)
        if suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from PIL import Image

        with Image.open(path) as im:
            if is_mask:
                if im.mode in ("RGB", "RGBA"):
                    arr = np.asarray(im.convert("RGB"))
                    if not (arr[..., 0] == arr[..., 1]).all() or not (arr[..., 0] == arr[..., 2]).all():
                        raise SegmentationDataError(f"{path}: a colour mask; masks hold one class value per pixel "
                                                    "(a grey or palette image)")
                    return np.ascontiguousarray(arr[..., 0])
                return np.asarray(im)  # L, P (palette indices), I, 1
            if im.mode not in ("L", "RGB", "I", "I;16", "F"):
                im = im.convert("RGB")
            return np.asarray(im)
    except FileNotFoundError:
        raise SegmentationDataError(f"{path}: no such file") from None
    except SegmentationDataError:
        raise
    except Exception as e:  # noqa: BLE001 (every reader raises its own types)
        raise SegmentationDataError(f"{path}: not a readable {'mask' if is_mask else 'image'} "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def image_channels_first(arr: np.ndarray, path: Path, spatial_dims: int) -> np.ndarray:
    """(C, *spatial) from a stored image array (layouts in the module docstring)."""
    suffix = _suffix(Path(path))
    if spatial_dims == 2:
        if arr.ndim == 2:
            return arr[None]
        if arr.ndim == 3 and arr.shape[-1] <= 4:
            return np.moveaxis(arr, -1, 0)
        raise SegmentationDataError(f"{path}: a 2D image must be (H, W) or (H, W, C≤4), got shape {arr.shape}")
    if arr.ndim == 3:
        return arr[None]
    if arr.ndim == 4:
        return np.moveaxis(arr, -1, 0) if suffix in (".nii", ".nii.gz") else arr
    raise SegmentationDataError(f"{path}: a 3D volume must have 3 axes (or 4 with channels), got shape {arr.shape}")


def mask_labels(arr: np.ndarray, path: Path, spatial_dims: int, num_classes: int) -> np.ndarray:
    """Class indices int64 (*spatial) from a stored mask; 0/255 binary masks become 0/1."""
    arr = np.asarray(arr)
    if arr.ndim == spatial_dims + 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != spatial_dims:
        raise SegmentationDataError(f"{path}: a mask must have {spatial_dims} axes, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise SegmentationDataError(f"{path}: mask values must be whole numbers (class indices)")
    elif arr.dtype.kind not in "iub":
        raise SegmentationDataError(f"{path}: mask dtype {arr.dtype} is not numeric")
    values = np.unique(arr)
    if num_classes == 2 and values.size and set(values.tolist()) <= {0, 255}:
        return (arr > 0).astype(np.int64)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise SegmentationDataError(f"{path}: mask values {_shown([int(v) for v in bad], 5)} are outside 0..{num_classes - 1} "
                                    f"(data.num_classes: {num_classes})")
    return arr.astype(np.int64)


def spatial_shape(path: Path, spatial_dims: int, is_mask: bool = False) -> tuple[int, ...]:
    """The spatial shape of an image/mask file, from its header where the format has one."""
    suffix = _suffix(path)
    try:
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r").shape
        elif suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            shape = nib.load(str(path)).shape
            return tuple(int(s) for s in shape[:3])
        elif suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                shape = tf.series[0].shape
            if len(shape) == 3 and shape[0] <= 4 and shape[-1] > 4:  # planar (C, H, W)
                return tuple(int(s) for s in shape[1:])
            return tuple(int(s) for s in shape[:2])
        else:
            from PIL import Image

            with Image.open(path) as im:
                return (im.height, im.width)
    except FileNotFoundError:
        raise SegmentationDataError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001
        raise SegmentationDataError(f"{path}: not readable ({e})") from None
    shape = tuple(int(s) for s in shape)
    if spatial_dims == 3 and len(shape) == 4 and not is_mask:
        return shape[1:]
    return shape[:spatial_dims]


# ---------------------------------------------------------------------------------------------
# layouts and splits


@dataclass
class SegSplits:
    """Pairs (image, mask) by part; `root` is what paths are shown relative to."""

    root: Path
    parts: dict[str, list[tuple[Path, Path]]] = field(default_factory=dict)
    source: str = ""

    def __getitem__(self, part: str) -> list[tuple[Path, Path]]:
        return self.parts.get(part, [])

    def counts(self) -> dict[str, int]:
        return {p: len(self[p]) for p in PARTS}

    def relative(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


def _list_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _suffix(p) in suffixes)


def find_mask(image: Path, masks_dir: Path, suffixes: tuple[str, ...]) -> Path:
    """The mask of `image` in `masks_dir`: the same stem, any of `suffixes` (the image's own first)."""
    stem = file_stem(image)
    own = _suffix(image)
    for suffix in (own,) + tuple(s for s in suffixes if s != own):
        cand = masks_dir / f"{stem}{suffix}"
        if cand.is_file():
            return cand
    raise SegmentationDataError(f"{image}: no mask for this image (looked for {masks_dir / stem}"
                                f"{{{','.join(suffixes)}}})")


def folder_pairs(folder: Path, images: str, masks: str, spatial_dims: int) -> list[tuple[Path, Path]]:
    """Every image of `folder/images` with its mask in `folder/masks`; a missing mask is an error."""
    suffixes = suffixes_for(spatial_dims)
    idir, mdir = folder / images, folder / masks
    if not idir.is_dir():
        raise SegmentationDataError(f"{idir}: no such image folder")
    if not mdir.is_dir():
        raise SegmentationDataError(f"{mdir}: no such mask folder")
    files = _list_files(idir, suffixes)
    if not files:
        raise SegmentationDataError(f"{idir}: no {'/'.join(suffixes)} files in it (data.spatial_dims: {spatial_dims})")
    return [(f, find_mask(f, mdir, suffixes)) for f in files]


def carve_groups(pairs: list, groups: list[str], fractions: dict[str, float], seed: int) -> dict[str, list]:
    """Split `pairs` by group: round(fraction · n_groups) groups per held-out part (at least one when the
    fraction is > 0 and groups remain for training), the rest train. Same seed, same split."""
    uniq = sorted(set(groups))
    order = [uniq[i] for i in np.random.default_rng(seed).permutation(len(uniq))]
    taken: dict[str, str] = {}
    pos = 0
    for part in ("test", "val"):
        f = fractions.get(part, 0.0)
        if f <= 0:
            continue
        k = max(1, int(round(f * len(uniq))))
        k = min(k, len(uniq) - pos - 1)  # keep at least one group for training
        for g in order[pos:pos + max(0, k)]:
            taken[g] = part
        pos += max(0, k)
    out: dict[str, list] = {p: [] for p in PARTS}
    for pair, g in zip(pairs, groups):
        out[taken.get(g, "train")].append(pair)
    return {p: v for p, v in out.items() if v}


def _read_index(path: Path, root: Path, masks: str, spatial_dims: int) -> tuple[list, list, list]:
    """(pairs, splits or None per row, groups) from an index CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SegmentationDataError(f"{path}: the index is empty")
    if "image" not in rows[0]:
        raise SegmentationDataError(f"{path}: needs an 'image' column (has: {', '.join(rows[0])})")
    group_col = next((c for c in ("group", "case_id", "slide") if c in rows[0]), None)
    suffixes = suffixes_for(spatial_dims)
    pairs, splits, groups = [], [], []
    for n, row in enumerate(rows, 2):
        image = root / row["image"]
        if not image.is_file():
            raise SegmentationDataError(f"{path}: line {n}: image {image} not found")
        if row.get("mask"):
            mask = root / row["mask"]
            if not mask.is_file():
                raise SegmentationDataError(f"{image}: its mask {mask} (index {path.name}, line {n}) not found")
        else:
            mask = find_mask(image, root / masks, suffixes)
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in PARTS:
            raise SegmentationDataError(f"{path}: line {n}: split must be train, val or test (got {split!r})")
        pairs.append((image, mask))
        splits.append(split)
        groups.append(row[group_col] if group_col else file_stem(image))
    return pairs, splits, groups


def find_pairs(root: str | Path, images: str = "images", masks: str = "masks", index: str | Path | None = None,
               spatial_dims: int = 2, val_fraction: float = 0.15, test_fraction: float = 0.0,
               seed: int = 0) -> SegSplits:
    """The pairs of a dataset by part (module docstring for the layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise SegmentationDataError(f"{root}: no such data folder")
    fractions = {"val": val_fraction, "test": test_fraction}
    if index is None and (root / "index.csv").is_file():
        index = root / "index.csv"
    if index is not None:
        index = Path(index)
        if not index.is_file():
            raise SegmentationDataError(f"{index}: no such index file (data.index)")
        pairs, splits, groups = _read_index(index, root, masks, spatial_dims)
        if all(s is not None for s in splits):
            parts = {p: [pr for pr, s in zip(pairs, splits) if s == p] for p in PARTS}
            parts = {p: v for p, v in parts.items() if v}
            source = f"{index.name} (split column)"
            if "val" not in parts and val_fraction > 0:  # hold out training groups for validation
                train_groups = [g for g, s in zip(groups, splits) if s == "train"]
                carved = carve_groups(parts["train"], train_groups, {"val": val_fraction}, seed)
                parts.update(carved)
                source += f", val carved from train ({val_fraction:g} of groups, seed {seed})"
        else:
            parts = carve_groups(pairs, groups, fractions, seed)
            source = f"{index.name}, carved by group ({val_fraction:g} val, {test_fraction:g} test, seed {seed})"
    elif (root / "train").is_dir():
        parts = {"train": folder_pairs(root / "train", images, masks, spatial_dims)}
        for part in ("val", "test"):
            if (root / part).is_dir():
                parts[part] = folder_pairs(root / part, images, masks, spatial_dims)
        source = "train/ " + " ".join(f"{p}/" for p in ("val", "test") if p in parts)
        if "val" not in parts and val_fraction > 0:
            pairs = parts["train"]
            parts.update(carve_groups(pairs, [file_stem(i) for i, _ in pairs], {"val": val_fraction}, seed))
            source += f", val carved from train ({val_fraction:g}, seed {seed})"
    else:
        pairs = folder_pairs(root, images, masks, spatial_dims)
        parts = carve_groups(pairs, [file_stem(i) for i, _ in pairs], fractions, seed)
        source = f"{images}/ + {masks}/, carved ({val_fraction:g} val, {test_fraction:g} test, seed {seed})"
    if not parts.get("train"):
        raise SegmentationDataError(f"{root}: no training pairs")
    return SegSplits(root, parts, source.strip())


def load_splits_csv(path: Path, root: Path) -> SegSplits:
    """The splits.csv of a run folder (part,image,mask; paths relative to `root`), files checked."""
    parts: dict[str, list] = {p: [] for p in PARTS}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("part") not in parts:
                raise SegmentationDataError(f"{path}: row {row} has an unknown part")
            parts[row["part"]].append((root / row["image"], root / row["mask"]))
    missing = [p for pairs in parts.values() for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise SegmentationDataError(f"{path}: {len(missing)} file(s) of the saved splits not found: {_shown(missing)}")
    return SegSplits(root, {p: v for p, v in parts.items() if v}, f"saved splits ({path.name})")


def splits_csv(splits: SegSplits) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["part", "image", "mask"])
    for part in PARTS:
        for image, mask in splits[part]:
            w.writerow([part, splits.relative(image), splits.relative(mask)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# normalisation and augmentation


def to_float(image: np.ndarray) -> tuple[torch.Tensor, bool]:
    """float32 tensor of an image array; 8-bit images scaled to [0, 1]. Returns (tensor, was_uint8)."""
    is_u8 = image.dtype == np.uint8
    t = torch.from_numpy(np.ascontiguousarray(image).astype(np.float32))
    return (t / 255.0 if is_u8 else t), is_u8


def normalize(image: torch.Tensor, mode: str, was_uint8: bool) -> torch.Tensor:
    """(C, *S) float → normalised; `mode` as data.normalize (module docstring of SegDataConfig)."""
    if mode == "auto":
        mode = "imagenet" if (was_uint8 and image.shape[0] == 3) else "zscore"
    if mode == "imagenet":
        if image.shape[0] != 3:
            raise SegmentationDataError(f"data.normalize: imagenet needs 3-channel images, got {image.shape[0]}")
        shape = (3,) + (1,) * (image.ndim - 1)
        return (image - torch.tensor(IMAGENET_MEAN).view(shape)) / torch.tensor(IMAGENET_STD).view(shape)
    if mode == "zscore":
        dims = tuple(range(1, image.ndim))
        mean = image.mean(dims, keepdim=True)
        std = image.std(dims, keepdim=True)
        return (image - mean) / std.clamp_min(1e-6)
    return image


def _crop_sides(crop, spatial_dims: int) -> tuple[int, ...] | None:
    if crop is None:
        return None
    return tuple(crop) if isinstance(crop, (list, tuple)) else (int(crop),) * spatial_dims


class _Rot90:
    """A random multiple of 90° in the last two axes of every tensor given (image and mask alike);
    only 0° / 180° when those axes differ in length."""

    def __call__(self, *inputs):
        from torchvision import tv_tensors

        h, w = inputs[0].shape[-2:]
        k = int(torch.randint(0, 4, ()).item()) if h == w else 2 * int(torch.randint(0, 2, ()).item())
        out = tuple(tv_tensors.wrap(torch.rot90(x, k, dims=(-2, -1)), like=x) for x in inputs)
        return out if len(out) > 1 else out[0]


def train_transform(augment, spatial_dims: int, channels: int) -> Callable:
    """Joint augmentation of (image (C, *S) float, mask (*S) int64) → the same pair.

    2D: torchvision.transforms.v2 on tv_tensors.Image / tv_tensors.Mask (random crop padded with
    zeros, flips, rot90, colour jitter on RGB). 3D: the same crop / flips / rot90 on the volume axes.
    """
    sides = _crop_sides(augment.crop, spatial_dims)
    if spatial_dims == 2:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        ops: list = []
        if sides is not None:
            ops.append(v2.RandomCrop(sides, pad_if_needed=True, fill=0))
        if augment.flip:
            ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if augment.rot90:
            ops.append(_Rot90())
        if augment.color_jitter > 0 and channels == 3:
            j = augment.color_jitter
            ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 5)))
        compose = v2.Compose(ops) if ops else None

        def apply2d(image: torch.Tensor, mask: torch.Tensor):
            if compose is None:
                return image, mask
            img, msk = compose(tv_tensors.Image(image), tv_tensors.Mask(mask))
            return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)

        return apply2d

    def apply3d(image: torch.Tensor, mask: torch.Tensor):
        if sides is not None:
            image, mask = random_crop_nd(image, mask, sides)
        if augment.flip:
            for axis in range(1, 4):
                if torch.rand(()) < 0.5:
                    image, mask = image.flip(axis), mask.flip(axis - 1)
        if augment.rot90:
            h, w = image.shape[-2:]
            k = int(torch.randint(0, 4, ()).item()) if h == w else 2 * int(torch.randint(0, 2, ()).item())
            image, mask = torch.rot90(image, k, dims=(-2, -1)), torch.rot90(mask, k, dims=(-2, -1))
        return image.contiguous(), mask.contiguous()

    return apply3d


def random_crop_nd(image: torch.Tensor, mask: torch.Tensor, sides: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A random crop of `sides` from image (C, *S) and mask (*S), zero-padded where S is smaller."""
    spatial = image.shape[1:]
    pad = [max(0, s - n) for s, n in zip(sides, spatial)]
    if any(pad):
        flat = []
        for p in reversed(pad):
            flat += [p // 2, p - p // 2]
        image = torch.nn.functional.pad(image, flat)
        mask = torch.nn.functional.pad(mask, flat)
    starts = [int(torch.randint(0, n - s + 1, ()).item()) for s, n in zip(sides, image.shape[1:])]
    idx = tuple(slice(a, a + s) for a, s in zip(starts, sides))
    return image[(slice(None),) + idx], mask[idx]


# ---------------------------------------------------------------------------------------------
# the dataset


class SegmentationDataset(Dataset):
    """(image, mask) pairs → dicts ``image`` float (C, *S) normalised, ``mask`` int64 (*S), ``index``.

    `transform(image, mask)` runs on the [0, 1]-scaled (8-bit) or raw image before normalisation.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], spatial_dims: int = 2, num_classes: int = 2,
                 normalize: str = "auto", transform: Callable | None = None):
        self.pairs, self.spatial_dims, self.num_classes = list(pairs), spatial_dims, num_classes
        self.normalize, self.transform = normalize, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw image (C, *S) (stored dtype) and class indices (*S) of pair i, checked."""
        image_path, mask_path = self.pairs[i]
        image = image_channels_first(read_array(image_path), image_path, self.spatial_dims)
        mask = mask_labels(read_array(mask_path, is_mask=True), mask_path, self.spatial_dims, self.num_classes)
        if tuple(image.shape[1:]) != tuple(mask.shape):
            raise SegmentationDataError(f"{mask_path}: mask shape {tuple(mask.shape)} differs from its image's "
                                        f"{tuple(image.shape[1:])} ({image_path})")
        return image, mask

    def __getitem__(self, i: int) -> dict:
        image, mask = self.load(i)
        x, was_u8 = to_float(image)
        y = torch.from_numpy(mask)
        if self.transform is not None:
            x, y = self.transform(x, y)
        return {"image": normalize(x, self.normalize, was_u8).contiguous(), "mask": y.long().contiguous(), "index": i}

    def channels(self) -> int:
        """Channels of the first image."""
        image, _ = self.load(0)
        return int(image.shape[0])

    def shapes(self) -> list[tuple[int, ...]]:
        """Spatial shape of every image (from file headers)."""
        return [spatial_shape(p, self.spatial_dims) for p, _ in self.pairs]
