"""What every vision backbone shares: the input check, the classifier head, argument checks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from wsimamba.errors import ConfigError


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{name}: expected a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"model.{name}: expected an int ≥ 0, got {value!r}")
    return value


def probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"model.{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


def linear_rates(top: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``top`` over n blocks (plain floats: works on meta)."""
    return [top * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def int_list(name: str, value, length: int | None = None) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"model.{name}: expected a list of positive ints, got {value!r}")
    out = [positive_int(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if length is not None and len(out) != length:
        raise ConfigError(f"model.{name}: expected {length} values (one per stage), got {value!r}")
    return out


class VisionBackbone(nn.Module):
    """Base of the vision backbones (see :mod:`wsimamba.models.vision.registry` for the contract).

    Subclasses set ``num_features``, ``reduction`` and ``in_chans``, define ``forward_features`` and
    ``forward_pyramid``, and call :meth:`_build_head` once ``num_features`` is known.
    """

    num_features: int
    reduction: int
    in_chans: int

    def _build_head(self, num_classes: int, drop_rate: float) -> None:
        self.num_classes = non_negative_int("num_classes", num_classes)
        self.head_drop = nn.Dropout(probability("drop_rate", drop_rate))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Raises ConfigError unless x is (batch, in_chans, H, W) with H, W multiples of ``reduction``."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(f"input: expected images (batch, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.reduction or w % self.reduction or h == 0 or w == 0:
            raise ConfigError(f"input size {h}×{w}: height and width must be positive multiples of "
                              f"{type(self).__name__}'s reduction {self.reduction}")
        return h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_chans, H, W) → logits (batch, num_classes), or (batch, num_features) when num_classes=0."""
        return self.head(self.head_drop(self.forward_features(x)))
