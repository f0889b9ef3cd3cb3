"""Quantized twins of module types: the same parameters, with quantization points inserted.

A twin is the float module with its class swapped for a subclass that mixes in a :class:`QuantTwin`
(so the float class's own ``forward`` keeps running, and every parameter keeps its name and tensor),
its Linear layers replaced by :class:`~wsimamba.quant.quantizers.QuantLinear` and activation
quantizers added as child modules. Adding a module type is one registration::

    @register_quant_twin(SS2D)
    class QuantSS2DMixin(QuantTwin):
        norm_input = "in_proj"          # the Linear a preceding LayerNorm/RMSNorm may fold into
        def quant_prepare(self, spec): ...   # swap Linears for QuantLinear, add ActQuantizers
        def quant_transform(self, spec, seeds): ...   # fold rotations / smoothing (float64)
        def quant_freeze(self, spec): ...     # quantize weights that are not QuantLinear (convs)

The lookup follows the MRO, so the Mamba twin serves Mamba, LBMamba, BiMamba and SRMamba.

Mamba twin, quantization points (every Linear: W per output channel; inputs as the spec says):

    hidden ─▶ [R_in online] ─Q─▶ in_proj ─▶ x ─Q─▶ conv1d(W per channel) ─▶ SiLU ─▶ [H online] ─Q─▶ x_proj
    x_proj ─▶ dt ─Q─▶ dt_proj (R_dt folded offline into x_proj's dt rows and dt_proj's columns)
           ─▶ B ─Q─, C ─Q─ ─▶ selective scan (recurrence in float) ─▶ y·silu(z)
    y·silu(z) · (1/s) ─▶ [H online] ─Q─▶ out_proj (W · diag(s) · H)

naive: no transform. hadamard: random Hadamard rotations (norm folded into in_proj). mambaquant:
R_in, R_dt KLT-enhanced (K · H, K from the calibration second moments); conv input smoothed per
channel (s = channel amax: in_proj's x rows ÷ s, conv weights × s; both are quantized per output
channel, so this costs their weights nothing); out_proj smooth-fused (s from activation and weight
maxima with SmoothQuant's α, 1/s in the gate, s in the weight); optionally (``smooth_bc``, off by
default: it raised the error on planted-outlier models) B/C smoothed per state (B rows of x_proj × s_n,
C rows ÷ s_n: h is linear in B, so y = C·h is unchanged exactly).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from wsimamba.nn.mamba import Mamba, _reference_conv, _scan_layout
from wsimamba.ops import selective_scan
from wsimamba.quant.quantizers import ActQuantizer, QuantLinear
from wsimamba.quant.rotation import hadamard_transform, klt_rotation, random_signs
from wsimamba.quant.spec import QuantSpec

__all__ = ["QuantTwin", "is_twin", "register_quant_twin", "registered_types", "to_twin"]

_TWINS: dict[type, type] = {}
_MAX_SMOOTH = 4.0  # smoothing factors stay within [1/4, 4] × their geometric mean
_CLASSES: dict[tuple[type, type], type] = {}


class QuantTwin:
    """Mixin base of every twin. Subclasses set ``norm_input`` and implement the three hooks."""

    norm_input: str | None = None

    def quant_prepare(self, spec: QuantSpec) -> None:
        raise NotImplementedError

    def quant_transform(self, spec: QuantSpec, seeds: Iterator[int]) -> None:
        raise NotImplementedError

    def quant_freeze(self, spec: QuantSpec) -> None:
        pass


def register_quant_twin(float_type: type) -> Callable[[type], type]:
    """Class decorator: the mixin becomes the quantized twin of `float_type` (and its subclasses)."""

    def deco(mixin: type) -> type:
        if not issubclass(mixin, QuantTwin):
            raise TypeError(f"{mixin.__name__} must derive from QuantTwin")
        _TWINS[float_type] = mixin
        return mixin

    return deco


def registered_types() -> tuple[type, ...]:
    return tuple(_TWINS)


def is_twin(module: nn.Module) -> bool:
    return isinstance(module, QuantTwin)


def twin_mixin(module: nn.Module) -> type | None:
    """The registered mixin for the module's type (first match along the MRO), or None."""
    if is_twin(module):
        return None
    for cls in type(module).__mro__:
        if cls in _TWINS:
            return _TWINS[cls]
    return None


def to_twin(module: nn.Module, spec: QuantSpec) -> nn.Module:
    """Turn `module` (in place) into its quantized twin; returns it."""
    mixin = twin_mixin(module)
    if mixin is None:
        raise TypeError(f"no quantized twin is registered for {type(module).__name__}")
    base = type(module)
    key = (mixin, base)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Quant{base.__name__}", (mixin, base), {"__module__": __name__})
    module.__class__ = _CLASSES[key]
    module.quant_prepare(spec)
    return module


# --------------------------------------------------------------------------------------------------
# the Mamba family


def _fold(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _smooth(act_amax: torch.Tensor, w_amax: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """SmoothQuant factors s = amax_x^α / amax_w^(1−α) (float64), normalised to geometric mean 1."""
    a = act_amax.double().clamp_min(1e-6)
    s = a.pow(alpha)
    if w_amax is not None:
        s = s / w_amax.double().clamp_min(1e-6).pow(1 - alpha)
    s = s.clamp_min(1e-6)
    s = s / s.log().mean().exp()
    # a bounded range: factors fitted to a few calibration slides would otherwise amplify channels that
    # happened to be quiet there, and unseen tokens would clip (measured on planted-outlier models)
    return s.clamp(1 / _MAX_SMOOTH, _MAX_SMOOTH)


def _state_smoothing(amax_b: torch.Tensor, amax_c: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-state factors for B (× s) and C (÷ s), or ones when smoothing would not help.

    Both B and C get one scale per tensor, so state n loses roughly max_m(range_m) / range_n of its
    resolution in each. The SmoothQuant choice balances B and C per state but can widen the spread
    across states; it is kept only when that proxy error is lower than without smoothing.
    """
    def proxy(s):
        b, c = amax_b.double() * s, amax_c.double() / s
        return float((b.max() / b.clamp_min(1e-12)).sum() + (c.max() / c.clamp_min(1e-12)).sum())

    s = _smooth(amax_c, amax_b, alpha)
    ones = torch.ones_like(s)
    return s if proxy(s) < proxy(ones) else ones


@register_quant_twin(Mamba)
class QuantMambaMixin(QuantTwin):
    """Quantized twin of :class:`wsimamba.nn.Mamba` and its variants (module docstring)."""

    norm_input = "in_proj"

    def _suffixes(self) -> list[str]:
        return ["", "_b"] if hasattr(self, "conv1d_b") else [""]

    def quant_prepare(self, spec: QuantSpec) -> None:
        method = spec.method
        online = "none" if method == "naive" else "hadamard"
        kw = dict(w_bits=spec.w_bits, a_bits=spec.a_bits, granularity=spec.granularity, percentile=spec.percentile)
        klt = method == "mambaquant"
        self.in_proj = QuantLinear.from_float(self.in_proj, rotation="dense" if klt else online,
                                              record_moment=klt, **kw)
        self.out_proj = QuantLinear.from_float(self.out_proj, rotation=online, **kw)
        act = dict(bits=spec.a_bits, granularity=spec.granularity, percentile=spec.percentile)
        for sfx in self._suffixes():
            setattr(self, "x_proj" + sfx, QuantLinear.from_float(getattr(self, "x_proj" + sfx), rotation=online, **kw))
            setattr(self, "dt_proj" + sfx, QuantLinear.from_float(getattr(self, "dt_proj" + sfx), rotation="none",
                                                                  record_moment=klt, **kw))
            setattr(self, "conv_quant" + sfx, ActQuantizer(feature_dim=1, **act))  # x (batch, d_inner, length)
            setattr(self, "B_quant" + sfx, ActQuantizer(feature_dim=-1, **act))  # (batch, length, d_state)
            setattr(self, "C_quant" + sfx, ActQuantizer(feature_dim=-1, **act))
        device = self.out_proj.weight.device
        for sfx in self._suffixes():
            for name in ("conv_quant", "B_quant", "C_quant"):
                getattr(self, name + sfx).to(device)
        self.register_buffer("gate_scale", torch.ones(self.d_inner, dtype=self.out_proj.weight.dtype, device=device))

    # ---- forward: the float class's forward calls _in, _ssm, _out; _in is unchanged (in_proj quantizes)

    def _fast(self, t: torch.Tensor) -> bool:
        # the fast layers call the weights directly, past the quantized modules: the twin runs the reference layout
        return False

    def _ssm(self, x, z, conv1d, x_proj, dt_proj, A_log, D, direction, window, pad=None):
        sfx = "" if conv1d is self.conv1d else "_b"
        x = getattr(self, "conv_quant" + sfx)(x)
        x = _reference_conv(conv1d, x, pad)
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt_proj(dt, add_bias=False).transpose(1, 2)
        if pad is not None:
            dt = pad.mask_delta(dt)
        B = getattr(self, "B_quant" + sfx)(B)
        C = getattr(self, "C_quant" + sfx)(C)
        return selective_scan(
            x, dt, -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D.float(), z,
            delta_bias=dt_proj.bias.float(), delta_softplus=True, direction=direction, backend=self.backend,
            **_scan_layout(direction, window, pad),
        )

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        # the smooth-fused rotation's scaled SiLU: y · silu(z) / s (the scan fuses y · silu(z))
        y = y * self.gate_scale.to(y.dtype)[:, None]
        return self.out_proj(y.transpose(1, 2))

    # ---- offline transforms (float64), from the statistics gathered in "stats" mode

    @torch.no_grad()
    def quant_transform(self, spec: QuantSpec, seeds: Iterator[int]) -> None:
        method = spec.method
        if method == "naive":
            return
        klt = method == "mambaquant"
        d = self.d_inner

        # in_proj: its input rotated online by R_in; the weight takes R_in (W ← W R)
        w_in = self.in_proj.weight.double()
        signs = random_signs(self.d_model, next(seeds)).to(w_in.device)
        if klt:
            rot = klt_rotation(_need(self.in_proj.input_quant.moment, "in_proj input"), signs).to(w_in.device)
            self.in_proj.rotation.matrix.copy_(rot.to(self.in_proj.rotation.matrix.dtype))
            w_in = w_in @ rot
        else:
            self.in_proj.rotation.factor.copy_(signs.to(self.in_proj.rotation.factor.dtype))
            w_in = hadamard_transform(w_in * signs[None, :])
        b_in = self.in_proj.bias.double() if self.in_proj.bias is not None else None

        if klt:
            # conv input smoothing: x_c / s_c into in_proj's x rows, s_c into every branch's depthwise conv
            amax = torch.stack([_need(getattr(self, "conv_quant" + sfx).channel_amax, "conv input")
                                for sfx in self._suffixes()]).amax(0)
            s = _smooth(amax, None, spec.alpha).to(w_in.device)
            w_in[:d] /= s[:, None]
            if b_in is not None:
                b_in[:d] /= s
            for sfx in self._suffixes():
                conv = getattr(self, "conv1d" + sfx)
                _fold(conv.weight, conv.weight.double() * s[:, None, None])
        _fold(self.in_proj.weight, w_in)
        if b_in is not None:
            _fold(self.in_proj.bias, b_in)

        r, n = self.dt_rank, self.d_state
        for sfx in self._suffixes():
            x_proj, dt_proj = getattr(self, "x_proj" + sfx), getattr(self, "dt_proj" + sfx)
            w_x = x_proj.weight.double()
            # dt: rotated offline, dt' = dt R (x_proj's dt rows ← Rᵀ W_dt, dt_proj ← W R)
            dt_signs = random_signs(r, next(seeds)).to(w_x.device)
            if klt:
                rot = klt_rotation(_need(dt_proj.input_quant.moment, "dt_proj input"), dt_signs).to(w_x.device)
            else:
                rot = hadamard_transform(torch.diag(dt_signs))  # diag(signs) · H
            w_x[:r] = rot.t() @ w_x[:r]
            _fold(dt_proj.weight, dt_proj.weight.double() @ rot)
            if klt and spec.smooth_bc:
                # B/C: per-state smoothing, exact because h is linear in B
                amax_b = _need(getattr(self, "B_quant" + sfx).channel_amax, "B")
                amax_c = _need(getattr(self, "C_quant" + sfx).channel_amax, "C")
                s = _state_smoothing(amax_b, amax_c, spec.alpha).to(w_x.device)
                w_x[r:r + n] *= s[:, None]
                w_x[r + n:] /= s[:, None]
            # x_proj's input is SiLU(conv(x)): rotated online
            x_signs = random_signs(d, next(seeds)).to(w_x.device)
            x_proj.rotation.factor.copy_(x_signs.to(x_proj.rotation.factor.dtype))
            _fold(x_proj.weight, hadamard_transform(w_x * x_signs[None, :]))

        # out_proj: smooth-fused rotation
        w_out = self.out_proj.weight.double()
        if klt:
            s = _smooth(_need(self.out_proj.input_quant.channel_amax, "out_proj input"), w_out.abs().amax(0),
                        spec.alpha).to(w_out.device)
            self.gate_scale.copy_((1.0 / s).to(self.gate_scale.dtype))
            w_out = w_out * s[None, :]
        out_signs = random_signs(d, next(seeds)).to(w_out.device)
        self.out_proj.rotation.factor.copy_(out_signs.to(self.out_proj.rotation.factor.dtype))
        _fold(self.out_proj.weight, hadamard_transform(w_out * out_signs[None, :]))

    @torch.no_grad()
    def quant_freeze(self, spec: QuantSpec) -> None:
        from wsimamba.quant.quantizers import fake_quant_weight

        for sfx in self._suffixes():
            conv = getattr(self, "conv1d" + sfx)
            conv.weight.data.copy_(fake_quant_weight(conv.weight, spec.w_bits))


def _need(stat: torch.Tensor | None, what: str) -> torch.Tensor:
    if stat is None:
        from wsimamba.errors import QuantError

        raise QuantError(f"no calibration statistics reached the {what}: give calibration batches that run the model")
    return stat
