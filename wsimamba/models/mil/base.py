"""What every MIL aggregator shares: its output type and the attention-pooling heads."""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
from torch import nn

from wsimamba.errors import WsimambaError


class MILOutput(NamedTuple):
    """logits: (B, n_classes); attention: (B, N), one score per instance (patch), for heatmaps.

    For attention-pooling models the scores are the softmax weights (each row sums to 1); for
    mean / max pooling they are the per-instance logit of the last class (the positive class in
    binary tasks); for TransMIL the class token's attention in the last layer.
    """

    logits: torch.Tensor
    attention: torch.Tensor


class MILModel(nn.Module, abc.ABC):
    """Base class: ``forward(x)`` maps a batch of bags (B, N, in_dim) to a :class:`MILOutput`.

    Bags in one batch have the same length N (MIL training usually runs one bag per step).
    """

    in_dim: int
    n_classes: int

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> MILOutput:
        """x (B, N, in_dim) → MILOutput(logits (B, n_classes), attention (B, N))."""

    @staticmethod
    def _check_input(x: torch.Tensor, in_dim: int) -> None:
        if x.dim() != 3 or x.shape[-1] != in_dim or x.shape[1] < 1:
            raise WsimambaError(f"expected bags of shape (batch, instances >= 1, {in_dim}), got {tuple(x.shape)}")


class AttentionPool(nn.Module):
    """Attention pooling (Ilse et al. 2018): weights a_i = softmax_i(w·(tanh(V h_i) ⊙ σ(U h_i))).

    With ``gated=False`` the sigmoid gate is dropped (plain attention, as in MambaMIL).
    forward(h (B, N, d)) → (pooled (B, d), weights (B, N)).
    """

    def __init__(self, d: int, hidden: int = 128, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(d, hidden), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.v(h)
        if self.u is not None:
            g = g * self.u(h)
        # softmax in fp32: bags of 10^5 instances under bf16 lose the small weights otherwise
        a = torch.softmax(self.w(g).squeeze(-1).float(), dim=-1)
        pooled = torch.einsum("bn,bnd->bd", a.to(h.dtype), h)
        return pooled, a
