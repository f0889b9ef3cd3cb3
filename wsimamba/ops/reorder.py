"""MambaMIL's sequence reordering (SRMamba) as ops: the reorder and its inverse, and the fused end of an
SRMamba block.

    stride_reorder(x, r)     (batch, channels, length) → (batch, channels, K·r), K = ceil(length / r):
                             zero-padded to K·r, then every r-th token from offset 0, then from offset 1, …
                             (phase o holds original positions o, o + r, o + 2r, …; index o·K + k ↔ k·r + o)
    stride_restore(y, r, L)  its inverse, cut back to L tokens

    restore_add_gate(y, y_reordered, z, r)
        out[b, c, t] = (y[b, c, t] + y_reordered[b, c, (t mod r)·K + ⌊t / r⌋]) · silu(z[b, c, t]),  t < L

The last is how an SRMamba block's fast layers end: both branches scan without the gate, and one pass
restores the reordered branch, adds the forward branch and applies the gate both share
(``(y_f · silu(z)) + restore(y_r · silu(reorder(z)))`` is the same function, since the reordering moves
z's tokens with the others). Its reference is PyTorch (fp32 arithmetic, the result in y's dtype); the
``triton`` backend (``wsimamba.kernels.reorder``) reads y_reordered at its reordered indices and writes the
gradients of both branches, each in its own order, in one pass (z's too), so neither the restore nor the
reorder of the gradient is a copy of its own.

Padded or packed bags (``bags``: a (batch,) lengths tensor, or a :class:`ReorderBags`) are reordered and
restored each alone, as :class:`wsimamba.nn.PaddedBags` and :class:`wsimamba.nn.PackedBags` do with index
gathers; their ``reorder_bags(rate)`` gives the argument.

Backends as :mod:`wsimamba.ops.conv1d`: ``auto`` (triton on CUDA when it loads and takes the inputs, else
reference), ``reference``, ``triton`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` when named).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsimamba.errors import WsimambaError
from wsimamba.ops._backends import run_backend

__all__ = [
    "REORDER_BACKENDS",
    "ReorderArgumentError",
    "ReorderBackendError",
    "ReorderBags",
    "restore_add_gate",
    "restore_add_gate_reference",
    "stride_reorder",
    "stride_restore",
]

REORDER_BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_MODULE = "wsimamba.kernels.reorder"


class ReorderArgumentError(WsimambaError):
    """An argument of the reordering ops has a wrong shape, dtype or value."""


class ReorderBackendError(WsimambaError):
    """The requested backend cannot run these inputs here."""


def stride_reorder(x: torch.Tensor, rate: int) -> torch.Tensor:
    """MambaMIL's sequence reordering: pad the length with zeros to a multiple of ``rate``, then take
    every ``rate``-th token, starting at offsets 0, 1, …, rate − 1 in turn ((k w) → (w k), w = rate).

    x (batch, channels, length) → (batch, channels, ceil(length / rate) · rate).
    """
    b, c, length = x.shape
    k = -(-length // rate)
    x = F.pad(x, (0, k * rate - length))
    return x.reshape(b, c, k, rate).transpose(-1, -2).reshape(b, c, k * rate)


def stride_restore(x: torch.Tensor, rate: int, length: int) -> torch.Tensor:
    """Inverse of :func:`stride_reorder`: (batch, channels, padded length) → (batch, channels, length)."""
    b, c, padded = x.shape
    return x.reshape(b, c, rate, padded // rate).transpose(-1, -2).reshape(b, c, padded)[..., :length]


class ReorderBags:
    """Bags packed along the length of one row, each reordered alone (the layout of
    :class:`wsimamba.nn.PackedBags`): bag i's ``sizes[i]`` tokens start at ``starts[i]`` (host ints,
    increasing, not overlapping; padding may lie between bags), and its reordered sequence, ceil(sizes[i] /
    rate)·rate tokens, follows bag i − 1's in the reordered row, with no gaps (:meth:`reordered_starts`).

    The ops' ``bags`` argument is this, or a (batch,) integer tensor of lengths (row b's first lengths[b]
    tokens are its bag, reordered into the first ceil(lengths[b] / rate)·rate positions of a row of
    ceil(length / rate)·rate), or None (every row is one bag of the full length). Kernels cache their tile
    lists on the object (``cache``), so one per pack and rate serves every layer.
    """

    def __init__(self, starts, sizes):
        starts, sizes = [int(v) for v in starts], [int(v) for v in sizes]
        if not sizes or len(starts) != len(sizes):
            raise ReorderArgumentError(f"bags: expected as many starts as sizes (at least one), got {len(starts)} "
                                       f"and {len(sizes)}")
        at = 0
        for i, (a, n) in enumerate(zip(starts, sizes)):
            if n < 1 or a < at:
                raise ReorderArgumentError(f"bags: bag {i} (start {a}, size {n}) must hold at least 1 token and "
                                           f"start at or after the previous bag's end {at}")
            at = a + n
        self.starts, self.sizes, self.end = tuple(starts), tuple(sizes), at
        self.cache: dict = {}

    def reordered_starts(self, rate: int) -> list[int]:
        out, at = [], 0
        for n in self.sizes:
            out.append(at)
            at += -(-n // rate) * rate
        return out

    def reordered_length(self, rate: int) -> int:
        return sum(-(-n // rate) * rate for n in self.sizes)

    def __repr__(self) -> str:
        return f"ReorderBags(starts={list(self.starts)}, sizes={list(self.sizes)})"


def reordered_length(bags, length: int, rate: int) -> int:
    """The reordered row's length for ``bags`` (:class:`ReorderBags`) over rows of `length` tokens."""
    return bags.reordered_length(rate) if isinstance(bags, ReorderBags) else -(-length // rate) * rate


def check_bags(bags, batch: int, length: int, device, error: type) -> None:
    """Checks the ops' ``bags`` argument (None, a lengths tensor or a :class:`ReorderBags`), raising `error`
    naming what is wrong. A lengths tensor's values are checked by the reference backends only: the kernels
    clamp them into [0, length] rather than read them on the host (a CUDA graph could not capture that), so
    memory stays safe and a wrong length acts as the clamped one."""
    if bags is None:
        return
    if isinstance(bags, ReorderBags):
        if batch != 1:
            raise error(f"bags: packed bags take one row (batch 1), got batch {batch}")
        if bags.end > length:
            raise error(f"bags: the last bag ends at {bags.end}, past the length {length}")
        return
    if not isinstance(bags, torch.Tensor) or bags.dtype.is_floating_point or bags.dtype == torch.bool:
        raise error(f"bags: expected a ReorderBags, a (batch,) integer tensor of lengths or None, got {bags!r}")
    if tuple(bags.shape) != (batch,):
        raise error(f"bags: lengths must have shape ({batch},), got {tuple(bags.shape)}")
    if bags.device != device:
        raise error(f"bags: on {bags.device}, but the data is on {device}")


def bag_list(bags, batch: int, length: int, rate: int, error: type) -> list[tuple[int, int, int, int]]:
    """(row, start, size, reordered start) of every bag, on the host (the references; synchronises)."""
    if bags is None:
        return [(b, 0, length, 0) for b in range(batch)]
    if isinstance(bags, ReorderBags):
        return [(0, a, n, r) for a, n, r in zip(bags.starts, bags.sizes, bags.reordered_starts(rate))]
    sizes = bags.tolist()
    for b, n in enumerate(sizes):
        if not 1 <= n <= length:
            raise error(f"bags: length {n} of row {b} is outside [1, {length}]")
    return [(b, 0, n, 0) for b, n in enumerate(sizes)]


def _check_args(y, y_reordered, z, rate, bags=None) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise ReorderArgumentError(f"rate: expected a positive int, got {rate!r}")
    for name, t in (("y", y), ("y_reordered", y_reordered), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise ReorderArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ReorderArgumentError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")
        if t.dim() != 3:
            raise ReorderArgumentError(f"{name}: expected shape (batch, channels, length), got {tuple(t.shape)}")
        if t.device != y.device:
            raise ReorderArgumentError(f"{name}: on {t.device}, but y is on {y.device}")
    batch, channels, length = y.shape
    if min(y.shape) < 1:
        raise ReorderArgumentError(f"y: batch, channels and length must be at least 1, got {tuple(y.shape)}")
    check_bags(bags, batch, length, y.device, ReorderArgumentError)
    padded = reordered_length(bags, length, rate)
    if tuple(y_reordered.shape) != (batch, channels, padded):
        raise ReorderArgumentError(f"y_reordered: expected shape ({batch}, {channels}, {padded}) (length {length} "
                                   f"reordered with rate {rate}{' by bags' if bags is not None else ''}), got "
                                   f"{tuple(y_reordered.shape)}")
    if z.shape != y.shape:
        raise ReorderArgumentError(f"z: expected shape {tuple(y.shape)} like y, got {tuple(z.shape)}")


def _reference(y, y_reordered, z, rate, bags=None):
    dtype = torch.float32
    for t in (y, y_reordered, z):
        dtype = torch.promote_types(dtype, t.dtype)
    with torch.autocast(y.device.type, enabled=False):
        if bags is None:
            s = y.to(dtype) + stride_restore(y_reordered.to(dtype), rate, y.shape[-1])
            return (s * F.silu(z.to(dtype))).to(y.dtype)
        rows = []
        for b, a, n, r in bag_list(bags, y.shape[0], y.shape[-1], rate, ReorderArgumentError):
            s = y[b, :, a:a + n].to(dtype) + stride_restore(y_reordered[b:b + 1, :, r:r + -(-n // rate) * rate].to(dtype),
                                                            rate, n)[0]
            rows.append((b, a, n, s * F.silu(z[b, :, a:a + n].to(dtype))))
        # outside the bags (padding) the output is 0
        return place_bags(torch.zeros(y.shape, dtype=dtype, device=y.device), rows).to(y.dtype)


def place_bags(out: torch.Tensor, rows) -> torch.Tensor:
    """out with each bag's values written at its positions, differentiably (the references)."""
    for b, a, n, v in rows:
        out = torch.cat([out[:b], torch.cat([out[b:b + 1, :, :a], v[None], out[b:b + 1, :, a + n:]], -1),
                         out[b + 1:]], 0)
    return out


def restore_add_gate_reference(y, y_reordered, z, rate, bags=None):
    """The reference backend: PyTorch, any device and strides, differentiable by autograd; arithmetic in fp32
    (fp64 when an input is), the result in y's dtype. Arguments as :func:`restore_add_gate`."""
    _check_args(y, y_reordered, z, rate, bags)
    return _reference(y, y_reordered, z, rate, bags)


def restore_add_gate(y, y_reordered, z, rate, backend="auto", bags=None):
    """(y + stride_restore(y_reordered, rate, length)) · silu(z), the end of an SRMamba block (module docstring).

    Args:
        y: (batch, channels, length), fp32/fp16/bf16 (fp64 on the reference): the forward branch.
        y_reordered: (batch, channels, ceil(length / rate) · rate): the branch over the reordered sequence,
            in its reordered order (with packed ``bags``: (1, channels, bags.reordered_length(rate))).
        z: (batch, channels, length): the gate (any strides; a channel slice of in_proj's output is read in place).
        rate: the reordering's stride, a positive int.
        backend: "auto", "reference" or "triton".
        bags: None, a (batch,) integer tensor of lengths, or a :class:`ReorderBags`: each bag restored from its
            own reordered sequence (the layouts of :class:`ReorderBags`); the output is 0 outside the bags.

    Returns:
        (batch, channels, length) in y's dtype, contiguous; differentiable in all three inputs.

    Raises:
        ReorderArgumentError: a bad shape, dtype or value (names the argument).
        ReorderBackendError: the requested backend cannot run here.
    """
    _check_args(y, y_reordered, z, rate, bags)
    if backend not in REORDER_BACKENDS:
        raise ReorderArgumentError(f"backend: expected one of {', '.join(REORDER_BACKENDS)}, got {backend!r}")
    return run_backend(backend, y.device, _TRITON_MODULE, "TritonReorderError", ReorderBackendError, "reorder",
                       lambda kernels: kernels.restore_add_gate(y, y_reordered, z, rate, bags),
                       lambda: _reference(y, y_reordered, z, rate, bags))
