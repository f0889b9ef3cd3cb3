"""What every MIL aggregator shares: its output type and the attention-pooling heads."""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.errors import WsimambaError
from wsimamba.nn.padding import PackedBags


class MILOutput(NamedTuple):
    """logits: (B, n_classes); attention: (B, N), one score per instance (patch), for heatmaps.

    For attention-pooling models the scores are the softmax weights (each row sums to 1); for
    mean / max pooling they are the per-instance logit of the last class (the positive class in
    binary tasks); for TransMIL the class token's attention in the last layer.
    """

    logits: torch.Tensor
    attention: torch.Tensor


class MILModel(nn.Module, abc.ABC):
    """Base class: ``forward(x, lengths=None)`` maps a batch of bags (B, N, in_dim) to a :class:`MILOutput`.

    Bags in one batch have the same length N (MIL training usually runs one bag per step), or are
    padded at their ends to it: ``lengths`` (B,) integer tensor, bag b's first lengths[b] instances
    are real. Models with ``takes_lengths`` then give each bag's logits as if it ran alone, and
    attention 0 at padding; the others refuse ``lengths``.

    :meth:`forward_bags` takes a list of bags of any lengths. Models with ``takes_packs`` run them packed
    into one sequence (:class:`wsimamba.nn.PackedBags`: one launch per layer for the whole batch, each
    bag computed as if alone); the others run them one by one.
    """

    in_dim: int
    n_classes: int
    takes_lengths: bool = False
    takes_packs: bool = False

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> MILOutput:
        """x (B, N, in_dim) [, lengths (B,)] → MILOutput(logits (B, n_classes), attention (B, N))."""

    def forward_bags(self, bags: list[torch.Tensor]) -> MILOutput:
        """bags: (N_b, in_dim) tensors on one device → MILOutput(logits (B, n_classes), attention (B, max N_b)),
        bag b's attention in its first N_b columns and 0 after, each bag's as if it ran alone."""
        if not isinstance(bags, (list, tuple)) or not bags:
            raise WsimambaError(f"bags: expected a non-empty list of (instances, {self.in_dim}) tensors")
        for i, b in enumerate(bags):
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[0] < 1 or b.shape[1] != self.in_dim:
                raise WsimambaError(f"bag {i}: expected shape (instances >= 1, {self.in_dim}), got "
                                    f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
        if not self.takes_packs:
            outs = [self(b[None]) for b in bags]
            return MILOutput(torch.cat([o.logits for o in outs]), _rows([o.attention[0] for o in outs]))
        logits, attention = [None] * len(bags), [None] * len(bags)
        for members, align in self.pack_groups([b.shape[0] for b in bags]):
            x, pack = PackedBags.pack([bags[i] for i in members], align)
            out = self._forward_packed(x, pack)
            for row, i in enumerate(members):
                logits[i], attention[i] = out.logits[row], out.attention[row, : bags[i].shape[0]]
        return MILOutput(torch.stack(logits), _rows(attention))

    def pack_groups(self, sizes: list[int]) -> list[tuple[list[int], int]]:
        """How :meth:`forward_bags` packs bags of these lengths: (bag indices, slot alignment) per pack."""
        return [(list(range(len(sizes))), 1)]

    def _forward_packed(self, x: torch.Tensor, pack: PackedBags) -> MILOutput:
        """x (1, length, in_dim) packed bags → MILOutput(logits (bags, n_classes), attention (bags, longest)).
        Models that set ``takes_packs`` define it; forward_bags calls it only for them."""
        raise WsimambaError(f"{type(self).__name__}: takes_packs is set but _forward_packed is not defined")

    def _check_input(self, x: torch.Tensor, in_dim: int, lengths: torch.Tensor | None = None) -> None:
        if x.dim() != 3 or x.shape[-1] != in_dim or x.shape[1] < 1:
            raise WsimambaError(f"expected bags of shape (batch, instances >= 1, {in_dim}), got {tuple(x.shape)}")
        if lengths is None:
            return
        if not self.takes_lengths:
            raise WsimambaError(f"lengths: {type(self).__name__} does not take padded bags")
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (x.shape[0],) or lengths.is_floating_point():
            raise WsimambaError(f"lengths: expected an integer tensor of shape ({x.shape[0]},), got "
                                f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
        # (the values are not read here: that would wait for the GPU, and a CUDA graph cannot capture it)


def _rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """1-d tensors of different lengths → (len(rows), the longest), zero after each row's end."""
    longest = max(r.shape[0] for r in rows)
    return torch.stack([F.pad(r, (0, longest - r.shape[0])) for r in rows])


class AttentionPool(nn.Module):
    """Attention pooling (Ilse et al. 2018): weights a_i = softmax_i(w·(tanh(V h_i) ⊙ σ(U h_i))).

    With ``gated=False`` the sigmoid gate is dropped (plain attention, as in MambaMIL).
    forward(h (B, N, d) [, valid (B, N) bool: False at padding, weight 0]) → (pooled (B, d), weights (B, N));
    or forward(h (1, length, d), pack=PackedBags) → (pooled (bags, d), weights (bags, longest bag)).
    """

    def __init__(self, d: int, hidden: int = 128, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(d, hidden), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None,
                pack: PackedBags | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.v(h)
        if self.u is not None:
            g = g * self.u(h)
        # softmax in fp32: bags of 10^5 instances under bf16 lose the small weights otherwise
        scores = self.w(g).squeeze(-1)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if pack is not None:
            a = pack.segment_softmax(scores[0])
            pooled = pack.segment_mix(a, h[0])
            return pooled, pack.unpack(a)
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        a = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("bn,bnd->bd", a.to(h.dtype), h)
        return pooled, a
