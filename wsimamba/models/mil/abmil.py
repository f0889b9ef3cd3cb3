"""ABMIL: gated attention pooling (Ilse, Tomczak and Welling, ICML 2018)."""

from __future__ import annotations

import torch
from torch import nn

from wsimamba.models.mil.base import AttentionPool, MILModel, MILOutput
from wsimamba.nn.padding import valid_mask
from wsimamba.models.mil.registry import register_model


class ABMIL(MILModel):
    """Linear(in→d)+ReLU+Dropout, gated attention pooling, Linear(d→n_classes).

    forward(x (B, N, in_dim) [, lengths (B,)]) → logits (B, n_classes), attention (B, N) softmax weights.
    """

    takes_lengths = True
    takes_packs = True

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 512, attn_dim: int = 128, dropout: float = 0.25):
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.pool = AttentionPool(d_model, attn_dim, gated=True, dropout=dropout)
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> MILOutput:
        self._check_input(x, self.in_dim, lengths)
        valid = None if lengths is None else valid_mask(lengths, x.shape[1])
        pooled, a = self.pool(self.embed(x), valid)
        return MILOutput(self.classifier(pooled), a)

    def _forward_packed(self, x, pack):
        pooled, a = self.pool(self.embed(x), pack=pack)
        return MILOutput(self.classifier(pooled), a)


@register_model("abmil", "gated attention pooling (Ilse et al. 2018)")
def abmil(in_dim: int, n_classes: int, d_model: int = 512, attn_dim: int = 128, dropout: float = 0.25) -> ABMIL:
    return ABMIL(in_dim, n_classes, d_model=d_model, attn_dim=attn_dim, dropout=dropout)
