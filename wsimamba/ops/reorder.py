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


def _check_args(y, y_reordered, z, rate) -> None:
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
    padded = -(-length // rate) * rate
    if tuple(y_reordered.shape) != (batch, channels, padded):
        raise ReorderArgumentError(f"y_reordered: expected shape ({batch}, {channels}, {padded}) (length {length} "
                                   f"reordered with rate {rate}), got {tuple(y_reordered.shape)}")
    if z.shape != y.shape:
        raise ReorderArgumentError(f"z: expected shape {tuple(y.shape)} like y, got {tuple(z.shape)}")


def _reference(y, y_reordered, z, rate):
    dtype = torch.float32
    for t in (y, y_reordered, z):
        dtype = torch.promote_types(dtype, t.dtype)
    with torch.autocast(y.device.type, enabled=False):
        s = y.to(dtype) + stride_restore(y_reordered.to(dtype), rate, y.shape[-1])
        return (s * F.silu(z.to(dtype))).to(y.dtype)


def restore_add_gate_reference(y, y_reordered, z, rate):
    """The reference backend: PyTorch, any device and strides, differentiable by autograd; arithmetic in fp32
    (fp64 when an input is), the result in y's dtype. Arguments as :func:`restore_add_gate`."""
    _check_args(y, y_reordered, z, rate)
    return _reference(y, y_reordered, z, rate)


def restore_add_gate(y, y_reordered, z, rate, backend="auto"):
    """(y + stride_restore(y_reordered, rate, length)) · silu(z), the end of an SRMamba block (module docstring).

    Args:
        y: (batch, channels, length), fp32/fp16/bf16 (fp64 on the reference): the forward branch.
        y_reordered: (batch, channels, ceil(length / rate) · rate): the branch over the reordered sequence,
            in its reordered order.
        z: (batch, channels, length): the gate (any strides; a channel slice of in_proj's output is read in place).
        rate: the reordering's stride, a positive int.
        backend: "auto", "reference" or "triton".

    Returns:
        (batch, channels, length) in y's dtype, contiguous; differentiable in all three inputs.

    Raises:
        ReorderArgumentError: a bad shape, dtype or value (names the argument).
        ReorderBackendError: the requested backend cannot run here.
    """
    _check_args(y, y_reordered, z, rate)
    if backend not in REORDER_BACKENDS:
        raise ReorderArgumentError(f"backend: expected one of {', '.join(REORDER_BACKENDS)}, got {backend!r}")
    return run_backend(backend, y.device, _TRITON_MODULE, "TritonReorderError", ReorderBackendError, "reorder",
                       lambda kernels: kernels.restore_add_gate(y, y_reordered, z, rate),
                       lambda: _reference(y, y_reordered, z, rate))
