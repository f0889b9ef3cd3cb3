"""What every segmentation network shares: the input check, pad-or-refuse for sizes, argument checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.vision.base import int_list, positive_int, probability  # noqa: F401  (re-exported)


def check_2d(name: str, spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ConfigError(f"{name} is a 2D network: spatial_dims must be 2, got {spatial_dims!r}")


class Segmenter(nn.Module):
    """Base of the segmentation networks (contract: :mod:`wsimamba.models.seg.registry`).

    Subclasses set ``in_channels``, ``num_classes``, ``spatial_dims`` and ``_divisor`` (the factor
    the spatial sizes must have, the product of all downsamplings) and define :meth:`_forward`.
    With ``pad=False`` an input size that is not a multiple of the divisor is a ConfigError naming
    the size, and ``reduction`` is the divisor. With ``pad=True`` the input is zero-padded at the
    end of every spatial axis up to the next multiple and the logits are cropped back, so any size
    works and ``reduction`` is 1.
    """

    in_channels: int
    num_classes: int
    spatial_dims: int
    _divisor: int
    pad: bool

    @property
    def reduction(self) -> int:
        return 1 if self.pad else self._divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_channels, *spatial) → logits (batch, num_classes, *spatial)."""
        nd, m = self.spatial_dims, self._divisor
        if x.dim() != 2 + nd or x.shape[1] != self.in_channels:
            raise ConfigError(f"{type(self).__name__} input: expected (batch, {self.in_channels}, "
                              f"{', '.join('HW' if nd == 2 else 'DHW')}), got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if not self.pad:
            if any(s % m for s in size):
                raise ConfigError(f"input size {'×'.join(map(str, size))}: every side must be a multiple of "
                                  f"{type(self).__name__}'s reduction {m} (or build it with pad=True)")
            return self._forward(x)
        extra = [(-s) % m for s in size]
        if not any(extra):
            return self._forward(x)
        pads = [p for e in reversed(extra) for p in (0, e)]  # F.pad counts axes from the last
        y = self._forward(F.pad(x, pads))
        return y[(..., *[slice(0, s) for s in size])]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
