"""The segmentation-network registry: a name maps to a constructor (timm style).

Every constructor takes ``(in_channels, num_classes, spatial_dims=2, **kwargs)`` and returns an
``nn.Module`` mapping images (B, in_channels, *spatial) to logits (B, num_classes, *spatial) at the
input's size, with an attribute ``reduction`` (the divisor the spatial sizes must have, or 1 when
the network pads for itself) and ``spatial_dims`` (2 or 3).
"""

from __future__ import annotations

import inspect
from typing import Callable

from wsimamba.errors import ConfigError

_REGISTRY: dict[str, Callable] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_segmenter(name: str, description: str):
    """Decorator: register a constructor ``fn(in_channels, num_classes, spatial_dims=2, **kwargs)``."""

    def deco(fn):
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return deco


def list_segmenters() -> dict[str, str]:
    """Registered segmentation networks with a one-line description."""
    return dict(_DESCRIPTIONS)


def segmenter_kwargs(name: str) -> list[str]:
    """The keyword arguments (besides in_channels, num_classes, spatial_dims) `name` accepts."""
    params = inspect.signature(_lookup(name)).parameters
    return [p for p in params if p not in ("in_channels", "num_classes", "spatial_dims")]


def _lookup(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown segmentation model {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_segmenter(name: str, in_channels: int, num_classes: int, spatial_dims: int = 2, **kwargs):
    """Build the segmentation network `name`. A keyword it does not take is a ConfigError naming it."""
    fn = _lookup(name)
    accepted = segmenter_kwargs(name)
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"model.{key} does not apply to {name!r} (it takes: {', '.join(accepted)})")
    if int(in_channels) < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels!r}")
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes!r}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return fn(int(in_channels), int(num_classes), spatial_dims=int(spatial_dims), **kwargs)
