"""The vision backbone registry: a name maps to a constructor (timm style).

Every constructor takes keyword arguments only (``num_classes`` among them, 0 = no head) and returns
an ``nn.Module`` with ``forward(x) -> logits`` (or the pooled vector when ``num_classes=0``),
``forward_features(x) -> (B, num_features)``, ``forward_pyramid(x) -> list of (B, C_i, H_i, W_i)``,
and the attributes ``num_features`` (int) and ``reduction`` (the input-size divisor it needs).
"""

from __future__ import annotations

import inspect
from typing import Callable

from wsimamba.errors import ConfigError

_REGISTRY: dict[str, Callable] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_backbone(name: str, description: str):
    """Decorator: register a constructor ``fn(**kwargs)`` under `name`."""

    def deco(fn):
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return deco


def list_backbones() -> dict[str, str]:
    """Registered backbone names with a one-line description."""
    return dict(_DESCRIPTIONS)


def backbone_kwargs(name: str) -> list[str]:
    """The keyword arguments the backbone `name` accepts."""
    return list(inspect.signature(_lookup(name)).parameters)


def _lookup(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_backbone(name: str, **kwargs):
    """Build the backbone `name`. A keyword it does not take is a ConfigError naming it."""
    fn = _lookup(name)
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                raise ConfigError(f"model.{key} does not apply to {name!r} (it takes: {', '.join(params)})")
    return fn(**kwargs)
