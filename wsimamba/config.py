"""Typed configurations (pydantic v2, unknown keys forbidden) and their YAML loading.

Every validation problem becomes a ConfigError whose one line names the key and the bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsimamba.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TissueConfig(StrictModel):
    """Tissue detection (see wsimamba.slide.tissue.TissueParams for the meaning of each key)."""

    seg_mpp: float = Field(8.0, gt=0)
    min_thumb: int = Field(1024, ge=16)
    sthresh: int = Field(8, ge=0, le=255)
    mthresh: int = Field(7, ge=0)
    close: int = Field(4, ge=0)
    use_otsu: bool = False
    min_tissue_mm2: float = Field(0.05, ge=0)
    min_hole_mm2: float = Field(0.26, ge=0)


class ExtractConfig(StrictModel):
    """What `wsimamba extract` does with a folder of slides."""

    target_mpp: float = Field(0.5, gt=0, description="resolution patches are cut at (µm/px)")
    patch_size: int = Field(256, ge=8, description="patch side at target_mpp (pixels)")
    overlap: int = Field(0, ge=0, description="overlap between neighbouring patches (pixels at target_mpp)")
    min_tissue: float = Field(0.25, ge=0, le=1, description="fraction of a patch that must be tissue")
    mpp_override: float | None = Field(None, gt=0)
    tissue_masks: Path | None = None
    tissue: TissueConfig = TissueConfig()
    encoder: str = "resnet50-trunc"
    weights: Path | None = None
    random_init: bool = False
    seed: int = 0
    device: str = "auto"
    batch_size: int = Field(64, ge=1)
    workers: int = Field(2, ge=0)
    format: Literal["h5", "zarr"] = "h5"
    overwrite: bool = False
    qc: bool = True
    reader: Literal["auto", "openslide", "tiles"] = Field(
        "auto", description="auto: native JPEG tiles when the grid allows, else OpenSlide; tiles / openslide force one"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.overlap >= self.patch_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than patch_size ({self.patch_size})")
        if self.weights is None and not self.random_init:
            raise ValueError("the encoder needs weights: give weights (a local state-dict file) or random_init: true")
        if self.weights is not None and self.random_init:
            raise ValueError("give either weights or random_init, not both")
        return self


M = TypeVar("M", bound=BaseModel)


def _format_validation_error(err: ValidationError, where: str = "") -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        elif e["loc"]:
            inp = e.get("input")
            shown = f" (got {inp!r})" if not isinstance(inp, (dict, list)) else ""
            parts.append(f"{key}: {e['msg']}{shown}")
        else:
            parts.append(e["msg"].removeprefix("Value error, "))
    prefix = f"{where}: " if where else ""
    return prefix + "; ".join(parts)


def build_config(model: type[M], data: dict[str, Any], where: str = "") -> M:
    """Validate a dict into `model`; a bad key or value raises ConfigError naming it."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML scalars) to a nested dict."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            nxt = dict(nxt) if isinstance(nxt, dict) else {}
            node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# wsimamba train


class TrainDataConfig(StrictModel):
    """Where the bags and labels are."""

    features: Path = Field(description="features folder (wsimamba h5 / zarr, CLAM, TRIDENT layouts)")
    labels: Path = Field(description="labels.csv: slide_id,case_id,label[,split]")
    format: Literal["auto", "h5", "zarr", "clam", "pt", "trident"] = "auto"
    preload: bool = Field(False, description="read every bag once and keep it in RAM")
    skip_missing: bool = Field(False, description="drop labelled slides without a feature file instead of failing")
    classes: list[str] | None = Field(None, description="class order; in binary tasks the second is positive")
    workers: int = Field(0, ge=0, description="DataLoader workers reading bags")
    max_instances: int | None = Field(None, ge=1, description="train on a random subset of at most this many patches per bag and step")
    normalize: bool = Field(True, description="standardise each feature dimension with the training fold's mean and std")
    gpu_cache: Literal["auto"] | bool = Field(
        "auto", description="keep each bag's features in GPU memory after its first read (CUDA only; the loaders "
        "then read without workers): "
        "true caches every bag of the fold or fails if they do not fit; auto caches when they fit in half of the "
        "free GPU memory; false never")

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_text(cls, v):
        # labels.csv is text, so `classes: [0, 1]` in YAML means the labels "0" and "1"
        return [str(c) for c in v] if isinstance(v, (list, tuple)) else v


class TrainModelConfig(StrictModel):
    """The aggregator; keys left out take the model's defaults. A key the model does not take is an error."""

    name: str = "lbmambamil"
    d_model: int | None = Field(None, ge=1)
    layers: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    d_state: int | None = Field(None, ge=1)
    d_conv: int | None = Field(None, ge=1)
    expand: int | None = Field(None, ge=1)
    rate: int | None = Field(None, ge=1)
    window: int | None = Field(None, ge=1)
    attn_dim: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    landmarks: int | None = Field(None, ge=1)
    pinv_iters: int | None = Field(None, ge=0)
    backend: str | None = None
    impl: Literal["auto", "fast", "reference"] | None = Field(
        None, description="Mamba models' layers: auto (fast on a GPU), fast or reference (same parameters and function)")

    def kwargs(self) -> dict[str, Any]:
        """The model's constructor keywords: every key that was set, except name."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}

    def check(self) -> None:
        """ValueError naming the key when the name is unknown or a set key does not apply to the model."""
        from wsimamba.models.mil import list_models, model_kwargs

        if self.name not in list_models():
            raise ValueError(f"model.name: unknown MIL model {self.name!r}; choose one of {', '.join(list_models())}")
        accepted = model_kwargs(self.name)
        for key in self.kwargs():
            if key not in accepted:
                raise ValueError(f"model.{key} does not apply to {self.name!r} (it takes: {', '.join(accepted)})")


class EarlyStoppingConfig(StrictModel):
    """Stop a fold when the validation metric has not improved for `patience` epochs."""

    enabled: bool = True
    monitor: Literal["val_auc", "val_loss"] = "val_auc"
    patience: int = Field(10, ge=1)
    min_delta: float = Field(0.0, ge=0)


class TrainLoopConfig(StrictModel):
    """Splits, optimisation and the Trainer's devices."""

    folds: int = Field(5, ge=2, description="k of the case-grouped stratified k-fold")
    split: Literal["kfold", "column"] = Field("kfold", description="kfold, or the split column of labels.csv")
    val_fraction: float = Field(0.2, ge=0, le=0.5, description="share of each training fold held out for validation "
                                "(with split: column, only when no row is marked val)")
    splits_from: Path | None = Field(None, description="reuse the splits.csv of another run (a file or run folder)")
    max_epochs: int = Field(50, ge=1)
    min_epochs: int = Field(0, ge=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    scheduler: Literal["cosine", "none"] = "cosine"
    grad_clip: float | None = Field(None, gt=0)
    batch_size: int = Field(1, ge=1, description="bags per training step, packed into one sequence for models "
                            "that take packed bags (the loss is the mean over them); validation and test bags run "
                            "in batches of this size too")
    accumulate: int = Field(1, ge=1, description="training steps (of batch_size bags) per optimiser step")
    cuda_graphs: Literal["auto"] | bool = Field(
        "auto", description="replay training steps from CUDA graphs of bucketed bag lengths: auto (on one GPU, "
        "for models that take padded bags, batch_size 1, accumulate 1, not deterministic), true (an error where "
        "that is not so) or false")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: each bag's loss weighted by n / (classes · n_class) of its class")
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    seed: int = 0
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "auto", description="auto: bf16-mixed on a GPU with bf16, else 32-true"
    )
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = Field("auto", description="auto, ddp, ddp_find_unused_parameters_true, ...")
    deterministic: bool = False

    def check(self) -> None:
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"train.min_epochs ({self.min_epochs}) is more than train.max_epochs ({self.max_epochs})")
        if self.early_stopping.enabled and self.val_fraction == 0 and self.split == "kfold":
            # (with split: column the labels may mark val rows; an empty val part is caught at the split)
            raise ValueError("train.early_stopping needs a validation part: set train.val_fraction > 0 "
                             "or train.early_stopping.enabled=false")


class TrainConfig(StrictModel):
    """What `wsimamba train` does: a run folder `<out>/<name>` with one subfolder per fold."""

    task: Literal["mil"] = Field("mil", description="mil (this config) or classify (ClassifyConfig)")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name (folder under out)")
    data: TrainDataConfig
    model: TrainModelConfig = TrainModelConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    out: Path = Field(Path("runs"), description="parent folder of run folders")

    @model_validator(mode="after")
    def _check(self):
        # checked here rather than in each section, so the message is not prefixed twice
        self.model.check()
        self.train.check()
        return self

    @property
    def run_dir(self) -> Path:
        return self.out / self.name

    def resolved(self) -> "TrainConfig":
        """A copy with every path absolute (relative ones are taken from the current folder)."""
        data = self.model_dump()
        for sect, key in (("data", "features"), ("data", "labels"), ("train", "splits_from")):
            if data[sect][key] is not None:
                data[sect][key] = Path(data[sect][key]).expanduser().resolve()
        data["out"] = Path(data["out"]).expanduser().resolve()
        return TrainConfig.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_train_config(path: str | Path | None,
                      overrides: list[str] = ()) -> "TrainConfig | ClassifyConfig | SegmentConfig":
    """Read a train config (YAML) and apply `key=value` overrides; errors name the file and key.

    The top-level `task` picks the schema: `mil` (default, TrainConfig), `classify` (ClassifyConfig) or
    `segment` (SegmentConfig).
    """
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    where = str(path) if path is not None else "config"
    task = data.get("task", "mil")
    if task == "classify":
        return build_config(ClassifyConfig, data, where=where)
    if task == "segment":
        return build_config(SegmentConfig, data, where=where)
    if task != "mil":
        raise ConfigError(f"{where}: task: must be 'mil', 'classify' or 'segment' (got {task!r})")
    return build_config(TrainConfig, data, where=where)


# ---------------------------------------------------------------------------------------------
# wsimamba train, task: classify (images → class; see wsimamba/train/classify.py for the run folder)


class AugmentConfig(StrictModel):
    """Training augmentations (torchvision.transforms.v2); evaluation only resizes and center-crops."""

    policy: Literal["trivialaugment", "randaugment", "colorjitter", "none"] = Field(
        "trivialaugment", description="per-image policy after the random resized crop and flip")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    hflip: bool = True
    color_jitter: float = Field(0.4, ge=0, description="brightness/contrast/saturation strength (policy: colorjitter)")
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of RandomErasing per image")
    mixup: float = Field(0.0, ge=0, description="MixUp alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0: off); with mixup, one of the two per batch")

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v):
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"must be two numbers 0 < low <= high <= 1 (got {list(v)})")
        return v


class ClassifyDataConfig(StrictModel):
    """The images: an ImageFolder tree or CNFOOD-241's layout (image root + list files)."""

    root: Path = Field(description="imagefolder: the tree (with train/ [val/] [test/] or class folders directly); "
                       "cnfood241: the image root the list files are relative to (e.g. train600x600)")
    format: Literal["imagefolder", "cnfood241"] = "imagefolder"
    train_list: Path | None = Field(None, description="cnfood241: `relative/path.jpg label` per line")
    val_list: Path | None = None
    test_list: Path | None = None
    classes: list[str] | None = Field(None, description="class names in index order (cnfood241: names for labels 0..K-1)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of training images (per class) held out "
                                "for validation when the data has no validation split")
    image_size: int = Field(224, ge=8)
    eval_crop: float = Field(0.875, gt=0, le=1, description="evaluation: resize to image_size/eval_crop, center-crop image_size")
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    augment: AugmentConfig = AugmentConfig()
    workers: int = Field(4, ge=0, description="DataLoader workers decoding images")

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_text(cls, v):
        return [str(c) for c in v] if isinstance(v, (list, tuple)) else v

    @model_validator(mode="after")
    def _lists(self):
        lists = ("train_list", "val_list", "test_list")
        if self.format == "cnfood241" and self.train_list is None:
            raise ValueError("data.train_list is required with format: cnfood241")
        if self.format == "imagefolder":
            for key in lists:
                if getattr(self, key) is not None:
                    raise ValueError(f"data.{key} applies to format: cnfood241 only (imagefolder finds its splits "
                                     "as train/ val/ test/ folders)")
        return self


class ClassifyModelConfig(BaseModel):
    """A backbone of wsimamba.models.vision (or `timm:<arch>`); every other key is a constructor keyword."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(description="registered backbone (list_backbones()) or timm:<arch>")
    weights: Path | None = Field(None, description="local state-dict file to start from (a head of another shape is left out)")

    def kwargs(self) -> dict[str, Any]:
        """The backbone's constructor keywords: the extra keys (num_classes is set by the run)."""
        return dict(self.model_extra or {})

    def check(self) -> None:
        """ValueError naming the key when the name is unknown or a key does not apply to the backbone."""
        if "num_classes" in self.kwargs():
            raise ValueError("model.num_classes is set from the data's classes; leave it out")
        if self.name.startswith("timm:"):
            if not self.name[len("timm:"):]:
                raise ValueError("model.name: 'timm:' needs an architecture, e.g. timm:resnet18")
            return  # timm checks its own keywords when the model is built
        from wsimamba.models.vision import backbone_kwargs, list_backbones

        known = list_backbones()
        if self.name not in known:
            raise ValueError(f"model.name: unknown backbone {self.name!r}; choose one of "
                             f"{', '.join(sorted(known)) or '(none registered)'} or timm:<arch>")
        accepted = backbone_kwargs(self.name)
        if "kwargs" in accepted:  # a constructor with **kwargs takes anything
            return
        for key in self.kwargs():
            if key not in accepted:
                raise ValueError(f"model.{key} does not apply to {self.name!r} (it takes: {', '.join(accepted)})")


class ClassifyEarlyStoppingConfig(StrictModel):
    """Stop when the validation metric has not improved for `patience` epochs."""

    enabled: bool = True
    monitor: Literal["val_top1", "val_loss"] = "val_top1"
    patience: int = Field(10, ge=1)
    min_delta: float = Field(0.0, ge=0)


class _EpochTrainConfig(StrictModel):
    """What the image tasks (classify, segment) share: epochs with linear warmup then cosine (per step)
    from `lr` to `min_lr`, AdamW, and the Trainer's devices. Subclasses set the defaults of
    batch_size, lr and weight_decay, and add their own keys."""

    epochs: int = Field(100, ge=1)
    min_epochs: int = Field(0, ge=0)
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine")
    warmup_epochs: float = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    accumulate: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "auto", description="auto: bf16-mixed on a GPU with bf16, else 32-true"
    )
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    deterministic: bool = False

    def check(self) -> None:
        if self.min_epochs > self.epochs:
            raise ValueError(f"train.min_epochs ({self.min_epochs}) is more than train.epochs ({self.epochs})")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"train.warmup_epochs ({self.warmup_epochs}) must be less than train.epochs ({self.epochs})")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) is more than train.lr ({self.lr})")


class ClassifyTrainConfig(_EpochTrainConfig):
    """Optimisation (AdamW, linear warmup then cosine, per step) and the Trainer's devices."""

    batch_size: int = Field(64, ge=1, description="images per device and step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay (not on norms, biases, A_log, D)")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    early_stopping: ClassifyEarlyStoppingConfig = ClassifyEarlyStoppingConfig()


class ClassifyConfig(StrictModel):
    """`wsimamba train` with `task: classify`: one image classifier trained into `<out>/<name>`."""

    task: Literal["classify"]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name (folder under out)")
    data: ClassifyDataConfig
    model: ClassifyModelConfig
    train: ClassifyTrainConfig = ClassifyTrainConfig()
    out: Path = Field(Path("runs"), description="parent folder of run folders")

    @model_validator(mode="after")
    def _check(self):
        self.model.check()
        self.train.check()
        return self

    @property
    def run_dir(self) -> Path:
        return self.out / self.name

    def resolved(self) -> "ClassifyConfig":
        """A copy with every path absolute (relative ones are taken from the current folder)."""
        data = self.model_dump()
        for key in ("root", "train_list", "val_list", "test_list"):
            if data["data"][key] is not None:
                data["data"][key] = Path(data["data"][key]).expanduser().resolve()
        if data["model"].get("weights") is not None:
            data["model"]["weights"] = Path(data["model"]["weights"]).expanduser().resolve()
        data["out"] = Path(data["out"]).expanduser().resolve()
        return ClassifyConfig.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)



# ---------------------------------------------------------------------------------------------
# wsimamba train, task: segment (image/mask pairs → per-pixel classes; see wsimamba/train/segment.py)


class SegAugmentConfig(StrictModel):
    """Training augmentations, applied to image and mask together (2D: torchvision.transforms.v2 with
    tv_tensors.Mask; 3D: the same operations on the volume's axes). Evaluation uses whole images."""

    crop: int | list[int] | None = Field(None, description="random crop side (an int, or one per spatial axis); "
                                         "none: whole images (all images of a batch must then share a size)")
    flip: bool = Field(True, description="random flips along every spatial axis")
    rot90: bool = Field(True, description="random multiples of 90° in the (H, W) plane (square crops or images)")
    color_jitter: float = Field(0.0, ge=0, description="2D RGB only: brightness/contrast/saturation strength "
                                "(stain variation); hue is jittered by a fifth of it")

    @field_validator("crop")
    @classmethod
    def _crop(cls, v):
        sides = [v] if isinstance(v, int) else (v or [])
        if any(s < 1 for s in sides):
            raise ValueError(f"crop sides must be >= 1 (got {v!r})")
        return v


class SegDataConfig(StrictModel):
    """Image/mask pairs (layouts in wsimamba/data/segmentation.py)."""

    root: Path = Field(description="a folder with images/ and masks/ (and optionally index.csv with a split "
                       "column, as `wsimamba tiles` writes), or with train/ [val/] [test/] each holding both")
    images: str = Field("images", description="name of the image folder(s)")
    masks: str = Field("masks", description="name of the mask folder(s); a mask has its image's file stem")
    index: Path | None = Field(None, description="CSV with image,split[,mask][,group] columns (default: root/index.csv "
                               "when it exists); paths relative to root")
    spatial_dims: Literal[2, 3] = Field(2, description="2: PNG/TIFF/JPEG images; 3: .npy or NIfTI volumes")
    num_classes: int = Field(2, ge=2, description="mask values are 0..num_classes-1 (binary masks stored as 0/255 "
                             "are read as 0/1)")
    classes: list[str] | None = Field(None, description="class names, background first (default: background, "
                                      "tumor for 2 classes; else class_<i>)")
    in_channels: int | None = Field(None, ge=1, description="image channels (default: read from the first image)")
    normalize: Literal["auto", "imagenet", "zscore", "none"] = Field(
        "auto", description="auto: ImageNet mean/std for 8-bit RGB, per-image z-score otherwise")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="share of groups (slides) held out for validation "
                                "when the data has no val split")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="share of groups held out for testing when the "
                                 "data has no test split")
    augment: SegAugmentConfig = SegAugmentConfig()
    workers: int = Field(2, ge=0, description="DataLoader workers reading images")

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_text(cls, v):
        return [str(c) for c in v] if isinstance(v, (list, tuple)) else v

    @model_validator(mode="after")
    def _check(self):
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"data.classes names {len(self.classes)} classes but data.num_classes is {self.num_classes}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction must be < 1 (got {self.val_fraction} + "
                             f"{self.test_fraction})")
        crop = self.augment.crop
        if isinstance(crop, list) and len(crop) != self.spatial_dims:
            raise ValueError(f"data.augment.crop has {len(crop)} sides for spatial_dims {self.spatial_dims}")
        return self

    def class_names(self) -> list[str]:
        if self.classes is not None:
            return list(self.classes)
        return ["background", "tumor"] if self.num_classes == 2 else [f"class_{i}" for i in range(self.num_classes)]


class SegModelConfig(BaseModel):
    """A network of wsimamba.models.seg; every other key is a constructor keyword."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(description="registered segmenter (wsimamba.models.seg.list_segmenters())")

    def kwargs(self) -> dict[str, Any]:
        """The network's constructor keywords (in_channels, num_classes, spatial_dims come from data)."""
        return dict(self.model_extra or {})

    def check(self) -> None:
        """ValueError naming the key when the name is unknown or a key does not apply to the network."""
        for key in ("in_channels", "num_classes", "spatial_dims"):
            if key in self.kwargs():
                raise ValueError(f"model.{key} is set from the data config (data.{key}); leave it out")
        from wsimamba.models.seg import list_segmenters, segmenter_kwargs

        known = list_segmenters()
        if self.name not in known:
            raise ValueError(f"model.name: unknown segmentation model {self.name!r}; choose one of "
                             f"{', '.join(sorted(known)) or '(none registered)'}")
        accepted = segmenter_kwargs(self.name)
        if "kwargs" in accepted:
            return
        for key in self.kwargs():
            if key not in accepted:
                raise ValueError(f"model.{key} does not apply to {self.name!r} (it takes: {', '.join(accepted)})")


class SegEarlyStoppingConfig(StrictModel):
    """Stop when the validation metric has not improved for `patience` epochs."""

    enabled: bool = True
    monitor: Literal["val_dice", "val_loss"] = "val_dice"
    patience: int = Field(20, ge=1)
    min_delta: float = Field(0.0, ge=0)


class SegTrainConfig(_EpochTrainConfig):
    """Loss (Dice + cross-entropy), optimisation (AdamW, warmup then cosine, per step) and devices."""

    batch_size: int = Field(8, ge=1, description="images per device and step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay (not on norms, biases, A_log, D)")
    dice_weight: float = Field(1.0, ge=0, description="weight of the soft Dice loss (mean over classes)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss")
    dice_include_background: bool = Field(False, description="count the background class in the Dice loss and val_dice")
    early_stopping: SegEarlyStoppingConfig = SegEarlyStoppingConfig()

    def check(self) -> None:
        super().check()
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("train.dice_weight and train.ce_weight are both 0: nothing to train on")


class SegEvalConfig(StrictModel):
    """What the run writes about the evaluated part (test if the data has one, else val)."""

    overlays: int = Field(8, ge=0, description="overlay PNGs (image, ground-truth contour, prediction) to write")
    hd95: bool = Field(True, description="compute HD95 per class (distance transforms; slower on big volumes)")
    spacing: list[float] | None = Field(None, description="pixel/voxel size per spatial axis for HD95 (default 1)")


class SegmentConfig(StrictModel):
    """`wsimamba train` with `task: segment`: one segmentation network trained into `<out>/<name>`."""

    task: Literal["segment"]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name (folder under out)")
    data: SegDataConfig
    model: SegModelConfig
    train: SegTrainConfig = SegTrainConfig()
    eval: SegEvalConfig = SegEvalConfig()
    out: Path = Field(Path("runs"), description="parent folder of run folders")

    @model_validator(mode="after")
    def _check(self):
        self.model.check()
        self.train.check()
        if self.eval.spacing is not None and len(self.eval.spacing) != self.data.spatial_dims:
            raise ValueError(f"eval.spacing has {len(self.eval.spacing)} values for spatial_dims {self.data.spatial_dims}")
        return self

    @property
    def run_dir(self) -> Path:
        return self.out / self.name

    def resolved(self) -> "SegmentConfig":
        """A copy with every path absolute (relative ones are taken from the current folder)."""
        data = self.model_dump()
        data["data"]["root"] = Path(data["data"]["root"]).expanduser().resolve()
        if data["data"]["index"] is not None:
            data["data"]["index"] = Path(data["data"]["index"]).expanduser().resolve()
        data["out"] = Path(data["out"]).expanduser().resolve()
        return SegmentConfig.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

# ---------------------------------------------------------------------------------------------
# wsimamba quantize


class QuantConfig(StrictModel):
    """Keys of configs/quant.yaml (`wsimamba quantize --cfg`); command-line flags override them."""

    method: Literal["naive", "hadamard", "mambaquant", "all"] = "all"
    calib_slides: int = Field(8, ge=1, description="training slides per fold to calibrate on")
    w_bits: Literal[4, 8] = 8
    a_bits: Literal[8] = 8
    granularity: Literal["tensor", "token"] = "tensor"
    percentile: float = Field(99.99, gt=50, le=100)
    alpha: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    device: str = "auto"


def load_quant_config(path: str | Path | None = None, overrides: dict | None = None) -> QuantConfig:
    """configs/quant.yaml (or the defaults) with `overrides` (None values ignored); errors name the key."""
    data = load_yaml(path) if path is not None else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(QuantConfig, data, where=str(path) if path is not None else "quantize options")
