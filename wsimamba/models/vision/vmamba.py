"""VMamba and Res-VMamba: hierarchical Mamba backbones built from SS2D blocks.

- ``vmamba_tiny``      VMamba-T as released with the VMamba paper's final version (config ``vmambav2v``):
                       stem of two stride-2 3×3 convs, four stages of widths 96/192/384/768 and depths
                       2/2/8/2, each block LayerNorm → SS2D (d_state 1, ssm_ratio 1, depthwise 3×3 conv,
                       out norm, no z gate: ``v05_noz``) → residual, LayerNorm → MLP (ratio 4) → residual;
                       stride-2 3×3 conv + LayerNorm between stages. 30.2M parameters (the paper: 30M).
- ``resvmamba_small``  Res-VMamba (Chen et al., 2024) on VMamba-S: see :func:`resvmamba_small`.

Feature maps are channels-last inside the stages, (batch, H, W, C); :meth:`VMamba.forward_pyramid`
returns them channels-first, (batch, C_i, H / (patch·2^i), W / (patch·2^i)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.vision.base import VisionBackbone, int_list, linear_rates, positive_int, probability
from wsimamba.models.vision.registry import register_backbone
from wsimamba.nn.ss2d import SS2D

__all__ = ["ResVMamba", "VMamba", "VSSBlock", "resvmamba_small", "vmamba_tiny"]


class _ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map: (batch, C, H, W) → (batch, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """fc1 → GELU → fc2. Shapes: (..., dim) → (..., dim)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class VSSBlock(nn.Module):
    """VMamba's visual state-space block: x + SS2D(LN(x)), then x + MLP(LN(x)) when ``mlp_ratio`` > 0.

    Shapes: x (batch, H, W, dim) → (batch, H, W, dim).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ss2d):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ss2d)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class _Stage(nn.Module):
    """Blocks at one width, then (except in the last stage) a stride-2 3×3 conv to the next width.

    Shapes: x (batch, H, W, dim) → blocks' output (batch, H, W, dim); ``downsample`` maps it to
    (batch, H/2, W/2, out_dim).
    """

    def __init__(self, dim: int, out_dim: int | None, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        if out_dim is None:
            self.downsample = None
        else:
            self.downsample = nn.Sequential(nn.Conv2d(dim, out_dim, 3, stride=2, padding=1),
                                            _ChannelsLastNorm(out_dim))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, H, W, dim) → (batch, H/2, W/2, out_dim)."""
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VMamba(VisionBackbone):
    """A VMamba backbone (hierarchical, SS2D blocks).

    Args:
        num_classes: classes of the linear head; 0 = no head.
        dims: stage widths, or one int d for (d, 2d, 4d, 8d, …) over ``len(depths)`` stages.
        depths: blocks per stage.
        d_state, ssm_ratio, dt_rank, d_conv, conv_bias, gate: SS2D settings (:class:`wsimamba.nn.ss2d.SS2D`).
        mlp_ratio: MLP width / dim inside every block; 0 = no MLP (VMamba v0).
        patch_size: stride of the stem, a power of two: log2(patch_size) stride-2 3×3 convs
            (4 = VMamba's two-conv stem), 1 = one stride-1 conv.
        in_chans: input channels.
        img_size: the nominal input side (any multiple of ``reduction`` works; no position embedding).
        drop_rate: dropout before the head. drop_path_rate: stochastic depth, linear over all blocks.
        backend: selective-scan backend ("auto", "reference", "triton", "mamba_ssm").

    ``reduction`` = patch_size · 2^(stages − 1); ``num_features`` = dims[-1].
    """

    def __init__(self, *, num_classes: int = 1000, dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), d_state: int = 1,
                 ssm_ratio: float = 1.0, dt_rank: int | str = "auto", d_conv: int = 3, conv_bias: bool = False,
                 gate: bool = False, mlp_ratio: float = 4.0, patch_size: int = 4, in_chans: int = 3,
                 img_size: int = 224, drop_rate: float = 0.0, drop_path_rate: float = 0.0, backend: str = "auto"):
        super().__init__()
        depths = int_list("depths", depths)
        if isinstance(dims, int) and not isinstance(dims, bool):
            dims = [positive_int("dims", dims) * 2**i for i in range(len(depths))]
        dims = int_list("dims", dims, length=len(depths))
        positive_int("d_state", d_state)
        positive_int("img_size", img_size)
        self.in_chans = positive_int("in_chans", in_chans)
        patch_size = positive_int("patch_size", patch_size)
        if patch_size & (patch_size - 1):
            raise ConfigError(f"model.patch_size: VMamba's stem needs a power of two, got {patch_size}")
        n_convs = int(math.log2(patch_size))
        if n_convs > 1 and dims[0] % 2 ** (n_convs - 1):
            raise ConfigError(f"model.dims: dims[0] = {dims[0]} must be divisible by {2 ** (n_convs - 1)} "
                              f"for patch_size {patch_size}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio < 0:
            raise ConfigError(f"model.mlp_ratio: expected a number ≥ 0, got {mlp_ratio!r}")
        self.dims, self.depths = dims, depths
        self.num_features = dims[-1]
        self.reduction = patch_size * 2 ** (len(depths) - 1)

        # stem: each stride-2 conv doubles the width up to dims[0], with LayerNorm (+ GELU between convs)
        stem: list[nn.Module] = []
        widths = [dims[0] // 2 ** (n_convs - 1 - j) for j in range(n_convs)] or [dims[0]]
        c_in = in_chans
        for j, c_out in enumerate(widths):
            stem += [nn.Conv2d(c_in, c_out, 3, stride=2 if n_convs else 1, padding=1), _ChannelsLastNorm(c_out)]
            if j < len(widths) - 1:
                stem.append(nn.GELU())
            c_in = c_out
        self.patch_embed = nn.Sequential(*stem)

        rates = linear_rates(probability("drop_path_rate", drop_path_rate), sum(depths))
        ss2d = dict(d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias,
                    gate=gate, backend=backend)
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            first = sum(depths[:i])
            blocks = [VSSBlock(dim, rates[first + j], mlp_ratio, **ss2d) for j in range(depth)]
            self.layers.append(_Stage(dim, dims[i + 1] if i + 1 < len(dims) else None, blocks))
        self.norm = nn.LayerNorm(self.num_features)
        self._build_head(num_classes, drop_rate)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        # VMamba's init; SS2D's per-direction x_proj / dt_proj are raw parameters and keep their own
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _skip(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """A term added to stage i's downsampled output (none in VMamba; Res-VMamba's skip)."""
        return None

    def _stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images → ([each stage's blocks output, (batch, H_i, W_i, C_i)], last stage output)."""
        self._check_input(x)
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        maps = []
        for i, stage in enumerate(self.layers):
            y = stage.blocks(x)
            maps.append(y)
            if stage.downsample is not None:
                y = stage.down(y)
                skip = self._skip(i, x)
                x = y if skip is None else y + skip
            else:
                x = y
        return maps, x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_chans, H, W) → (batch, dims[-1]): final LayerNorm, then the mean over positions."""
        _, x = self._stages(x)
        return self.norm(x).mean(dim=(1, 2))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (batch, in_chans, H, W) → [(batch, dims[i], H / (patch·2^i), W / (patch·2^i)) for each stage]."""
        maps, _ = self._stages(x)
        return [m.permute(0, 3, 1, 2) for m in maps]


class ResVMamba(VMamba):
    """Res-VMamba: VMamba whose every downsampling stage gets a residual skip from the stage input.

    For stage i with a downsampling (all but the last): x_{i+1} = down(blocks(x_i)) + conv1×1(maxpool2×2(x_i)),
    the 1×1 conv (with bias) mapping dims[i] → dims[i+1]. The last stage keeps no skip, as upstream.

    Departure from the upstream code (ChiShengChen/ResVMamba, ``models/resvmamba.py``): there the 1×1
    convs are created anew, with fresh random weights, inside every forward call, so they are never
    trained, never saved, and make the output random from call to call. Here they are registered
    layers (``skips.{i}``), trained and saved like any other weight. Arguments as :class:`VMamba`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skips = nn.ModuleList(nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(len(self.dims) - 1))

    def _skip(self, i: int, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)
        return self.skips[i](pooled).permute(0, 2, 3, 1)


@register_backbone("vmamba_tiny", "VMamba-T: dims 96→768, depths 2/2/8/2, SS2D four-way scan + MLP (≈30.2M)")
def vmamba_tiny(num_classes: int = 1000, dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), d_state: int = 1,
                ssm_ratio: float = 1.0, dt_rank: int | str = "auto", d_conv: int = 3, conv_bias: bool = False,
                gate: bool = False, mlp_ratio: float = 4.0, patch_size: int = 4, in_chans: int = 3,
                img_size: int = 224, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                backend: str = "auto") -> VMamba:
    """VMamba-T, 30.25M parameters with the 1000-class head (29.48M without).

    The released VMamba-T (``vmambav2v_tiny``) has no z gate in SS2D; ``gate=True`` restores the
    gated form of VMamba v0/v1 at 32.7M parameters. See :class:`VMamba` for the arguments.
    """
    return VMamba(num_classes=num_classes, dims=dims, depths=depths, d_state=d_state, ssm_ratio=ssm_ratio,
                  dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias, gate=gate, mlp_ratio=mlp_ratio,
                  patch_size=patch_size, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate, backend=backend)


@register_backbone("resvmamba_small", "Res-VMamba on VMamba-S: depths 2/2/20/2 + trained per-stage skips (≈49.4M)")
def resvmamba_small(num_classes: int = 1000, dims=(96, 192, 384, 768), depths=(2, 2, 20, 2), d_state: int = 1,
                    ssm_ratio: float = 1.0, dt_rank: int | str = "auto", d_conv: int = 3, conv_bias: bool = False,
                    gate: bool = False, mlp_ratio: float = 4.0, patch_size: int = 4, in_chans: int = 3,
                    img_size: int = 224, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                    backend: str = "auto") -> ResVMamba:
    """Res-VMamba with VMamba-S stages: 49.40M parameters with the 1000-class head (48.63M without).

    VMamba-S here is the VMamba paper's final VMamba-S (50M in its table): the VMamba-T settings
    with 20 blocks in the third stage (config ``vmambav2v_small``). The skips add 0.39M. The
    Res-VMamba paper (Feb 2024) built on the VMamba-S of that time (v0: depths 2/2/27/2, d_state 16,
    ssm_ratio 2, gated SS2D, no MLP, patch-merging downsampling, 44M); its depths and SS2D settings
    are reachable through the arguments (``depths=(2, 2, 27, 2), d_state=16, ssm_ratio=2.0,
    gate=True, mlp_ratio=0``), its patch-merging downsampling is not.

    The per-stage skip convs are registered, trained layers; the upstream code builds them fresh
    and untrained on every forward (see :class:`ResVMamba`).
    """
    return ResVMamba(num_classes=num_classes, dims=dims, depths=depths, d_state=d_state, ssm_ratio=ssm_ratio,
                     dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias, gate=gate, mlp_ratio=mlp_ratio,
                     patch_size=patch_size, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                     drop_path_rate=drop_path_rate, backend=backend)
