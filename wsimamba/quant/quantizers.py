"""Quantizers and the quantized Linear layer.

- Weights: symmetric, one scale per output channel (row), 8 or 4 bits; integers kept in int8.
- Activations (:class:`ActQuantizer`): per tensor with a static scale calibrated by a percentile
  observer, or per token with a dynamic scale (the amax of each token's features).
- :class:`OnlineRotation`: the transform a layer's input gets at run time when it cannot be folded
  into the producer (a non-linearity sits in between): an optional per-channel factor, then a random
  Hadamard rotation by the fast transform, or a dense rotation matrix (KLT-enhanced).
- :class:`QuantLinear`: rotation → activation quantizer → W8A8 matmul; through ``torch._int_mm``
  (``wsimamba.ops.int8``) when the int path is on, otherwise fake quantization (quantize → dequantize
  in float), which is also the reference the int path is tested against.

Every quantizer has a mode (module attribute ``mode``): ``off`` (identity), ``stats`` (identity,
records per-channel amax and optionally the second-moment matrix for rotation/smoothing choices),
``observe`` (identity, feeds the percentile observer) and ``quant``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.ops.int8 import int8_linear, int_mm_available, quantize_tensor
from wsimamba.quant.rotation import hadamard_transform, second_moment

__all__ = [
    "ActQuantizer",
    "OnlineRotation",
    "QuantLinear",
    "fake_quant_weight",
    "quantize_weight",
]

MODES = ("off", "stats", "observe", "quant")
_SAMPLE_PER_BATCH = 1 << 18  # |x| values the percentile observer keeps per calibration batch
_QUANTILE_LIMIT = 1 << 24  # torch.quantile's input limit


def quantize_weight(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of w (out, ...) → (int8 of w's shape, scale (out,) fp32).

    qmax = 2^(bits−1) − 1 (127 for 8 bits, 7 for 4 bits); scale = amax of the row / qmax.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().reshape(w.shape[0], -1).abs().amax(1).double().clamp_min(1e-12)
    scale = amax / qmax
    q = quantize_tensor(w.detach().double(), scale.reshape(-1, *([1] * (w.dim() - 1))), bits)
    return q, scale.float()


def fake_quant_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize → dequantize w per output channel, in w's dtype (scales kept in float64 on the way)."""
    q, _ = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().reshape(w.shape[0], -1).abs().amax(1).double().clamp_min(1e-12) / qmax
    return (q.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)


class ActQuantizer(nn.Module):
    """Activation fake-quantizer over features along ``feature_dim``.

    granularity ``tensor``: one static scale (buffer ``scale``) from the calibration percentile of |x|;
    ``token``: one scale per token (every position except ``feature_dim``), computed on the fly.
    ``record_moment``: in ``stats`` mode also accumulate Σ xᵀx over tokens (for a KLT rotation).
    """

    def __init__(self, bits: int = 8, granularity: str = "tensor", percentile: float = 99.99,
                 feature_dim: int = -1, record_moment: bool = False):
        super().__init__()
        self.bits, self.granularity, self.percentile = bits, granularity, percentile
        self.feature_dim, self.record_moment = feature_dim, record_moment
        self.mode = "off"
        self.register_buffer("scale", torch.ones(()))
        self._reset_stats()

    def _reset_stats(self):
        self.channel_amax: torch.Tensor | None = None
        self.moment: torch.Tensor | None = None
        self.count = 0
        self._samples: list[torch.Tensor] = []

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}, mode={self.mode}"

    def _features_last(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.feature_dim in (-1, x.dim() - 1) else x.movedim(self.feature_dim, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "stats":
            self._record(x)
            return x
        if self.mode == "observe":
            self._observe(x)
            return x
        return self.fake_quant(x)

    @torch.no_grad()
    def _record(self, x):
        flat = self._features_last(x).reshape(-1, x.shape[self.feature_dim])
        amax = flat.abs().amax(0).double()
        self.channel_amax = amax if self.channel_amax is None else torch.maximum(self.channel_amax, amax)
        if self.record_moment:
            m = second_moment(flat)
            self.moment = m if self.moment is None else self.moment + m
        self.count += flat.shape[0]

    @torch.no_grad()
    def _observe(self, x):
        if self.granularity != "tensor":
            return
        v = x.detach().abs().reshape(-1).float()
        if v.numel() > _SAMPLE_PER_BATCH:
            gen = torch.Generator(device=v.device).manual_seed(len(self._samples))
            v = v[torch.randint(0, v.numel(), (_SAMPLE_PER_BATCH,), device=v.device, generator=gen)]
        self._samples.append(v)

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Set the static scale from everything observed: percentile of |x| / qmax."""
        if self.granularity == "tensor" and self._samples:
            v = torch.cat(self._samples)
            if v.numel() > _QUANTILE_LIMIT:
                v = v[torch.linspace(0, v.numel() - 1, _QUANTILE_LIMIT, device=v.device).long()]
            amax = torch.quantile(v, self.percentile / 100.0) if self.percentile < 100 else v.max()
            if not torch.isfinite(amax) or amax <= 0:
                amax = v.max().clamp_min(1e-8)
            self.scale.fill_(float(amax) / self.qmax)
        self._samples = []

    def token_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token scales, shaped to broadcast against x."""
        return x.detach().abs().amax(self.feature_dim, keepdim=True).clamp_min(1e-8) / self.qmax

    def current_scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_scale(x) if self.granularity == "token" else self.scale.to(x.dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        # rounding in at least fp32: under bf16 autocast x / scale itself would be off by up to 0.5
        work = x if x.dtype == torch.float64 else x.float()
        scale = self.current_scale(work)
        return (torch.clamp(torch.round(work / scale), -self.qmax, self.qmax) * scale).to(x.dtype)


class OnlineRotation(nn.Module):
    """The run-time input transform of a quantized layer, x (..., n) ↦ x · diag(factor) · R.

    ``kind``: ``none`` (identity), ``hadamard`` (R = diag(signs) · H(n), by the fast transform; signs and
    the per-channel ``factor`` are fused into one multiply), or ``dense`` (R a stored (n, n) matrix, the
    KLT-enhanced rotation). The weight of the layer it feeds holds the inverse (see rotation.py).
    """

    def __init__(self, n: int, kind: str = "none"):
        super().__init__()
        if kind not in ("none", "hadamard", "dense"):
            raise ValueError(f"kind: expected none, hadamard or dense, got {kind!r}")
        self.n, self.kind = n, kind
        self.register_buffer("factor", torch.ones(n))  # signs (hadamard) × per-channel smoothing 1/s
        if kind == "dense":
            self.register_buffer("matrix", torch.eye(n))
        self.active = False  # False while statistics are gathered on the untransformed model

    def extra_repr(self) -> str:
        return f"n={self.n}, kind={self.kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or self.kind == "none":
            return x
        x = x * self.factor.to(x.dtype)
        if self.kind == "hadamard":
            return hadamard_transform(x)
        return x @ self.matrix.to(x.dtype)


class QuantLinear(nn.Module):
    """A Linear layer with its input rotated online and both input and weight quantized.

    Built from an ``nn.Linear`` (:meth:`from_float`); while ``weight`` is float the layer can still be
    transformed (rotations folded in). :meth:`freeze` quantizes the weight per output channel and keeps
    only int8 values and scales. ``forward(x, add_bias=True)``: x (..., in_features) → (..., out_features).

    ``int8``: ``auto`` uses ``torch._int_mm`` on CUDA; ``on`` wherever ``_int_mm`` runs (CPU too in
    this torch); ``off`` always fake-quantizes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: int = 8, a_bits: int = 8,
                 granularity: str = "tensor", percentile: float = 99.99, rotation: str = "none",
                 record_moment: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.w_bits = in_features, out_features, w_bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.rotation = OnlineRotation(in_features, rotation)
        self.input_quant = ActQuantizer(a_bits, granularity, percentile, -1, record_moment)
        self.int8 = "auto"

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        q.weight = linear.weight
        q.bias = linear.bias
        # the rotation is applied in the layer's precision (float64 keeps folding exact to ~1e-15)
        q.rotation.to(device=linear.weight.device, dtype=linear.weight.dtype)
        q.input_quant.to(device=linear.weight.device)
        return q

    @property
    def frozen(self) -> bool:
        return "weight_int8" in self._buffers

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"frozen={self.frozen}, int8={self.int8}")

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantize the (transformed) float weight and drop it: int8 values (out, in) + scales (out,)."""
        if self.frozen:
            return
        q, scale = quantize_weight(self.weight, self.w_bits)
        dtype, device = self.weight.dtype, self.weight.device
        del self.weight
        self.register_buffer("weight_int8", q.to(device))
        self.register_buffer("weight_scale", scale.to(device=device, dtype=torch.float64 if dtype == torch.float64
                                                      else torch.float32))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.frozen:
            return self.weight.to(dtype)
        return (self.weight_int8.to(self.weight_scale.dtype) * self.weight_scale[:, None]).to(dtype)

    def _use_int(self, x: torch.Tensor) -> bool:
        if self.int8 == "off" or not self.frozen or self.input_quant.mode != "quant":
            return False
        if self.int8 == "auto" and x.device.type != "cuda":
            return False
        return int_mm_available(x.device)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        x = self.rotation(x)
        bias = self.bias if add_bias else None
        if self._use_int(x):
            return self._int_forward(x, bias)
        x = self.input_quant(x)
        return F.linear(x, self.dequantized_weight(x.dtype), None if bias is None else bias.to(x.dtype))

    def _int_forward(self, x: torch.Tensor, bias) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        quant = self.input_quant
        scale = quant.token_scale(flat).float() if quant.granularity == "token" else quant.scale.float()
        xq = quantize_tensor(flat.float(), scale, quant.bits)
        out = int8_linear(xq, scale, self.weight_int8, self.weight_scale, bias, out_dtype=x.dtype)
        return out.reshape(*lead, self.out_features)
