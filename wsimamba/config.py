"""Typed configurations (pydantic v2, unknown keys forbidden) and their YAML loading.

Every validation problem becomes a ConfigError whose one line names the key and the bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
