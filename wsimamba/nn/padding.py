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

:class:`PackedBags` is the other layout: several bags concatenated into one sequence (batch 1), each
in a slot that starts at a multiple of ``align`` (its real tokens, then padding to the next slot), so a
batch of bags of very different lengths costs one sequence of about their total length instead of
batch × the longest. The same rules keep the padding out, and ``seq_idx`` (the slot of each position)
makes the convolution and the scan start afresh at every slot (:func:`wsimamba.ops.causal_conv1d`,
:func:`wsimamba.ops.selective_scan`). Slots that start at multiples of LBMamba's window give each bag
the windows it has alone. Its index tensors are built from the lengths as host integers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wsimamba.errors import WsimambaError
from wsimamba.ops.reorder import ReorderBags

# softplus(−10⁴ + bias) is exactly 0 in fp32 and bf16 (e^−10⁴ underflows), and −10⁴ is finite, so no 0·∞
PAD_DELTA = -1.0e4


def valid_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, length) bool, True at each bag's first lengths[b] positions."""
    return torch.arange(length, device=lengths.device) < lengths.to(torch.long).reshape(-1, 1)


def _reordered_source(j: torch.Tensor, k: torch.Tensor, rate: int) -> torch.Tensor:
    """The token that reordered position j of a bag with k columns holds: position o·k + i holds i·rate + o."""
    return (j % k) * rate + j // k


def _reordered_position(t: torch.Tensor, k: torch.Tensor, rate: int) -> torch.Tensor:
    """Where a bag's token t sits in its reordered sequence (k columns): the inverse of _reordered_source."""
    return (t % rate) * k + t // rate


class PaddedBags:
    """Bags padded at the end: bag b's first ``lengths[b]`` of ``length`` tokens are real.

    lengths: (batch,) integer tensor on the device of the hidden states, each in [1, length].
    Attributes: ``valid`` (batch, length) bool, True at real tokens; ``lengths`` (batch,) int64;
    ``seq_idx`` None (every row is one bag; :class:`PackedBags` sets it).
    """

    seq_idx: torch.Tensor | None = None

    def __init__(self, lengths: torch.Tensor, length: int):
        n = lengths.to(torch.long).reshape(-1, 1)
        pos = torch.arange(length, device=n.device)
        self.lengths, self.length = n[:, 0], length
        self.valid = valid_mask(n[:, 0], length)
        self._pad = ~self.valid
        # bag b's real tokens reversed, its padding where it was
        self._reverse = torch.where(self.valid, n - 1 - pos, pos)
        self._by_rate: dict[int, tuple[torch.Tensor, "PaddedBags"]] = {}  # reorder_bags, made once per rate

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
        src = _reordered_source(j, k, rate)
        index = torch.where((j < k * rate) & (src < n), src, self.length)  # self.length: a zero column
        return self._take(F.pad(x, (0, 1)), index, -1), self.reordered(rate)

    def reordered(self, rate: int) -> "PaddedBags":
        """The layout :meth:`stride_reorder` returns, without reordering anything."""
        return PaddedBags(-(-self.lengths // rate) * rate, -(-self.length // rate) * rate)

    def reorder_bags(self, rate: int):
        """(the ops' ``bags`` argument, the reordered layout): what the fast layers pass the reordering
        kernels (``wsimamba.ops.causal_conv1d(reorder=, bags=)``, ``restore_add_gate(bags=)``), which read
        and write the bags in place of :meth:`stride_reorder` and :meth:`stride_restore`. Made once per rate
        (every SRMamba layer of a forward shares it), the lengths as the int32 the kernels read."""
        if rate not in self._by_rate:
            self._by_rate[rate] = (self.lengths.to(torch.int32), self.reordered(rate))
        return self._by_rate[rate]

    def stride_restore(self, y: torch.Tensor, rate: int) -> torch.Tensor:
        """Inverse of :meth:`stride_reorder`: (batch, channels, reordered length) → (batch, channels, length)."""
        n = self.lengths[:, None]
        k = (n + rate - 1) // rate
        t = torch.arange(self.length, device=n.device)
        return self._take(y, torch.where(t < n, _reordered_position(t, k, rate), 0), -1)


def _device_ints(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Rows of host ints as int64 tensors on `device`, in one copy."""
    return list(torch.tensor(rows, dtype=torch.long).to(device).unbind(0))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or fp64 when it is fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class PackedBagsError(WsimambaError):
    """Bags that cannot be packed as asked (an empty list, an empty bag, mixed widths, a bad alignment)."""


class PackedBags(PaddedBags):
    """Bags packed into one sequence of ``length`` tokens (batch 1): bag b's ``sizes[b]`` real tokens start
    at ``starts[b]``, a multiple of ``align``, and padding fills its slot up to the next bag's start
    (none after the last bag).

    sizes: the bags' lengths, host ints ≥ 1. Attributes as :class:`PaddedBags` for a batch of one row
    (``valid`` (1, length), ``lengths`` (bags,) int64), plus ``seq_idx`` (1, length) int32, the slot
    of every position (nondecreasing: the convolution and scan restart at each slot), ``bag`` (length,)
    int64 the same ids, ``sizes``, ``starts`` (host ints) and ``align``. Build it with :meth:`pack`.
    """

    def __init__(self, sizes: list[int], align: int = 1, device: torch.device | str = "cpu"):
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1:
            raise PackedBagsError(f"sizes: expected one or more bags of at least 1 token, got {sizes}")
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise PackedBagsError(f"align: expected a positive int, got {align!r}")
        starts, at = [], 0
        for n in sizes:
            starts.append(at)
            at += -(-n // align) * align
        length = starts[-1] + sizes[-1]  # no padding after the last bag
        self.sizes, self.starts, self.align, self.length = sizes, list(starts), align, length
        device = torch.device(device)
        slot = [b - a for a, b in zip(self.starts, self.starts[1:] + [length])]
        self.lengths, self._start, slot = _device_ints([sizes, self.starts, slot], device)
        self.bag = torch.repeat_interleave(torch.arange(len(sizes), device=device), slot, output_size=length)
        self._reordered: dict[int, tuple[torch.Tensor, torch.Tensor, "PackedBags"]] = {}
        self._bags: ReorderBags | None = None  # the ops' view of this layout (kernels cache on it)
        pos = torch.arange(length, device=device)
        start, n = self._start[self.bag], self.lengths[self.bag]
        self.local = pos - start  # each position's place in its bag
        self.valid = (self.local < n)[None]
        self._pad = ~self.valid
        self.seq_idx = self.bag.to(torch.int32)[None]
        self._reverse = torch.where(self.valid[0], start + n - 1 - self.local, pos)[None]

    @classmethod
    def pack(cls, bags: list[torch.Tensor], align: int = 1) -> tuple[torch.Tensor, "PackedBags"]:
        """bags: (N_b, dim) tensors on one device → (x (1, length, dim) with zeros in the padding, layout)."""
        if not bags:
            raise PackedBagsError("bags: expected at least one bag, got an empty list")
        for i, b in enumerate(bags):
            if b.dim() != 2 or b.shape[0] < 1 or b.shape[1] != bags[0].shape[1]:
                raise PackedBagsError(f"bag {i}: expected shape (instances >= 1, {bags[0].shape[-1]}), "
                                      f"got {tuple(b.shape)}")
        layout = cls([b.shape[0] for b in bags], align, bags[0].device)
        parts = []
        for b, n, start, end in zip(bags, layout.sizes, layout.starts, layout.starts[1:] + [layout.length]):
            parts.append(b)
            if end - start > n:
                parts.append(b.new_zeros(end - start - n, b.shape[1]))
        return torch.cat(parts)[None], layout

    def lb_window(self, window: int | None) -> int:
        """The window a locally bidirectional scan uses on these bags: `window`, or LBMamba's rule
        (:func:`wsimamba.ops.default_window`) for each bag's own length, which must then agree. Every
        slot must start at a multiple of it (so each bag's windows are its windows alone)."""
        from wsimamba.ops.selective_scan import default_window

        if window is None:
            windows = {default_window(n) for n in self.sizes}
            if len(windows) > 1:
                raise PackedBagsError(
                    f"window=None: these packed bags ({min(self.sizes)} to {max(self.sizes)} tokens) fall in "
                    f"different LBMamba window classes {sorted(windows)}; pack bags of one class, or set the window")
            window = windows.pop()
        if any(s % window for s in self.starts):
            raise PackedBagsError(f"window {window}: the packed slots start at multiples of {self.align}, "
                                  f"not of the window; pack with align={math.lcm(self.align, window)}")
        return window

    def _reordering(self, rate: int) -> tuple[torch.Tensor, torch.Tensor, "PackedBags"]:
        """Per bag: columns k_b = ceil(n_b / rate) and reordered starts (device), and the reordered layout;
        made once per rate (every SRMamba layer of a forward shares them)."""
        if rate not in self._reordered:
            ks = [-(-n // rate) for n in self.sizes]
            out = PackedBags([k * rate for k in ks], 1, self.bag.device)
            k, start = _device_ints([ks, out.starts], self.bag.device)
            self._reordered[rate] = (k, start, out)
        return self._reordered[rate]

    def stride_reorder(self, x: torch.Tensor, rate: int) -> tuple[torch.Tensor, "PackedBags"]:
        """:func:`wsimamba.nn.stride_reorder` of each bag alone, the results packed back to back.

        x (1, channels, length) → (1, channels, Σ ceil(n_b / rate)·rate) and its :class:`PackedBags`
        (the zeros that pad each bag to a multiple of `rate` count as its tokens, as alone)."""
        ks, _, out = self._reordering(rate)
        src = _reordered_source(out.local, ks[out.bag], rate)
        index = torch.where(src < self.lengths[out.bag], self._start[out.bag] + src, self.length)
        return F.pad(x, (0, 1)).index_select(-1, index), out

    def reordered(self, rate: int) -> "PackedBags":
        """The layout :meth:`stride_reorder` returns (the bags' reordered sequences back to back)."""
        return self._reordering(rate)[2]

    def reorder_bags(self, rate: int):
        """(a :class:`wsimamba.ops.ReorderBags` of this pack, the reordered layout), as
        :meth:`PaddedBags.reorder_bags`; one ReorderBags per pack, on which the kernels cache their tile lists."""
        if self._bags is None:
            self._bags = ReorderBags(self.starts, self.sizes)
        return self._bags, self.reordered(rate)

    def stride_restore(self, y: torch.Tensor, rate: int) -> torch.Tensor:
        """Inverse of :meth:`stride_reorder`: (1, channels, reordered length) → (1, channels, length)
        (padding positions get a bag's first token)."""
        ks, starts, _ = self._reordering(rate)
        t = torch.where(self.valid[0], self.local, 0)
        return y.index_select(-1, starts[self.bag] + _reordered_position(t, ks[self.bag], rate))

    # ---- per-bag reductions over the packed sequence, for the pooling heads

    def _pad_along(self, values: torch.Tensor) -> torch.Tensor:
        """The padding mask (length,) shaped to broadcast over values (length, …)."""
        return self._pad[0].reshape(-1, *[1] * (values.dim() - 1))

    def segment_softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (length,) → each bag's softmax over its real tokens (0 at padding), fp32 (or fp64)."""
        s = _wide(scores).masked_fill(self._pad[0], float("-inf"))
        top = s.new_full((len(self.sizes),), float("-inf"))
        top = top.scatter_reduce(0, self.bag, s.detach(), "amax")  # a shift: the softmax does not depend on it
        e = torch.exp(s - top[self.bag])
        return e / torch.zeros_like(top).index_add(0, self.bag, e)[self.bag]

    def segment_sum(self, values: torch.Tensor) -> torch.Tensor:
        """values (length, …) → (bags, …), each bag's sum over its real tokens, accumulated in fp32 (or fp64)."""
        v = _wide(values).masked_fill(self._pad_along(values), 0)
        return v.new_zeros(len(self.sizes), *values.shape[1:]).index_add(0, self.bag, v)

    def segment_mix(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """weights (length,), 0 at padding, and values (length, d) → (bags, d): each bag's Σ weight·value, as
        one product (a (bags, length) matrix holding each position's weight in its bag's row) in the values'
        dtype, as attention pooling computes a padded batch."""
        rows = weights.new_zeros(len(self.sizes), self.length).scatter(0, self.bag[None], weights[None])
        return torch.mm(rows.to(values.dtype), values)

    def segment_max(self, values: torch.Tensor) -> torch.Tensor:
        """values (length, …) → (bags, …), each bag's max over its real tokens."""
        v = values.masked_fill(self._pad_along(values), float("-inf"))
        out = v.new_full((len(self.sizes), *values.shape[1:]), float("-inf"))
        index = self.bag.reshape(-1, *[1] * (values.dim() - 1)).expand_as(v)
        return out.scatter_reduce(0, index, v, "amax")

    def unpack(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """values (length,) → (bags, the longest bag) with each bag's real tokens first, `fill` after."""
        longest = max(self.sizes)
        j = torch.arange(longest, device=values.device)
        index = torch.where(j < self.lengths[:, None], self._start[:, None] + j, self.length)
        return torch.cat([values, values.new_full((1,), fill)]).take(index)
