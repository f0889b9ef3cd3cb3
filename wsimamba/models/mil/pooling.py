"""Mean and max pooling baselines: an instance MLP, then pooling of instance logits.

Pooling logits rather than embeddings gives each instance an exact score for heatmaps: for mean
pooling the bag logit is the mean of the instance logits (the classifier is linear), and for max
pooling it is the max (mi-Net, Wang et al. 2018).
"""

from __future__ import annotations

import torch
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.mil.base import MILModel, MILOutput
from wsimamba.nn.padding import valid_mask
from wsimamba.models.mil.registry import register_model


class InstancePool(MILModel):
    """Linear(in→d)+ReLU+Dropout, Linear(d→n_classes) per instance, then mean or max over instances.

    forward(x (B, N, in_dim) [, lengths (B,)]) → logits (B, n_classes), attention (B, N) = last-class
    instance logit (0 at padding).
    """

    takes_lengths = True
    takes_packs = True

    def __init__(self, in_dim: int, n_classes: int, mode: str, d_model: int = 512, dropout: float = 0.25):
        super().__init__()
        if mode not in ("mean", "max"):
            raise ConfigError(f"pooling mode must be mean or max, got {mode!r}")
        self.in_dim, self.n_classes, self.mode = in_dim, n_classes, mode
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> MILOutput:
        self._check_input(x, self.in_dim, lengths)
        inst = self.classifier(self.embed(x))  # (B, N, C)
        if lengths is None:
            logits = inst.mean(1) if self.mode == "mean" else inst.max(1).values
            return MILOutput(logits, inst[..., -1].float())
        valid = valid_mask(lengths, x.shape[1])[..., None]
        if self.mode == "mean":
            logits = inst.masked_fill(~valid, 0).sum(1) / lengths.to(inst.dtype)[:, None]
        else:
            logits = inst.masked_fill(~valid, float("-inf")).max(1).values
        return MILOutput(logits, inst[..., -1].float().masked_fill(~valid[..., 0], 0))

    def _forward_packed(self, x, pack):
        inst = self.classifier(self.embed(x))[0]  # (length, C)
        if self.mode == "mean":
            logits = (pack.segment_sum(inst) / pack.lengths[:, None]).to(inst.dtype)
        else:
            logits = pack.segment_max(inst)
        return MILOutput(logits, pack.unpack(inst[:, -1].float()))


@register_model("meanpool", "mean of instance logits (instance MLP, then average)")
def meanpool(in_dim: int, n_classes: int, d_model: int = 512, dropout: float = 0.25) -> InstancePool:
    return InstancePool(in_dim, n_classes, "mean", d_model=d_model, dropout=dropout)


@register_model("maxpool", "max of instance logits per class (mi-Net)")
def maxpool(in_dim: int, n_classes: int, d_model: int = 512, dropout: float = 0.25) -> InstancePool:
    return InstancePool(in_dim, n_classes, "max", d_model=d_model, dropout=dropout)
