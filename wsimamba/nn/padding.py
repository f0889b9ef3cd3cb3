"""Bags padded at the end to one length, for the Mamba blocks (``pad=`` argument).

A batch of sequences of different lengths n_b, each padded at its end to a common length L (so a
batch of bags runs as one product and one scan, and a bag's length can be rounded up to a fixed
shape that a CUDA graph replays). Every Mamba block given ``pad`` computes, for each bag's first n_b
tokens, what it computes for that bag alone; the outputs at padding positions are finite and
meaningless. How the blocks keep the padding out:

- padding always follows the real tokens: a flip reverses each bag's real tokens in place
  (:meth:`PaddedBags.flip`) instead of the whole row, so causal convolutions and forward scans
  reach padding only after every real token, in either orientation, and local windows start at
  each bag's first token as they would alone;
- the scan's step Δ is forced to 0 at padding (:meth:`PaddedBags.mask_delta`: the raw Δ is set to
  −10⁴ before the scan's softplus), so a padding step is the identity (decay exp(0·A) = 1, input
  Δ·B·u = 0): the reverse scans of the ``bidirectional`` and ``local_bidirectional`` directions
  carry nothing from padding into real tokens;
- SRMamba's stride reordering is done per bag (:meth:`PaddedBags.stride_reorder`).

Everything is computed on the device from the lengths tensor, with no host read, so a CUDA graph can
capture it with the lengths as an input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# softplus(−10⁴ + bias) is exactly 0 in fp32 and bf16 (e^−10⁴ underflows), and −10⁴ is finite, so no 0·∞
PAD_DELTA = -1.0e4


def valid_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, length) bool, True at each bag's first lengths[b] positions."""
    return torch.arange(length, device=lengths.device) < lengths.to(torch.long).reshape(-1, 1)


class PaddedBags:
    """Bags padded at the end: bag b's first ``lengths[b]`` of ``length`` tokens are real.

    lengths: (batch,) integer tensor on the device of the hidden states, each in [1, length].
    Attributes: ``valid`` (batch, length) bool, True at real tokens; ``lengths`` (batch,) int64.
    """

    def __init__(self, lengths: torch.Tensor, length: int):
        n = lengths.to(torch.long).reshape(-1, 1)
        pos = torch.arange(length, device=n.device)
        self.lengths, self.length = n[:, 0], length
        self.valid = valid_mask(n[:, 0], length)
        self._pad = ~self.valid
        # bag b's real tokens reversed, its padding where it was
        self._reverse = torch.where(self.valid, n - 1 - pos, pos)

    def _take(self, x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
        """x gathered along `dim` by index (batch, m): out[b, …, j, …] = x[b, …, index[b, j], …]."""
        dim %= x.dim()
        if x.shape[0] == 1:
            return x.index_select(dim, index[0])
        shape = [index.shape[0]] + [1] * (x.dim() - 1)
        shape[dim] = index.shape[1]
        size = list(x.shape)
        size[dim] = index.shape[1]
        return x.gather(dim, index.reshape(shape).expand(size))

    def flip(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Each bag's real tokens in reverse order along `dim` (the length axis), padding left in place."""
        return self._take(x, self._reverse, dim)

    def mask_delta(self, dt: torch.Tensor) -> torch.Tensor:
        """dt (batch, channels, length), the scan's raw Δ before bias and softplus → Δ = 0 at padding."""
        return dt.masked_fill(self._pad[:, None, :], PAD_DELTA)

    def stride_reorder(self, x: torch.Tensor, rate: int) -> tuple[torch.Tensor, "PaddedBags"]:
        """:func:`wsimamba.nn.stride_reorder` of each bag alone, padded at the end to one length.

        x (batch, channels, length) → (batch, channels, ceil(length / rate)·rate) and the
        :class:`PaddedBags` of the result (bag b's reordered sequence has ceil(n_b / rate)·rate tokens,
        the zeros that pad it to a multiple of `rate` included, as alone)."""
        n = self.lengths[:, None]
        k = (n + rate - 1) // rate  # (batch, 1): columns of each bag's reshape
        total = -(-self.length // rate) * rate
        j = torch.arange(total, device=n.device)
        src = (j % k) * rate + j // k  # reordered position o·k + i holds token i·rate + o
        index = torch.where((j < k * rate) & (src < n), src, self.length)  # self.length: a zero column
        return self._take(F.pad(x, (0, 1)), index, -1), PaddedBags(k[:, 0] * rate, total)

    def stride_restore(self, y: torch.Tensor, rate: int) -> torch.Tensor:
        """Inverse of :meth:`stride_reorder`: (batch, channels, reordered length) → (batch, channels, length)."""
        n = self.lengths[:, None]
        k = (n + rate - 1) // rate
        t = torch.arange(self.length, device=n.device)
        return self._take(y, torch.where(t < n, (t % rate) * k + t // rate, 0), -1)
