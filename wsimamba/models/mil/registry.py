"""The MIL aggregator registry: a name maps to a constructor (timm style).

Every constructor takes ``(in_dim, n_classes, **kwargs)`` and returns an :class:`~wsimamba.models.mil.base.MILModel`.
"""

from __future__ import annotations

import inspect
from typing import Callable

from wsimamba.errors import ConfigError

_REGISTRY: dict[str, Callable] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str):
    """Decorator: register a constructor ``fn(in_dim, n_classes, **kwargs)`` under `name`."""

    def deco(fn):
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return deco


def list_models() -> dict[str, str]:
    """Registered aggregator names with a one-line description."""
    return dict(_DESCRIPTIONS)


def model_kwargs(name: str) -> list[str]:
    """The keyword arguments (besides in_dim and n_classes) the model `name` accepts."""
    fn = _lookup(name)
    params = inspect.signature(fn).parameters
    return [p for p in params if p not in ("in_dim", "n_classes")]


def _lookup(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown MIL model {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, in_dim: int, n_classes: int, **kwargs):
    """Build the aggregator `name` for `in_dim`-wide patch features and `n_classes` classes.

    A keyword the model does not take is a ConfigError naming it and listing the ones it takes.
    """
    fn = _lookup(name)
    accepted = model_kwargs(name)
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"model.{key} does not apply to {name!r} (it takes: {', '.join(accepted)})")
    if int(in_dim) < 1:
        raise ConfigError(f"in_dim must be >= 1, got {in_dim!r}")
    if int(n_classes) < 2:
        raise ConfigError(f"n_classes must be >= 2, got {n_classes!r}")
    return fn(int(in_dim), int(n_classes), **kwargs)
