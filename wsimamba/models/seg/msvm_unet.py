"""MSVM-UNet (Chen et al., 2024): a VMamba-T encoder with a multi-scale Mamba decoder.

Structure (2D; widths C_i = ``dims[i]`` of the encoder, VMamba-T: 96/192/384/768):

- encoder: :meth:`VMamba.forward_pyramid` of ``create_backbone("vmamba_tiny", num_classes=0, ...)``,
  maps at 1/p, 1/2p, 1/4p, 1/8p of the input (p = ``patch_size``, 4).
- three up-blocks, from the bottom: LKPE upsampling C_{i+1} → C_i at 2× (1×1 conv to 4·C_i →
  BatchNorm → ReLU → depthwise 3×3 → pixel shuffle 2 → LayerNorm), concatenation with the encoder map
  of stage i, Linear 2·C_i → C_i, then ``decoder_depths[i]`` VSS blocks whose MLP is multi-scale:
  x + SS2D(LN(x)), then x + MS-MLP(LN(x)) with MS-MLP = fc2(GELU(h + DW1(h) + DW3(h) + DW5(h))),
  h = fc1(x), DWk a depthwise k×k conv on the hidden width.
- final expanding layer: LKPE with a p× pixel shuffle, C_0 → C_0 at the input size, then a 1×1 conv
  to the class map.

Defaults: 35,938,274 parameters for 3 → 2 classes, of which the VMamba-T encoder (without its
classifier head) holds 29,480,064 and the decoder 6.46M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.seg.base import Segmenter, check_2d, int_list, probability
from wsimamba.models.seg.registry import register_segmenter
from wsimamba.models.vision import create_backbone
from wsimamba.nn.ss2d import SS2D

__all__ = ["LKPE", "MSMLP", "MSVMUNet", "MSVSSBlock", "msvm_unet"]


class LKPE(nn.Module):
    """Patch expanding: 1×1 conv → BatchNorm → ReLU → depthwise 3×3 → pixel shuffle ``scale`` → LayerNorm.

    Shapes: x (batch, c_in, H, W) → (batch, scale·H, scale·W, c_out), channels last.
    """

    def __init__(self, c_in: int, c_out: int, scale: int = 2):
        super().__init__()
        wide = c_out * scale * scale
        self.expand = nn.Sequential(nn.Conv2d(c_in, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU(),
                                    nn.Conv2d(wide, wide, 3, padding=1, groups=wide))
        self.shuffle = nn.PixelShuffle(scale)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.shuffle(self.expand(x)).permute(0, 2, 3, 1))


class MSMLP(nn.Module):
    """Multi-scale MLP: fc1 → h + DW1(h) + DW3(h) + DW5(h) → GELU → fc2. (batch, H, W, dim) → the same."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dw = nn.ModuleList(nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden) for k in (1, 3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).permute(0, 3, 1, 2)
        h = h + sum(dw(h) for dw in self.dw)
        return self.fc2(F.gelu(h.permute(0, 2, 3, 1)))


class MSVSSBlock(nn.Module):
    """x + SS2D(LN(x)), then x + MS-MLP(LN(x)). Shapes: (batch, H, W, dim) → (batch, H, W, dim)."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ss2d):
        super().__init__()
        self.norm, self.op = nn.LayerNorm(dim), SS2D(dim, **ss2d)
        self.norm2, self.mlp = nn.LayerNorm(dim), MSMLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _UpBlock(nn.Module):
    """LKPE 2× (c_in → c_out), concat the skip, Linear 2·c_out → c_out, VSS blocks with MS-MLP.

    Shapes: x (batch, c_in, h, w), skip (batch, c_out, 2h, 2w) → (batch, 2h, 2w, c_out), channels last.
    """

    def __init__(self, c_in: int, c_out: int, depth: int, rates: list[float], mlp_ratio: float, ss2d: dict):
        super().__init__()
        self.up = LKPE(c_in, c_out, 2)
        self.fuse = nn.Linear(2 * c_out, c_out)
        self.blocks = nn.Sequential(*[MSVSSBlock(c_out, rates[j], mlp_ratio, **ss2d) for j in range(depth)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.up(x), skip.permute(0, 2, 3, 1)], dim=-1)
        return self.blocks(self.fuse(x))


class MSVMUNet(Segmenter):
    """MSVM-UNet; see the module docstring for the structure and :func:`msvm_unet` for the arguments.

    Shapes: x (batch, in_channels, H, W) → logits (batch, num_classes, H, W); H, W multiples of
    patch_size · 8 (32) unless ``pad``.
    """

    def __init__(self, in_channels: int, num_classes: int, dims=(96, 192, 384, 768), depths=(2, 2, 8, 2),
                 decoder_depths=(2, 2, 2), d_state: int = 1, ssm_ratio: float = 1.0, mlp_ratio: float = 4.0,
                 decoder_mlp_ratio: float = 4.0, patch_size: int = 4, drop_path_rate: float = 0.2,
                 pad: bool = False, backend: str = "auto"):
        super().__init__()
        self.encoder = create_backbone("vmamba_tiny", num_classes=0, in_chans=in_channels, dims=dims, depths=depths,
                                       d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio,
                                       patch_size=patch_size, drop_path_rate=drop_path_rate, backend=backend)
        dims = self.encoder.dims
        if len(dims) != 4:
            raise ConfigError(f"model.depths: MSVM-UNet's decoder has three up-blocks, so the encoder needs "
                              f"four stages, got {len(dims)}")
        decoder_depths = int_list("decoder_depths", decoder_depths, length=3)
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, 2
        self.pad, self._divisor = bool(pad), self.encoder.reduction
        ss2d = dict(d_state=d_state, ssm_ratio=ssm_ratio, backend=backend)
        rates = [probability("drop_path_rate", drop_path_rate) * j / max(1, sum(decoder_depths) - 1)
                 for j in range(sum(decoder_depths))][::-1]  # strongest next to the bottleneck
        self.decoder = nn.ModuleList()
        for k, i in enumerate((2, 1, 0)):
            first = sum(decoder_depths[:k])
            self.decoder.append(_UpBlock(dims[i + 1], dims[i], decoder_depths[k],
                                         rates[first:first + decoder_depths[k]], decoder_mlp_ratio, ss2d))
        self.final_up = LKPE(dims[0], dims[0], patch_size)
        self.head = nn.Conv2d(dims[0], num_classes, 1)
        for m in (*self.decoder.modules(), self.final_up):
            if isinstance(m, nn.Linear):  # VMamba's init for the decoder too; SS2D's raw dt/x params keep theirs
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.encoder.forward_pyramid(x)
        y = maps[-1]
        for block, skip in zip(self.decoder, (maps[2], maps[1], maps[0])):
            y = block(y, skip).permute(0, 3, 1, 2)
        return self.head(self.final_up(y).permute(0, 3, 1, 2))


@register_segmenter("msvm_unet",
                    "MSVM-UNet: VMamba-T encoder, LKPE up-blocks with multi-scale-MLP VSS blocks (≈35.9M)")
def msvm_unet(in_channels: int, num_classes: int, spatial_dims: int = 2, dims=(96, 192, 384, 768),
              depths=(2, 2, 8, 2), decoder_depths=(2, 2, 2), d_state: int = 1, ssm_ratio: float = 1.0,
              mlp_ratio: float = 4.0, decoder_mlp_ratio: float = 4.0, patch_size: int = 4,
              drop_path_rate: float = 0.2, pad: bool = False, backend: str = "auto") -> MSVMUNet:
    """MSVM-UNet (2D only).

    Args:
        dims, depths, d_state, ssm_ratio, mlp_ratio, patch_size: the VMamba-T encoder's settings
            (:func:`wsimamba.models.vision.vmamba.vmamba_tiny`); ``dims`` may be one int d for d, 2d, 4d, 8d.
        decoder_depths: VSS blocks in each of the three up-blocks (from the bottom).
        decoder_mlp_ratio: hidden width / dim of the decoder's multi-scale MLPs.
        drop_path_rate: stochastic depth, linear over the encoder's blocks and over the decoder's.
        pad: zero-pad to a multiple of patch_size · 8 and crop back (``reduction`` 1); else such an
            input is a ConfigError.
        backend: selective-scan backend.
    """
    check_2d("msvm_unet", spatial_dims)
    return MSVMUNet(in_channels, num_classes, dims=dims, depths=depths, decoder_depths=decoder_depths,
                    d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, decoder_mlp_ratio=decoder_mlp_ratio,
                    patch_size=patch_size, drop_path_rate=drop_path_rate, pad=pad, backend=backend)
