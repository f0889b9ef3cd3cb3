"""Mamba MIL aggregators: MambaMIL (SRMamba), BiMambaMIL (BiMamba) and LBMambaMIL (LBMamba).

All three share one body (Yang et al., MICCAI 2024, "MambaMIL"):

    Linear(in→d) + GELU + Dropout
    layers × [x + Mixer(LayerNorm(x))]
    LayerNorm → attention pooling → Linear(d→n_classes)

The mixer is ``wsimamba.nn.SRMamba`` (sequence reordering with rate r), ``wsimamba.nn.BiMamba``
(Vim v2: forward and backward branches averaged) or ``wsimamba.nn.LBMamba`` (forward scan plus a
backward scan inside local windows); for LBMamba the sequence is flipped after every layer so that
successive layers alternate direction and the stack sees global context both ways.

``impl`` picks the mixers' fast or reference layers (``wsimamba.nn.mamba``; "auto": fast on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

import wsimamba.nn as wnn
from wsimamba.errors import ConfigError
from wsimamba.models.mil.base import AttentionPool, MILModel, MILOutput
from wsimamba.models.mil.registry import register_model
from wsimamba.ops.selective_scan import default_window


class PreNormResidual(nn.Module):
    """x + mixer(LayerNorm(x)); (B, N, d) → (B, N, d)."""

    def __init__(self, d_model: int, mixer: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer

    def forward(self, x: torch.Tensor, pad: wnn.PaddedBags | None = None) -> torch.Tensor:
        return x + (self.mixer(self.norm(x)) if pad is None else self.mixer(self.norm(x), pad=pad))


class MambaMILBase(MILModel):
    """The shared body; `make_mixer(d_model)` builds one layer's mixer, mapping (B, N, d) → (B, N, d).

    With ``flip_between_layers`` the residual layers run inside ``wsimamba.nn.AlternatingFlip``
    (sequence reversed after every layer, original order restored at the end).
    forward(x (B, N, in_dim) [, lengths (B,)]) → logits (B, n_classes), attention (B, N) softmax weights
    (in patch order). With lengths (bags padded at their ends) the mixers get a ``wsimamba.nn.PaddedBags``;
    LBMamba's default window then follows N, so bags of ≤ 256 patches match their lone runs only with
    ``window`` set or N in the same window class (≤ 128, ≤ 256, longer). :meth:`forward_bags` packs
    bags into one sequence (``wsimamba.nn.PackedBags``), one pack per window class for LBMamba's rule.
    """

    takes_lengths = True
    takes_packs = True

    def __init__(self, in_dim: int, n_classes: int, make_mixer, d_model: int, layers: int, dropout: float,
                 attn_dim: int, flip_between_layers: bool = False, local_window: int | None | bool = False):
        super().__init__()
        # the mixers' local_bidirectional window (None: LBMamba's rule per bag), or False: no local scan
        self.local_window = local_window
        if layers < 1:
            raise ConfigError(f"model.layers must be >= 1, got {layers}")
        self.in_dim, self.n_classes = in_dim, n_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))
        blocks = [PreNormResidual(d_model, make_mixer(d_model)) for _ in range(layers)]
        self.layers = wnn.AlternatingFlip(blocks, restore_order=True) if flip_between_layers else nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.pool = AttentionPool(d_model, attn_dim, gated=False)
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> MILOutput:
        self._check_input(x, self.in_dim, lengths)
        return self._body(x, None if lengths is None else wnn.PaddedBags(lengths, x.shape[1]))

    def pack_groups(self, sizes: list[int]) -> list[tuple[list[int], int]]:
        """One pack, or with LBMamba's window rule one per window class, its slots aligned to the window
        (each bag gets the windows it has alone)."""
        if self.local_window is False:
            return [(list(range(len(sizes))), 1)]
        if self.local_window is not None:
            return [(list(range(len(sizes))), self.local_window)]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            groups.setdefault(default_window(n), []).append(i)
        return [(members, window) for window, members in groups.items()]

    def _forward_packed(self, x: torch.Tensor, pack: wnn.PackedBags) -> MILOutput:
        return self._body(x, pack)

    def _body(self, x: torch.Tensor, pad: wnn.PaddedBags | None) -> MILOutput:
        packed = isinstance(pad, wnn.PackedBags)
        h = self.embed(x)
        if isinstance(self.layers, wnn.AlternatingFlip):
            h = self.layers(h, pad=pad)
        else:
            for layer in self.layers:
                h = layer(h, pad)
        if packed:
            pooled, a = self.pool(self.norm(h), pack=pad)
        else:
            pooled, a = self.pool(self.norm(h), None if pad is None else pad.valid)
        return MILOutput(self.classifier(pooled), a)


@register_model("mambamil", "MambaMIL: SRMamba layers (sequence reordering), attention pooling")
def mambamil(in_dim: int, n_classes: int, d_model: int = 512, layers: int = 2, dropout: float = 0.25,
             d_state: int = 16, d_conv: int = 4, expand: int = 2, rate: int = 10, attn_dim: int = 128,
             backend: str = "auto", impl: str = "auto") -> MambaMILBase:
    return MambaMILBase(
        in_dim, n_classes,
        lambda d: wnn.SRMamba(d, d_state=d_state, d_conv=d_conv, expand=expand, rate=rate, backend=backend, impl=impl),
        d_model, layers, dropout, attn_dim,
    )


@register_model("bimambamil", "MambaMIL body with BiMamba layers (Vim v2: forward + backward, averaged)")
def bimambamil(in_dim: int, n_classes: int, d_model: int = 512, layers: int = 2, dropout: float = 0.25,
               d_state: int = 16, d_conv: int = 4, expand: int = 2, attn_dim: int = 128,
               backend: str = "auto", impl: str = "auto") -> MambaMILBase:
    return MambaMILBase(
        in_dim, n_classes,
        lambda d: wnn.BiMamba(d, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend, impl=impl),
        d_model, layers, dropout, attn_dim,
    )


@register_model("lbmambamil", "MambaMIL body with LBMamba layers (local-bidirectional scan), flipped between layers")
def lbmambamil(in_dim: int, n_classes: int, d_model: int = 512, layers: int = 2, dropout: float = 0.25,
               d_state: int = 16, d_conv: int = 4, expand: int = 2, window: int | None = None,
               attn_dim: int = 128, backend: str = "auto", impl: str = "auto") -> MambaMILBase:
    return MambaMILBase(
        in_dim, n_classes,
        lambda d: wnn.LBMamba(d, d_state=d_state, d_conv=d_conv, expand=expand, window=window, backend=backend,
                              impl=impl),
        d_model, layers, dropout, attn_dim, flip_between_layers=True, local_window=window,
    )
