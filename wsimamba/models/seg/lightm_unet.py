"""LightM-UNet (Liao et al., 2024): a UNet whose encoder is residual vision-Mamba layers, 2D or 3D.

Structure (``spatial_dims`` 2 or 3; ``Conv`` is Conv2d / Conv3d, ``Norm`` GroupNorm with 8 groups):

- stem: depthwise-separable conv, ``in_channels → channels[0]`` (depthwise 3×3(×3), pointwise 1×1).
- encoder stage i: for i > 0 a downsampling RVM layer ``channels[i-1] → channels[i]`` followed by
  2× max pooling, then ``blocks[i]`` residual Mamba blocks, each ``x + RVM(act(Norm(RVM(act(Norm(x))))))``.
- RVM layer (residual vision Mamba): flatten the map to a token sequence (B, D·H·W, C); with one
  LayerNorm ``LN``: y = LN(Mamba(LN(x)) + s·x), s a learnable scalar; Linear C → C_out; unflatten.
- decoder step i (from the bottom): 1×1 conv ``channels[i+1] → channels[i]``, 2× (bi/tri)linear
  interpolation, add the encoder map of stage i, ``up_blocks`` residual depthwise blocks
  ``act(Norm(DW(act(Norm(x))) + s·x))`` with DW a depthwise-separable 3×3(×3) conv.
- head: Norm → ReLU → depthwise-separable 1×1 conv (with bias) ``channels[0] → num_classes``.

Parameter count. The defaults follow the released code (MrBlankness/LightM-UNet: 32/64/128/256
channels, blocks [1, 2, 2, 4], one residual block per decoder step, Mamba d_state 16, d_conv 4,
expand 2, two RVM layers in every residual Mamba block), and match its size, not the paper's:
5,011,765 parameters in 2D and 5,015,851 in 3D for 3 → 2 classes (the released code: about 5M).
The paper reports about 1M, which the released layout cannot reach: the bottleneck alone (four
blocks of two RVM layers at 256 channels) holds about 3.5M. Halving the widths,
``channels=(16, 32, 64, 128)``, gives 1.34M; with ``blocks=(1, 1, 1, 1)`` as well, 0.45M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.seg.base import Segmenter, int_list, positive_int
from wsimamba.models.seg.registry import register_segmenter
from wsimamba.nn.mamba import Mamba

__all__ = ["LightMUNet", "RVMLayer", "lightm_unet"]


def _conv(nd: int):
    return nn.Conv2d if nd == 2 else nn.Conv3d


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # the released code's 8 groups; fewer when a tiny network has fewer channels than that
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _dw_separable(nd: int, c_in: int, c_out: int, kernel: int = 3, bias: bool = False) -> nn.Sequential:
    """Depthwise kernel^nd conv then pointwise 1×1 conv: (B, c_in, *S) → (B, c_out, *S)."""
    conv = _conv(nd)
    return nn.Sequential(conv(c_in, c_in, kernel, padding=kernel // 2, groups=c_in, bias=bias),
                         conv(c_in, c_out, 1, bias=bias))


class RVMLayer(nn.Module):
    """Residual vision-Mamba layer: tokens y = LN(Mamba(LN(x)) + s·x), then Linear to ``c_out``.

    One LayerNorm is applied twice, as in the released code. Shapes: x (batch, c_in, *spatial) →
    (batch, c_out, *spatial), any number of spatial axes (flattened row-major into the sequence).
    """

    def __init__(self, c_in: int, c_out: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str = "auto"):
        super().__init__()
        self.c_out = c_out
        self.norm = nn.LayerNorm(c_in)
        self.mamba = Mamba(c_in, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.proj = nn.Linear(c_in, c_out)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        tokens = x.reshape(b, c, -1).transpose(1, 2)
        y = self.norm(self.mamba(self.norm(tokens)) + self.skip_scale * tokens)
        return self.proj(y).transpose(1, 2).reshape(b, self.c_out, *spatial)


class _ResMambaBlock(nn.Module):
    """x + RVM(act(Norm(RVM(act(Norm(x)))))). Shapes: (B, C, *S) → (B, C, *S)."""

    def __init__(self, channels: int, groups: int, **mamba):
        super().__init__()
        self.norm1, self.norm2 = _norm(channels, groups), _norm(channels, groups)
        self.rvm1, self.rvm2 = RVMLayer(channels, channels, **mamba), RVMLayer(channels, channels, **mamba)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rvm1(F.relu(self.norm1(x)))
        return x + self.rvm2(F.relu(self.norm2(y)))


class _ResUpBlock(nn.Module):
    """act(Norm(DW(act(Norm(x))) + s·x)), DW a depthwise-separable 3×3(×3) conv. (B, C, *S) → (B, C, *S)."""

    def __init__(self, nd: int, channels: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(channels, groups), _norm(channels, groups)
        self.conv = _dw_separable(nd, channels, channels)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.relu(self.norm1(x))) + self.skip_scale * x
        return F.relu(self.norm2(y))


class LightMUNet(Segmenter):
    """LightM-UNet; see the module docstring for the structure and :func:`lightm_unet` for the arguments.

    Shapes: x (batch, in_channels, H, W) or (batch, in_channels, D, H, W) → logits
    (batch, num_classes, same spatial size); sizes multiples of 2^(stages − 1) unless ``pad``.
    """

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 2, channels=(32, 64, 128, 256),
                 blocks=(1, 2, 2, 4), up_blocks: int = 1, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 norm_groups: int = 8, pad: bool = False, backend: str = "auto"):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"lightm_unet: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        blocks = [int(b) for b in blocks]
        if any(b < 0 for b in blocks):
            raise ConfigError(f"model.blocks: expected ints ≥ 0, got {blocks!r}")
        channels = int_list("channels", channels, length=len(blocks))
        if len(channels) < 2:
            raise ConfigError(f"model.channels: expected at least two stages, got {channels!r}")
        up_blocks = int(up_blocks)
        positive_int("norm_groups", norm_groups)
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, spatial_dims
        self.pad = bool(pad)
        self._divisor = 2 ** (len(channels) - 1)
        nd, mamba = spatial_dims, dict(d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        pool = nn.MaxPool2d(2) if nd == 2 else nn.MaxPool3d(2)

        self.stem = _dw_separable(nd, in_channels, channels[0])
        self.down = nn.ModuleList()
        for i, (c, n) in enumerate(zip(channels, blocks)):
            pre = [] if i == 0 else [RVMLayer(channels[i - 1], c, **mamba), pool]
            self.down.append(nn.Sequential(*pre, *[_ResMambaBlock(c, norm_groups, **mamba) for _ in range(n)]))
        conv = _conv(nd)
        self.up_proj = nn.ModuleList(conv(channels[i + 1], channels[i], 1, bias=False)
                                     for i in reversed(range(len(channels) - 1)))
        self.up = nn.ModuleList(nn.Sequential(*[_ResUpBlock(nd, channels[i], norm_groups) for _ in range(up_blocks)])
                                for i in reversed(range(len(channels) - 1)))
        self.head = nn.Sequential(_norm(channels[0], norm_groups), nn.ReLU(),
                                  _dw_separable(nd, channels[0], num_classes, kernel=1, bias=True))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        for proj, up, skip in zip(self.up_proj, self.up, reversed(skips[:-1])):
            x = F.interpolate(proj(x), size=skip.shape[2:], mode=mode, align_corners=False)
            x = up(x + skip)
        return self.head(x)


@register_segmenter("lightm_unet",
                    "LightM-UNet, 2D or 3D: residual vision-Mamba encoder 32→256, blocks 1/2/2/4 (≈5.0M)")
def lightm_unet(in_channels: int, num_classes: int, spatial_dims: int = 2, channels=(32, 64, 128, 256),
                blocks=(1, 2, 2, 4), up_blocks: int = 1, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                norm_groups: int = 8, pad: bool = False, backend: str = "auto") -> LightMUNet:
    """LightM-UNet, 2D (``spatial_dims=2``) or 3D (``spatial_dims=3``: the D×H×W volume is one sequence).

    Args:
        channels: widths of the encoder stages (one per stage; the decoder mirrors them).
        blocks: residual Mamba blocks per encoder stage (each holds two RVM layers).
        up_blocks: residual depthwise blocks per decoder step.
        d_state, d_conv, expand: Mamba settings of every RVM layer.
        norm_groups: GroupNorm groups (fewer where a width is not divisible by it).
        pad: zero-pad inputs to a multiple of 2^(stages − 1) and crop the logits back (``reduction``
            1); else such an input is a ConfigError (``reduction`` 2^(stages − 1), 8 by default).
        backend: selective-scan backend.

    Defaults: the released code's network, 5.01M parameters (2D) (module docstring on the paper's 1M).
    """
    return LightMUNet(in_channels, num_classes, spatial_dims, channels=channels, blocks=blocks,
                      up_blocks=up_blocks, d_state=d_state, d_conv=d_conv, expand=expand,
                      norm_groups=norm_groups, pad=pad, backend=backend)
