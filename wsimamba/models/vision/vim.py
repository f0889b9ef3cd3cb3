"""Vim and LBVim: plain (non-hierarchical) Mamba vision backbones over a 16-px patch sequence.

- ``vim_tiny``   Vim-Ti (Zhu et al., 2024): BiMamba v2 blocks (a forward and a backward branch per
                 layer, averaged), a class token in the middle of the sequence, learned absolute
                 position embedding, RMSNorm, residual stream kept in fp32. ≈7.15M parameters.
- ``lbvim_tiny`` LBVim-Ti (the LBMamba paper): one direction per layer with the locally bidirectional
                 scan (:class:`wsimamba.nn.LBMamba`), the token sequence and the residual stream both
                 reversed after every layer (:class:`wsimamba.nn.AlternatingFlip`), no class token,
                 mean pooling. ≈6.42M parameters.

Parameter names follow Vim's (patch_embed.proj, cls_token, pos_embed, layers.{i}.mixer / .norm,
norm_f, head), with the class token's position embedding at index N // 2 as in Vim's middle-token
layout, so Vim checkpoints are meant to load by name (no checkpoint was available offline to try).
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
from wsimamba.nn import AlternatingFlip, BiMamba, LBMamba

__all__ = ["VimBlock", "VisionMamba", "lbvim_tiny", "vim_tiny"]


class VimBlock(nn.Module):
    """Vim's pre-norm block with the residual carried separately: (hidden, residual) → (hidden, residual).

    residual ← residual + drop_path(hidden) (or hidden for the first block); hidden ← mixer(RMSNorm(residual)).
    With ``residual_in_fp32`` the residual stream stays fp32 under autocast, as Vim keeps it.

    Shapes: hidden, residual (batch, length, dim); residual may be None for the first block.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, residual_in_fp32: bool = True):
        super().__init__()
        self.mixer = mixer
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        if self.residual_in_fp32:
            residual = residual.float()
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        return self.mixer(hidden), residual


class VisionMamba(VisionBackbone):
    """A plain Mamba vision backbone (Vim / LBVim).

    Args:
        num_classes: classes of the linear head; 0 = no head (forward returns the pooled vector).
        img_size: the input side the position embedding is learned at; other sizes divisible by
            ``patch_size`` interpolate it (bicubic over the patch grid).
        patch_size: side of the square patches (stride of the patch embedding) = ``reduction``.
        in_chans: input channels. embed_dim: token width. depth: number of blocks.
        d_state, d_conv, expand, dt_rank: Mamba block sizes (:class:`wsimamba.nn.Mamba`).
        mixer: "bimamba" (Vim v2) or "lbmamba" (one direction, locally bidirectional scan).
        window: LBMamba's window (None: its rule from the sequence length).
        cls_token: insert a class token in the middle of the sequence and pool by it; else mean pooling.
        flip: reverse the sequence and residual after every block (LBVim).
        drop_rate: dropout before the head. drop_path_rate: stochastic depth, linear over the blocks.
        residual_in_fp32: keep the residual stream in fp32 (Vim's setting).
        pyramid_layers: block counts after which :meth:`forward_pyramid` taps the token map
            (default: after each quarter of the depth, as Vim's segmentation uses layers 6/12/18/24).
        backend: selective-scan backend ("auto", "reference", "triton", "mamba_ssm").
    """

    def __init__(self, *, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 192, depth: int = 24, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", mixer: str = "bimamba", window: int | None = None,
                 cls_token: bool = True, flip: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 residual_in_fp32: bool = True, pyramid_layers=None, backend: str = "auto"):
        super().__init__()
        self.in_chans = positive_int("in_chans", in_chans)
        self.reduction = positive_int("patch_size", patch_size)
        self.num_features = self.embed_dim = positive_int("embed_dim", embed_dim)
        self.depth = positive_int("depth", depth)
        for name, value in (("img_size", img_size), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            positive_int(name, value)
        if img_size % patch_size:
            raise ConfigError(f"model.img_size: {img_size} is not a multiple of patch_size {patch_size}")
        if mixer not in ("bimamba", "lbmamba"):
            raise ConfigError(f"model.mixer: expected 'bimamba' or 'lbmamba', got {mixer!r}")
        if pyramid_layers is None:
            pyramid_layers = sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})
        self.pyramid_layers = int_list("pyramid_layers", pyramid_layers)
        if any(n > depth for n in self.pyramid_layers) or self.pyramid_layers != sorted(set(self.pyramid_layers)):
            raise ConfigError(f"model.pyramid_layers: expected increasing block counts in 1..{depth}, "
                              f"got {pyramid_layers!r}")
        self.flip = bool(flip)
        self.grid = (img_size // patch_size, img_size // patch_size)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        n_tokens = self.grid[0] * self.grid[1]
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            trunc_normal_(self.cls_token, std=0.02)
        else:
            self.cls_token = None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens + int(cls_token), embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)

        rates = linear_rates(probability("drop_path_rate", drop_path_rate), depth)
        blocks = []
        for i in range(depth):
            if mixer == "bimamba":
                m = BiMamba(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, backend=backend)
            else:
                m = LBMamba(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                            window=window, backend=backend)
            # GPT-2 / mamba-ssm rescaling: each block's write into the residual stream shrinks with depth
            with torch.no_grad():
                m.out_proj.weight /= math.sqrt(depth)
            blocks.append(VimBlock(embed_dim, m, rates[i], residual_in_fp32))
        self.layers = nn.ModuleList(blocks)
        self.norm_f = nn.RMSNorm(embed_dim, eps=1e-5)
        self._build_head(num_classes, drop_rate)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (timm convention)."""
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """The position embedding for a gh × gw patch grid: (1, gh·gw [+ 1], dim), class token at the middle."""
        pe = self.pos_embed
        if (gh, gw) == self.grid:
            return pe
        n0 = self.grid[0] * self.grid[1]
        if self.cls_token is not None:
            mid = n0 // 2
            cls_pe, patches = pe[:, mid:mid + 1], torch.cat([pe[:, :mid], pe[:, mid + 1:]], dim=1)
        else:
            cls_pe, patches = None, pe
        patches = patches.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patches = patches.to(pe.dtype).flatten(2).transpose(1, 2)
        if cls_pe is None:
            return patches
        mid = gh * gw // 2
        return torch.cat([patches[:, :mid], cls_pe, patches[:, mid:]], dim=1)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Images (batch, C, H, W) → tokens (batch, gh·gw [+ 1], dim) with position embedding; gh, gw."""
        self._check_input(x)
        x = self.patch_embed.proj(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            mid = gh * gw // 2  # Vim's middle class token: equally far from both ends of the scan
            x = torch.cat([x[:, :mid], self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, mid:]], dim=1)
        return x + self._pos_embed(gh, gw).to(x.dtype), gh, gw

    def _encode(self, x: torch.Tensor, taps: list[int]) -> tuple[list[torch.Tensor], int, int]:
        """Run the blocks; after each block count in ``taps`` return norm_f(residual stream) in input order.

        Returns ([(batch, tokens, dim), ...], gh, gw).
        """
        hidden, gh, gw = self._tokens(x)
        residual, done, reversed_order, outs = None, 0, False, []
        for stop in taps:
            segment = self.layers[done:stop]
            if self.flip:
                hidden, residual = AlternatingFlip(segment, residual=True, restore_order=False)(hidden, residual)
                reversed_order ^= len(segment) % 2 == 1
            else:
                for layer in segment:
                    hidden, residual = layer(hidden, residual)
            done = stop
            out = self.norm_f((residual + hidden).to(self.norm_f.weight.dtype))
            outs.append(out.flip(1) if reversed_order else out)
        return outs, gh, gw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_chans, H, W) → (batch, embed_dim): the class token, or the mean over tokens."""
        (out,), gh, gw = self._encode(x, [self.depth])
        if self.cls_token is not None:
            return out[:, gh * gw // 2]
        return out.mean(dim=1)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (batch, in_chans, H, W) → [(batch, embed_dim, H / patch, W / patch)] × len(pyramid_layers).

        Every map is the residual stream after that many blocks, through the final RMSNorm, class token removed.
        """
        outs, gh, gw = self._encode(x, self.pyramid_layers)
        maps = []
        for out in outs:
            if self.cls_token is not None:
                mid = gh * gw // 2
                out = torch.cat([out[:, :mid], out[:, mid + 1:]], dim=1)
            maps.append(out.transpose(1, 2).reshape(out.shape[0], -1, gh, gw))
        return maps


@register_backbone("vim_tiny", "Vim-Ti: patch 16, dim 192, 24 BiMamba v2 blocks, middle class token (≈7.1M)")
def vim_tiny(num_classes: int = 1000, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
             embed_dim: int = 192, depth: int = 24, d_state: int = 16, d_conv: int = 4, expand: int = 2,
             dt_rank: int | str = "auto", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
             pyramid_layers=None, backend: str = "auto") -> VisionMamba:
    """Vim-Ti (7.15M parameters with the 1000-class head, 6.96M without). See :class:`VisionMamba`."""
    return VisionMamba(num_classes=num_classes, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                       embed_dim=embed_dim, depth=depth, d_state=d_state, d_conv=d_conv, expand=expand,
                       dt_rank=dt_rank, mixer="bimamba", cls_token=True, flip=False, drop_rate=drop_rate,
                       drop_path_rate=drop_path_rate, pyramid_layers=pyramid_layers, backend=backend)


@register_backbone("lbvim_tiny", "LBVim-Ti: patch 16, dim 192, 24 LBMamba blocks flipped in turn, mean pool (≈6.4M)")
def lbvim_tiny(num_classes: int = 1000, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
               embed_dim: int = 192, depth: int = 24, d_state: int = 16, d_conv: int = 4, expand: int = 2,
               dt_rank: int | str = "auto", window: int | None = None, drop_rate: float = 0.0,
               drop_path_rate: float = 0.0, pyramid_layers=None, backend: str = "auto") -> VisionMamba:
    """LBVim-Ti (6.42M parameters with the 1000-class head, 6.23M without). See :class:`VisionMamba`."""
    return VisionMamba(num_classes=num_classes, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                       embed_dim=embed_dim, depth=depth, d_state=d_state, d_conv=d_conv, expand=expand,
                       dt_rank=dt_rank, mixer="lbmamba", window=window, cls_token=False, flip=True,
                       drop_rate=drop_rate, drop_path_rate=drop_path_rate, pyramid_layers=pyramid_layers,
                       backend=backend)
