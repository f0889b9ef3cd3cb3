"""VM-UNet (Ruan & Xiang, 2024) with the multi-head scan of MHS-VM (Ji, 2024) in place of SS2D.

Structure (2D; widths C_i = ``dims[i]``, 96/192/384/768; all blocks channels last):

- patch embedding: 4×4 conv with stride 4, ``in_channels → C_0``, LayerNorm.
- encoder stage i: ``depths[i]`` MHS blocks at C_i (x + DropPath(MHS(LN(x))), no MLP: VM-UNet's
  VSS block), then, except in the last stage, patch merging (the 2×2 neighbours concatenated →
  LayerNorm → Linear 4·C_i → C_{i+1}). The stage inputs are kept as skips.
- decoder step k = 0…3 at width C_{3−k}: from the second step on, add the skip of the matching
  encoder stage and patch expanding (Linear C → 2·C, rearranged to 2× the size at C / 2, LayerNorm);
  then ``decoder_depths[k]`` MHS blocks.
- final expanding 4×: Linear C_0 → 16·C_0, rearranged to 4× the size at C_0, LayerNorm; 1×1 conv
  to the class map.
- MHS (:class:`wsimamba.nn.mhs.MultiHeadScan`): depthwise 3×3 → SiLU → projection into ``heads``
  subspaces, each scanning its route pair (snake rows/columns, diagonal zigzags, spirals, raster)
  forward and reversed, outputs put back in pixel order and fused by the scan-route attention
  gate, heads concatenated → LayerNorm → Linear → LayerNorm.

Defaults (VM-UNet's encoder [2, 2, 2, 2] and decoder [2, 2, 2, 1], widths 96…768, 4 heads, d_state
16): 11,119,586 parameters for 3 → 2 classes. MHS-VM's released routes come from lookup tables
made for fixed sizes; here every route is computed for the input's H × W (and cached).
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.seg.base import Segmenter, check_2d, int_list, positive_int, probability
from wsimamba.models.seg.registry import register_segmenter
from wsimamba.models.vision.base import linear_rates
from wsimamba.nn.mhs import MultiHeadScan

__all__ = ["MHSBlock", "MHSVMUNet", "PatchExpand", "PatchMerging", "mhs_vmunet"]


class MHSBlock(nn.Module):
    """x + DropPath(MHS(LN(x))). Shapes: (batch, H, W, dim) → (batch, H, W, dim)."""

    def __init__(self, dim: int, drop_path: float = 0.0, **mhs):
        super().__init__()
        self.norm, self.op = nn.LayerNorm(dim), MultiHeadScan(dim, **mhs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.op(self.norm(x)))


class PatchMerging(nn.Module):
    """2×2 neighbours concatenated → LayerNorm → Linear. (batch, H, W, C) → (batch, H/2, W/2, c_out)."""

    def __init__(self, dim: int, c_out: int):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, c_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear C → s²·c_out, rearranged to s× the size → LayerNorm.

    Shapes: (batch, H, W, C) → (batch, s·H, s·W, c_out).
    """

    def __init__(self, dim: int, c_out: int, scale: int = 2):
        super().__init__()
        self.scale, self.c_out = scale, c_out
        self.expand = nn.Linear(dim, scale * scale * c_out, bias=False)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).reshape(b, h, w, s, s, self.c_out).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, h * s, w * s, self.c_out))


class MHSVMUNet(Segmenter):
    """VM-UNet with the multi-head scan; see the module docstring and :func:`mhs_vmunet` for the arguments.

    Shapes: x (batch, in_channels, H, W) → logits (batch, num_classes, H, W); H, W multiples of
    patch_size · 2^(stages − 1) (32) unless ``pad``.
    """

    def __init__(self, in_channels: int, num_classes: int, dims=96, depths=(2, 2, 2, 2), decoder_depths=(2, 2, 2, 1),
                 heads: int = 4, routes: Sequence[str] | None = None, d_state: int = 16, d_conv: int = 3,
                 gate_threshold: float = 0.0, patch_size: int = 4, drop_path_rate: float = 0.2,
                 pad: bool = False, backend: str = "auto"):
        super().__init__()
        depths = int_list("depths", depths)
        if isinstance(dims, int) and not isinstance(dims, bool):
            dims = [positive_int("dims", dims) * 2**i for i in range(len(depths))]
        dims = int_list("dims", dims, length=len(depths))
        decoder_depths = int_list("decoder_depths", decoder_depths, length=len(depths))
        patch_size = positive_int("patch_size", patch_size)
        for d in dims:
            if d % heads:
                raise ConfigError(f"model.dims: every width must be divisible by heads={heads}, got {dims}")
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, 2
        self.pad, self._divisor = bool(pad), patch_size * 2 ** (len(dims) - 1)
        self.dims = dims
        mhs = dict(heads=heads, routes=routes, d_state=d_state, d_conv=d_conv, gate_threshold=gate_threshold,
                   backend=backend)
        top = probability("drop_path_rate", drop_path_rate)

        self.patch_embed = nn.Conv2d(in_channels, dims[0], patch_size, stride=patch_size)
        self.embed_norm = nn.LayerNorm(dims[0])
        rates = linear_rates(top, sum(depths))
        self.encoder = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            first = sum(depths[:i])
            self.encoder.append(nn.Sequential(*[MHSBlock(dim, rates[first + j], **mhs) for j in range(depth)]))
            if i + 1 < len(dims):
                self.merges.append(PatchMerging(dim, dims[i + 1]))

        up_dims = dims[::-1]
        rates = linear_rates(top, sum(decoder_depths))[::-1]  # strongest next to the bottleneck
        self.expands = nn.ModuleList(PatchExpand(up_dims[k - 1], up_dims[k]) for k in range(1, len(dims)))
        self.decoder = nn.ModuleList()
        for k, (dim, depth) in enumerate(zip(up_dims, decoder_depths)):
            first = sum(decoder_depths[:k])
            self.decoder.append(nn.Sequential(*[MHSBlock(dim, rates[first + j], **mhs) for j in range(depth)]))
        self.final_up = PatchExpand(dims[0], dims[0], patch_size)
        self.head = nn.Conv2d(dims[0], num_classes, 1)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        # VM-UNet's init; the MHS's per-sequence x_proj / dt_proj are raw parameters and keep their own
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        skips = []
        for i, stage in enumerate(self.encoder):
            skips.append(x)
            x = stage(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        for k, stage in enumerate(self.decoder):
            if k > 0:
                # VM-UNet adds the input of the encoder stage at the current size, then expands
                x = self.expands[k - 1](x + skips[-k])
            x = stage(x)
        return self.head(self.final_up(x).permute(0, 3, 1, 2))


@register_segmenter("mhs_vmunet",
                    "VM-UNet (encoder 2/2/2/2, decoder 2/2/2/1) with the 4-head multi-head scan (≈11.1M)")
def mhs_vmunet(in_channels: int, num_classes: int, spatial_dims: int = 2, dims=96, depths=(2, 2, 2, 2),
               decoder_depths=(2, 2, 2, 1), heads: int = 4, routes: Sequence[str] | None = None, d_state: int = 16,
               d_conv: int = 3, gate_threshold: float = 0.0, patch_size: int = 4, drop_path_rate: float = 0.2,
               pad: bool = False, backend: str = "auto") -> MHSVMUNet:
    """VM-UNet with the multi-head scan (2D only).

    Args:
        dims: stage widths, or one int d for d, 2d, 4d, 8d (96: VM-UNet). Each divisible by ``heads``.
        depths: MHS blocks per encoder stage. decoder_depths: per decoder step, from the bottom.
        heads: MHS subspaces. routes: the route pair of each head (``wsimamba.nn.mhs.ROUTE_PAIRS``);
            None cycles through snake, zigzag, spiral, raster.
        d_state: SSM state size. d_conv: the MHS's depthwise conv. gate_threshold: the route gate's t.
        patch_size: side of the patch embedding (4) and of the final expansion.
        drop_path_rate: stochastic depth, linear over the encoder's and over the decoder's blocks.
        pad: zero-pad to a multiple of patch_size · 2^(stages − 1) and crop back (``reduction`` 1);
            else such an input is a ConfigError.
        backend: selective-scan backend.
    """
    check_2d("mhs_vmunet", spatial_dims)
    return MHSVMUNet(in_channels, num_classes, dims=dims, depths=depths, decoder_depths=decoder_depths, heads=heads,
                     routes=routes, d_state=d_state, d_conv=d_conv, gate_threshold=gate_threshold,
                     patch_size=patch_size, drop_path_rate=drop_path_rate, pad=pad, backend=backend)
