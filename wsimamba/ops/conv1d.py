"""Causal depthwise conv1d (+ SiLU), the short convolution of a Mamba block: a PyTorch reference and dispatch.

    x        (batch, dim, length)
    weight   (dim, width), or nn.Conv1d's (dim, 1, width)
    bias     (dim,) or None
    seq_idx  (batch, length) int32/int64 or None: the packed sequence each position belongs to

    out[b, d, t] = act(bias[d] + Σ_{k=0}^{width-1} weight[d, k] · x[b, d, t − (width − 1) + k])

with x = 0 before position 0 and, with ``seq_idx``, a tap at position s counted for position t only
where seq_idx[b, s] == seq_idx[b, t] (every bag packed into the sequence is convolved as if alone;
mamba-ssm's ``causal_conv1d_fn`` takes the same argument). Without seq_idx this is
``nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1)(x)[..., :length]``; ``activation`` is
"silu" or None. Accumulation is fp32 (fp64 when any input is fp64); the output has x's dtype.

``reorder=r`` convolves ``stride_reorder(x, r)`` (MambaMIL's reordering, :mod:`wsimamba.ops.reorder`)
instead of x: the reference makes the reordered copy, the triton backend reads x in place and returns
dx in x's order.

Backends
--------
``reference``  this module; any device, any float dtype, any strides; differentiable by autograd.
``triton``     ``wsimamba.kernels.conv1d``, imported on first use: the fused forward and backward.
               CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` when asked for by name;
               fp32/fp16/bf16 x, width ≤ its ``MAX_WIDTH``. It raises ``TritonConvError`` for inputs it
               does not take: ``auto`` then uses the reference, an explicit request gets a ConvBackendError.
``auto``       ``triton`` for CUDA tensors when it loads and takes the inputs, else ``reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsimamba.errors import WsimambaError
from wsimamba.ops._backends import run_backend
from wsimamba.ops.reorder import bag_list, check_bags, place_bags, reordered_length, stride_reorder

__all__ = [
    "CONV_BACKENDS",
    "ConvArgumentError",
    "ConvBackendError",
    "causal_conv1d",
    "causal_conv1d_reference",
]

CONV_BACKENDS = ("auto", "reference", "triton")
_ACTIVATIONS = ("silu", None)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
_TRITON_MODULE = "wsimamba.kernels.conv1d"


class ConvArgumentError(WsimambaError):
    """An argument of the causal conv1d has a wrong shape, dtype or value."""


class ConvBackendError(WsimambaError):
    """The requested causal-conv1d backend cannot run these inputs here."""


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ConvArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ConvArgumentError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")


def _check_args(x, weight, bias, activation, seq_idx) -> torch.Tensor:
    """Validates the arguments; returns the weight as (dim, width) (a view of nn.Conv1d's (dim, 1, width))."""
    _check_float("x", x)
    if x.dim() != 3:
        raise ConvArgumentError(f"x: expected shape (batch, dim, length), got {_shape(x)}")
    batch, dim, length = x.shape
    if batch < 1 or dim < 1 or length < 1:
        raise ConvArgumentError(f"x: batch, dim and length must be at least 1, got shape {_shape(x)}")
    _check_float("weight", weight)
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ConvArgumentError(f"weight: expected shape ({dim}, width) or ({dim}, 1, width), got {_shape(weight)}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (dim,):
            raise ConvArgumentError(f"bias: expected shape ({dim},), got {_shape(bias)}")
    if activation not in _ACTIVATIONS:
        raise ConvArgumentError(f"activation: expected 'silu' or None, got {activation!r}")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor):
            raise ConvArgumentError(f"seq_idx: expected a tensor, got {type(seq_idx).__name__}")
        if seq_idx.dtype not in _INDEX_DTYPES:
            raise ConvArgumentError(f"seq_idx: expected an int32/int64 tensor, got {seq_idx.dtype}")
        if tuple(seq_idx.shape) != (batch, length):
            raise ConvArgumentError(f"seq_idx: expected shape ({batch}, {length}), got {_shape(seq_idx)}")
    for name, t in (("weight", weight), ("bias", bias), ("seq_idx", seq_idx)):
        if t is not None and t.device != x.device:
            raise ConvArgumentError(f"{name}: on {t.device}, but x is on {x.device}")
    return weight


def _reference(x, weight, bias, activation, seq_idx):
    dtype = torch.float32
    for t in (x, weight, bias):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    dim, width = weight.shape
    xc, w = x.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    if seq_idx is None:
        # autocast would run the convolution in bf16/fp16; the reference accumulates in `dtype`
        with torch.autocast(x.device.type, enabled=False):
            p = F.conv1d(xc, w.unsqueeze(1), b, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    else:
        # tap k reads x shifted right by s = width - 1 - k, kept where it comes from the same packed sequence
        p = xc * w[:, width - 1, None]
        for s in range(1, min(width, x.shape[-1])):
            same = F.pad(seq_idx[:, s:] == seq_idx[:, :-s], (s, 0), value=False)  # (batch, length)
            shifted = F.pad(xc[..., :-s], (s, 0))
            p = p + shifted * same[:, None, :].to(dtype) * w[:, width - 1 - s, None]
        if b is not None:
            p = p + b[:, None]
    if activation == "silu":
        p = F.silu(p)
    return p.to(x.dtype)


def causal_conv1d_reference(x, weight, bias=None, activation="silu", seq_idx=None):
    """The reference backend: PyTorch, any device, differentiable by autograd.

    Shapes and arguments as :func:`causal_conv1d`. Without seq_idx one grouped ``F.conv1d``; with it a sum
    of `width` shifted copies of x, each masked where its tap crosses into another packed sequence.
    Returns out (batch, dim, length) in x's dtype.
    """
    weight = _check_args(x, weight, bias, activation, seq_idx)
    return _reference(x, weight, bias, activation, seq_idx)


def causal_conv1d(x, weight, bias=None, activation="silu", seq_idx=None, backend="auto", reorder=None, bags=None):
    """Causal depthwise conv1d followed by SiLU (or no activation), as in a Mamba block.

    Args:
        x: (batch, dim, length), fp32/fp16/bf16 (fp64 on the reference). The triton backend reads any batch
            and dim strides in place (a view such as ``xz[:, :dim]``) and copies x only when its stride along
            the length is not 1.
        weight: (dim, width), or nn.Conv1d's (dim, 1, width); any float dtype.
        bias: (dim,) or None.
        activation: "silu" or None.
        seq_idx: (batch, length) int32/int64, optional: taps only within runs of equal values (module docstring).
        backend: "auto", "reference" or "triton" (module docstring).
        reorder: a positive int r, optional: the conv of ``stride_reorder(x, r)`` (MambaMIL's sequence
            reordering, :func:`wsimamba.ops.stride_reorder`), which the triton backend reads from x in place
            (no reordered copy of x; dx comes back in x's order). Not with seq_idx.
        bags: with ``reorder``, optional: a (batch,) integer tensor of lengths (padded bags) or a
            :class:`wsimamba.ops.ReorderBags` (bags packed in one row): each bag reordered and convolved
            alone, into the layout :class:`~wsimamba.ops.ReorderBags` describes; the output is 0 outside the
            bags' reordered sequences, and x outside the bags gets no gradient.

    Returns:
        out (batch, dim, length), a new contiguous tensor in x's dtype; differentiable in x, weight (its
        gradient has the shape and dtype of the weight given) and bias. With ``reorder`` r: (batch, dim,
        ceil(length / r) · r), in the reordered order (packed ``bags``: (1, dim, bags.reordered_length(r))).

    Raises:
        ConvArgumentError: a bad shape, dtype or value (names the argument).
        ConvBackendError: the requested backend cannot run here (not installed, wrong device, or inputs it
            refuses, such as a width past the kernel's limit).
    """
    weight2 = _check_args(x, weight, bias, activation, seq_idx)
    if backend not in CONV_BACKENDS:
        raise ConvArgumentError(f"backend: expected one of {', '.join(CONV_BACKENDS)}, got {backend!r}")
    if reorder is not None:
        if isinstance(reorder, bool) or not isinstance(reorder, int) or reorder < 1:
            raise ConvArgumentError(f"reorder: expected a positive int, got {reorder!r}")
        if seq_idx is not None:
            raise ConvArgumentError("reorder: cannot be combined with seq_idx (pass the packed sequences as bags)")
        check_bags(bags, x.shape[0], x.shape[-1], x.device, ConvArgumentError)
    elif bags is not None:
        raise ConvArgumentError("bags: only with reorder (without it, seq_idx separates packed sequences)")

    def reference():
        if reorder is None:
            return _reference(x, weight2, bias, activation, seq_idx)
        if bags is None:
            return _reference(stride_reorder(x, reorder), weight2, bias, activation, None)
        out = torch.zeros(x.shape[:2] + (reordered_length(bags, x.shape[-1], reorder),), dtype=x.dtype, device=x.device)
        rows = [(b, r, -(-n // reorder) * reorder,
                 _reference(stride_reorder(x[b:b + 1, :, a:a + n], reorder), weight2, bias, activation, None)[0])
                for b, a, n, r in bag_list(bags, x.shape[0], x.shape[-1], reorder, ConvArgumentError)]
        return place_bags(out, rows)

    extra = {} if reorder is None else {"reorder": reorder, "bags": bags}
    return run_backend(backend, x.device, _TRITON_MODULE, "TritonConvError", ConvBackendError, "conv1d",
                       lambda kernels: kernels.causal_conv1d(x, weight2, bias, seq_idx, activation, **extra), reference)
