"""Image classification data: ImageFolder trees, CNFOOD-241's list layout, transforms, synthetic images.

Layouts (`data.format`):

- ``imagefolder``: ``root/train/<class>/*.jpg`` with optional ``root/val/<class>/`` and
  ``root/test/<class>/``; or ``root/<class>/*.jpg`` directly (no splits). Classes are the training
  folder's subfolders, sorted (torchvision's ``find_classes``).
- ``cnfood241``: an image root (CNFOOD-241's ``train600x600/``, class folders ``000/`` … ``240/``) and
  list files with one ``relative/path.jpg label`` per line, label an integer class index — the
  ``train.txt`` / ``val.txt`` / ``test.txt`` of the Res-VMamba repository's ``CNFOOD241_data_split/``.

Without a validation split, ``val_fraction`` of the training images of every class is held out
(seeded). Every listed file is checked before training: a missing image or an empty class folder is
an :class:`ImageDataError` naming the path.

:func:`synth_images` writes a procedural dataset (stripes, checkerboards, discs, rings, … in random
colours, positions and scales, with noise) in either layout, the same for the same seed.
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARTS = ("train", "val", "test")


class ImageDataError(WsimambaError):
    """An image folder or list file is missing, empty, malformed, or names a file that does not exist."""


@dataclass
class ImageSplits:
    """Images by part: (path, class index) pairs; `root` is what paths are shown relative to."""

    root: Path
    classes: list[str]
    parts: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)
    source: str = ""  # how the splits were found, for the report

    def __getitem__(self, part: str) -> list[tuple[Path, int]]:
        return self.parts.get(part, [])

    def counts(self) -> dict[str, int]:
        return {p: len(self[p]) for p in PARTS}

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


# ---------------------------------------------------------------------------------------------
# layouts


def _shown(paths: Sequence, limit: int = 5) -> str:
    text = ", ".join(str(p) for p in paths[:limit])
    return text + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _scan_folder(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, samples) of one ImageFolder tree; with `classes`, the tree's folders must be among them."""
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        found, _ = find_classes(str(folder))
    except FileNotFoundError:
        raise ImageDataError(f"{folder}: no class folders in it (expected {folder}/<class>/<image>)") from None
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise ImageDataError(f"{folder}: class folder(s) not among the training classes: {_shown(extra)}")
    index = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(str(folder), {c: index[c] for c in found}, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    present = {label for _, label in samples}
    empty = [folder / c for c in found if index[c] not in present]
    if empty:
        raise ImageDataError(f"class folder without images ({', '.join(IMAGE_EXTENSIONS[:3])}, …): {_shown(empty)}")
    return classes, [(Path(p), int(y)) for p, y in samples]


def carve_val(samples: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction · n_c) images of every class c (at least one when fraction > 0 and n_c > 1)."""
    if fraction <= 0:
        return samples, []
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(samples):
        by_class.setdefault(y, []).append(i)
    held = set()
    for y in sorted(by_class):
        idx = by_class[y]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.update(rng.permutation(idx)[:k].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


def imagefolder_splits(root: str | Path, val_fraction: float = 0.1, seed: int = 0) -> ImageSplits:
    """``root/train|val|test/<class>/…`` or ``root/<class>/…`` (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageDataError(f"{root}: no such image folder")
    if (root / "train").is_dir():
        classes, train = _scan_folder(root / "train", None)
        parts = {"train": train}
        for part in ("val", "test"):
            if (root / part).is_dir():
                parts[part] = _scan_folder(root / part, classes)[1]
        source = "train/ " + " ".join(f"{p}/" for p in ("val", "test") if p in parts)
    else:
        classes, train = _scan_folder(root, None)
        parts, source = {"train": train}, "class folders"
    if "val" not in parts:
        parts["train"], parts["val"] = carve_val(parts["train"], val_fraction, seed)
        if parts["val"]:
            source += f", val carved from train ({val_fraction:g} per class, seed {seed})"
    return ImageSplits(root, classes, parts, source.strip())


def read_image_list(path: str | Path, root: Path) -> list[tuple[Path, int]]:
    """A CNFOOD-241 list file: ``relative/path.jpg label`` per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ImageDataError(f"{path}: no such list file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ImageDataError(f"{path}: line {n}: expected 'relative/path.jpg label' with an integer label "
                                 f"≥ 0, got {line!r}")
        out.append((root / parts[0], int(parts[1])))
    if not out:
        raise ImageDataError(f"{path}: the list is empty")
    return out


def cnfood241_splits(root: str | Path, train_list: str | Path, val_list: str | Path | None = None,
                     test_list: str | Path | None = None, classes: list[str] | None = None,
                     val_fraction: float = 0.1, seed: int = 0) -> ImageSplits:
    """CNFOOD-241's layout: image root + list files (module docstring). Class names default to the
    zero-padded label (``000`` … ``240``, the dataset's folder names)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageDataError(f"{root}: no such image root")
    lists = {"train": train_list, "val": val_list, "test": test_list}
    parts = {p: read_image_list(f, root) for p, f in lists.items() if f is not None}
    for part, samples in parts.items():
        missing = [p for p, _ in samples if not p.is_file()]
        if missing:
            raise ImageDataError(f"{lists[part]}: {len(missing)} listed image(s) not found: {_shown(missing, 3)}")
    n_classes = 1 + max(y for samples in parts.values() for _, y in samples)
    if classes is not None:
        if len(classes) < n_classes:
            raise ImageDataError(f"data.classes names {len(classes)} classes but the lists use label {n_classes - 1}")
    else:
        width = max(3, len(str(n_classes - 1)))
        classes = [f"{i:0{width}d}" for i in range(n_classes)]
    absent = sorted(set(range(len(classes))) - {y for _, y in parts["train"]})
    if absent:
        raise ImageDataError(f"{train_list}: no training image of class(es) {_shown([classes[i] for i in absent])}")
    source = "lists " + ", ".join(f"{p}={Path(f).name}" for p, f in lists.items() if f is not None)
    if "val" not in parts:
        parts["train"], parts["val"] = carve_val(parts["train"], val_fraction, seed)
        if parts["val"]:
            source += f", val carved from train ({val_fraction:g} per class, seed {seed})"
    return ImageSplits(root, list(classes), parts, source)


def load_splits_csv(path: Path, root: Path, classes: list[str]) -> ImageSplits:
    """The splits.csv of a run folder (part,path,label; paths relative to `root`), files checked."""
    index = {c: i for i, c in enumerate(classes)}
    parts: dict[str, list] = {p: [] for p in PARTS}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["label"] not in index or row["part"] not in parts:
                raise ImageDataError(f"{path}: row {row} has an unknown class or part")
            parts[row["part"]].append((root / row["path"], index[row["label"]]))
    missing = [p for samples in parts.values() for p, _ in samples if not p.is_file()]
    if missing:
        raise ImageDataError(f"{path}: {len(missing)} image(s) of the saved splits not found: {_shown(missing, 3)}")
    return ImageSplits(root, classes, {p: s for p, s in parts.items() if s}, f"saved splits ({path.name})")


def splits_csv(splits: ImageSplits) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["part", "path", "label"])
    for part in PARTS:
        for p, y in splits[part]:
            w.writerow([part, splits.relative(p), splits.classes[y]])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# transforms and the dataset


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[name]


def train_transform(image_size: int, augment, interpolation: str = "bicubic") -> Callable:
    """RandomResizedCrop → flip → policy (TrivialAugmentWide / RandAugment / ColorJitter) → tensor →
    ImageNet normalisation → RandomErasing. `augment` is a wsimamba.config.AugmentConfig."""
    from torchvision.transforms import v2

    from torchvision.transforms import InterpolationMode

    # PIL images until the policy: torchvision's tensor rotate/affine kernels take no bicubic
    ops = [v2.RandomResizedCrop(image_size, scale=tuple(augment.crop_scale), interpolation=_interp(interpolation),
                                antialias=True)]
    if augment.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if augment.policy == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    elif augment.policy == "randaugment":
        ops.append(v2.RandAugment(num_ops=2, magnitude=augment.randaugment_magnitude,
                                  interpolation=InterpolationMode.BILINEAR))
    elif augment.policy == "colorjitter" and augment.color_jitter > 0:
        j = augment.color_jitter
        ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment.random_erasing > 0:
        ops.append(v2.RandomErasing(p=augment.random_erasing, value=0))
    return v2.Compose(ops)


def eval_transform(image_size: int, eval_crop: float = 0.875, interpolation: str = "bicubic") -> Callable:
    """Resize the short side to image_size / eval_crop, center-crop image_size, normalise."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.Resize(int(round(image_size / eval_crop)), interpolation=_interp(interpolation), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageDataset(Dataset):
    """(path, label) pairs → dicts ``image`` (3, S, S) float, ``label`` int64, ``index``."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable | None = None):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise ImageDataError(f"{path}: image not found") from None
        except OSError as e:
            raise ImageDataError(f"{path}: not a readable image ({e})") from None
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": torch.tensor(label, dtype=torch.long), "index": i}


# ---------------------------------------------------------------------------------------------
# synthetic images

PATTERNS = ("hstripes", "vstripes", "checker", "disc", "ring", "dstripes", "dots", "cross", "triangle", "square")


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A foreground mask in [0, 1], (size, size), of one pattern at a random scale, phase and place."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    period = rng.uniform(0.12, 0.3)
    phase = rng.uniform(0, 1)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    r = rng.uniform(0.18, 0.3)
    if kind == "hstripes":
        m = ((yy / period + phase) % 1) < 0.5
    elif kind == "vstripes":
        m = ((xx / period + phase) % 1) < 0.5
    elif kind == "dstripes":
        m = (((xx + yy) / period + phase) % 1) < 0.5
    elif kind == "checker":
        m = ((np.floor(xx / period + phase) + np.floor(yy / period + phase)) % 2) == 0
    elif kind == "dots":
        u, v = (xx / period + phase) % 1 - 0.5, (yy / period + phase) % 1 - 0.5
        m = u * u + v * v < 0.08
    elif kind == "disc":
        m = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    elif kind == "ring":
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        m = (d < r) & (d > 0.55 * r)
    elif kind == "cross":
        w = r * 0.35
        m = ((np.abs(xx - cx) < w) & (np.abs(yy - cy) < r)) | ((np.abs(yy - cy) < w) & (np.abs(xx - cx) < r))
    elif kind == "triangle":
        t = (yy - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        m = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    elif kind == "square":
        m = (np.abs(xx - cx) < r * 0.85) & (np.abs(yy - cy) < r * 0.85)
    else:
        raise ValueError(kind)
    return m.astype(np.float64)


def synth_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image (size, size, 3) of class `label` (PATTERNS[label]): the pattern in one random
    colour on another, with a brightness gradient and pixel noise, so colour says nothing about the class."""
    mask = _pattern(PATTERNS[label], size, rng)
    fg, bg = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
    while np.abs(fg - bg).sum() < 0.6:  # keep the pattern visible
        fg = rng.uniform(0, 1, size=3)
    img = bg * (1 - mask[..., None]) + fg * mask[..., None]
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    img = img * (0.85 + 0.15 * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    img = img + rng.normal(0, 0.06, size=img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@dataclass
class SynthImages:
    root: Path
    layout: str
    classes: list[str]
    counts: dict[str, int]
    lists: dict[str, Path] = field(default_factory=dict)  # cnfood241: part → list file
    image_root: Path | None = None  # cnfood241: what the lists are relative to


def synth_images(out: str | Path, classes: int = 4, per_class: int = 40, size: int = 64, seed: int = 0,
                 val_fraction: float = 0.2, test_fraction: float = 0.2, layout: str = "imagefolder",
                 progress: Callable[[int, int], None] | None = None) -> SynthImages:
    """Write `classes` × `per_class` synthetic PNG images; each image depends only on (seed, class, index).

    imagefolder: ``out/train|val|test/<class>/<class>_<i>.png`` (``out/<class>/…`` when both fractions
    are 0). cnfood241: ``out/images/<NNN>/<NNNNNN>.png`` plus ``out/train.txt``, ``val.txt``, ``test.txt``
    with ``NNN/NNNNNN.png label`` lines. Split sizes are round(fraction · per_class) per class.
    """
    from PIL import Image

    from wsimamba.atomic import atomic_path, write_text_atomic

    if not 2 <= classes <= len(PATTERNS):
        raise ImageDataError(f"--classes must be 2 to {len(PATTERNS)} (one per pattern: {', '.join(PATTERNS)})")
    if per_class < 1 or size < 8:
        raise ImageDataError("--per-class must be ≥ 1 and --size ≥ 8")
    if layout not in ("imagefolder", "cnfood241"):
        raise ImageDataError(f"layout must be imagefolder or cnfood241, got {layout!r}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ImageDataError("val and test fractions must be ≥ 0 and sum to less than 1")
    out = Path(out)
    n_val, n_test = round(val_fraction * per_class), round(test_fraction * per_class)
    names = list(PATTERNS[:classes])
    lines: dict[str, list[str]] = {p: [] for p in PARTS}
    total, done = classes * per_class, 0
    for c, name in enumerate(names):
        for i in range(per_class):
            part = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            rng = np.random.default_rng([seed, c, i])
            if layout == "cnfood241":
                rel = f"{c:03d}/{c * per_class + i:06d}.png"
                path = out / "images" / rel
                lines[part].append(f"{rel} {c}")
            elif n_val == 0 and n_test == 0:
                path = out / name / f"{name}_{i:04d}.png"
            else:
                path = out / part / name / f"{name}_{i:04d}.png"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    Image.fromarray(synth_image(c, size, rng)).save(tmp)
            done += 1
            if progress is not None:
                progress(done, total)
    counts = {"train": classes * (per_class - n_val - n_test), "val": classes * n_val, "test": classes * n_test}
    result = SynthImages(out, layout, names, counts)
    if layout == "cnfood241":
        result.image_root = out / "images"
        for part in PARTS:
            if lines[part]:
                write_text_atomic(out / f"{part}.txt", "\n".join(lines[part]) + "\n")
                result.lists[part] = out / f"{part}.txt"
    return result
