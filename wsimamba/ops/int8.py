"""Integer matmul for W8A8 Linear layers: ``torch._int_mm`` (int8 × int8 → int32), then a float rescale.

    out[m, n] = (Σ_k xq[m, k] · wq[n, k]) · x_scale[m] · w_scale[n] + bias[n]

xq (M, K) int8 holds the quantized activations (one scale for the tensor, or one per row / token);
wq (N, K) int8 the weights quantized symmetrically per output channel (w_scale (N,)).

:func:`int8_linear` is the fast path; :func:`int8_linear_reference` is the slow oracle beside it
(float64 accumulation: exact while K · 127² < 2⁵³). ``torch._int_mm`` has shape rules on CUDA
(cuBLASLt): M > 16, K and N multiples of 8. :func:`int8_linear` pads with zeros (zero rows and
columns add nothing to an integer dot product) so any shape runs; the padding is cut off again.
On CPU this torch's ``_int_mm`` takes any shape, so no padding is done there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsimamba.errors import WsimambaError

__all__ = [
    "Int8MatmulError",
    "int8_linear",
    "int8_linear_reference",
    "int_mm_available",
    "quantize_rows",
    "quantize_tensor",
]

_MIN_ROWS_CUDA = 17  # cuBLASLt int8 GEMM: M must exceed 16
_ALIGN_CUDA = 8  # K and N multiples of 8


class Int8MatmulError(WsimambaError):
    """An int8 matmul got tensors of the wrong dtype or shape."""


def int_mm_available(device: torch.device | str) -> bool:
    """Whether ``torch._int_mm`` runs on `device` in this torch (tried once per device type)."""
    device = torch.device(device)
    key = device.type
    if key not in _AVAILABLE:
        try:
            # shapes within cuBLASLt's rules (M > 16, K and N multiples of 8), the weight transposed
            # as int8_linear passes it
            a = torch.ones(2 * _ALIGN_CUDA * 2, 2 * _ALIGN_CUDA, dtype=torch.int8, device=device)
            w = torch.ones(2 * _ALIGN_CUDA, 2 * _ALIGN_CUDA, dtype=torch.int8, device=device)
            _AVAILABLE[key] = bool((torch._int_mm(a, w.t()) == 2 * _ALIGN_CUDA).all())
        except (RuntimeError, AttributeError, NotImplementedError):
            _AVAILABLE[key] = False
    return _AVAILABLE[key]


_AVAILABLE: dict[str, bool] = {}


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """Symmetric round-to-nearest: clamp(round(x / scale), −qmax, qmax) as int8; qmax = 2^(bits−1) − 1.

    `scale` is a scalar or broadcasts against x (e.g. (M, 1) per row).
    """
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8)


def quantize_rows(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric quantization of x (M, K) → (xq int8 (M, K), scale fp32 (M, 1))."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / qmax
    return quantize_tensor(x.float(), scale, bits), scale


def _check(xq, wq, x_scale, w_scale):
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise Int8MatmulError(f"xq, wq: expected int8 tensors, got {xq.dtype} and {wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise Int8MatmulError(f"xq (M, K), wq (N, K): got shapes {tuple(xq.shape)} and {tuple(wq.shape)}")
    if w_scale.shape != (wq.shape[0],):
        raise Int8MatmulError(f"w_scale: expected shape ({wq.shape[0]},), got {tuple(w_scale.shape)}")
    if x_scale.numel() not in (1, xq.shape[0]):
        raise Int8MatmulError(f"x_scale: expected 1 or {xq.shape[0]} values, got shape {tuple(x_scale.shape)}")


def _rescale(acc, x_scale, w_scale, bias, out_dtype):
    x_scale = x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale.reshape(1, 1)
    out = acc.float() * (x_scale.float() * w_scale.float()[None, :])
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8 linear through ``torch._int_mm``.

    xq (M, K) int8, x_scale () / (1,) / (M,) / (M, 1); wq (N, K) int8, w_scale (N,); bias (N,) or None.
    Returns (M, N) in `out_dtype`. Shapes that break ``_int_mm``'s CUDA rules are zero-padded.
    """
    _check(xq, wq, x_scale, w_scale)
    m, k = xq.shape
    n = wq.shape[0]
    a, b = xq, wq
    if xq.device.type == "cuda":
        pad_m = max(0, _MIN_ROWS_CUDA - m)
        pad_k = -k % _ALIGN_CUDA
        pad_n = -n % _ALIGN_CUDA
        if pad_m or pad_k:
            a = F.pad(a, (0, pad_k, 0, pad_m))
        if pad_k or pad_n:
            b = F.pad(b, (0, pad_k, 0, pad_n))
    acc = torch._int_mm(a.contiguous(), b.t())[:m, :n]
    return _rescale(acc, x_scale, w_scale, bias, out_dtype)


def int8_linear_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The slow oracle of :func:`int8_linear`: the integer products summed in float64 (exact), same rescale."""
    _check(xq, wq, x_scale, w_scale)
    acc = xq.double() @ wq.double().t()
    return _rescale(acc, x_scale, w_scale, bias, out_dtype)
