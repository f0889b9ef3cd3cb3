"""Whole-model quantization by module type: :func:`quantize_model`, :func:`transform_model`, and the
saving / loading of quantized models.

Steps (on a deep copy; the input model is untouched):

1. rotation methods: fold every norm that feeds a registered mixer (a parent with ``.norm`` and
   ``.mixer``, the mamba-ssm ``Block`` convention that PreNormResidual follows) into the mixer's input
   Linear: LayerNorm γ, β (RMSNorm γ) go into W diag(γ) and b + W β; the norm keeps no affine.
2. every registered module type becomes its quantized twin (``wsimamba.quant.twins``); every other
   ``nn.Linear`` becomes a plain W8A8 :class:`QuantLinear` (no rotation).
3. mambaquant: one float pass over the calibration batches gathers second moments and channel maxima.
4. the twins fold their rotations and smoothing factors into the weights (float64); the float model's
   function is unchanged (:func:`transform_model` stops here).
5. weights are quantized; a second pass calibrates the static activation scales (percentile observer);
   the quantizers are switched on.
"""

from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch
from torch import nn

from wsimamba.errors import QuantError
from wsimamba.quant.quantizers import ActQuantizer, OnlineRotation, QuantLinear
from wsimamba.quant.spec import QuantSpec
from wsimamba.quant.twins import QuantTwin, is_twin, to_twin, twin_mixin

__all__ = ["build_structure", "fold_norms", "load_quantized_state", "quantize_model", "set_mode",
           "transform_model"]


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return getattr(module, "weight", None) is not None
    name = type(module).__name__
    return name.endswith(("LayerNorm", "RMSNorm")) and isinstance(getattr(module, "weight", None), torch.Tensor)


@torch.no_grad()
def fold_norms(model: nn.Module) -> int:
    """Fold norm affines into the input Linear of the registered mixer they feed; returns how many."""
    folded = 0
    for parent in model.modules():
        norm, mixer = getattr(parent, "norm", None), getattr(parent, "mixer", None)
        if norm is None or mixer is None or not _is_norm(norm):
            continue
        mixin = twin_mixin(mixer) or (type(mixer) if is_twin(mixer) else None)
        target = getattr(mixin, "norm_input", None) if mixin is not None else None
        linear = getattr(mixer, target, None) if target else None
        if not isinstance(linear, (nn.Linear, QuantLinear)) or linear.weight.shape[1] != norm.weight.shape[0]:
            continue
        w = linear.weight.double()
        gamma = norm.weight.double()
        beta = norm.bias.double() if getattr(norm, "bias", None) is not None else None
        if beta is not None:
            shift = w @ beta
            if linear.bias is None:
                linear.bias = nn.Parameter(shift.to(linear.weight.dtype))
            else:
                linear.bias.data.copy_((linear.bias.double() + shift).to(linear.bias.dtype))
            norm.bias.data.zero_()
        linear.weight.data.copy_((w * gamma[None, :]).to(linear.weight.dtype))
        norm.weight.data.fill_(1.0)
        folded += 1
    return folded


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_structure(model: nn.Module, spec: QuantSpec) -> list[QuantTwin]:
    """Steps 1–2 in place: fold norms (rotation methods), make twins, wrap the other Linears."""
    if spec.method != "naive":
        fold_norms(model)
    twins = []
    for name, module in list(model.named_modules()):
        if twin_mixin(module) is not None and not name.startswith(tuple(t + "." for t, _ in twins)):
            twins.append((name, to_twin(module, spec)))
    inside = tuple(t_name + "." for t_name, _ in twins)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not name.startswith(inside):
            _replace(model, name, QuantLinear.from_float(
                module, w_bits=spec.w_bits, a_bits=spec.a_bits, granularity=spec.granularity,
                percentile=spec.percentile))
    return [t for _, t in twins]


def set_mode(model: nn.Module, mode: str) -> None:
    """Every activation quantizer to `mode` (off, stats, observe, quant)."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.mode = mode


def _set_rotations(model: nn.Module, active: bool) -> None:
    for m in model.modules():
        if isinstance(m, OnlineRotation):
            m.active = active


def _device(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _run(model: nn.Module, batches: list) -> None:
    device = _device(model)
    for batch in batches:
        batch = _to(batch, device)
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (list, tuple)):
            model(*batch)
        else:
            model(batch)


def _spec(method, w_bits, a_bits, kwargs) -> QuantSpec:
    try:
        return QuantSpec(method=method, w_bits=w_bits, a_bits=a_bits, **kwargs)
    except TypeError as e:
        raise QuantError(f"quantize_model: {e}") from None


def transform_model(model: nn.Module, calib_batches: Iterable, method: str = "mambaquant", **kwargs) -> nn.Module:
    """A deep copy of `model` with norms folded, twins in place and every rotation / smoothing folded
    in, quantizers off: the same function as `model` in float (up to rounding). ``kwargs`` as QuantSpec."""
    spec = _spec(method, kwargs.pop("w_bits", 8), kwargs.pop("a_bits", 8), kwargs)
    return _transform(model, list(calib_batches), spec)


def _transform(model: nn.Module, batches: list, spec: QuantSpec) -> nn.Module:
    q = copy.deepcopy(model).eval()
    twins = build_structure(q, spec)
    if not twins and not any(isinstance(m, QuantLinear) for m in q.modules()):
        raise QuantError(f"{type(model).__name__}: nothing to quantize (no Mamba block or Linear layer)")
    if spec.method == "mambaquant":
        if not batches:
            raise QuantError("calib_batches: mambaquant needs at least one calibration batch")
        set_mode(q, "stats")
        _run(q, batches)
    seeds = itertools.count(spec.seed * 1000003 + 1)
    for twin in twins:
        twin.quant_transform(spec, seeds)
    for m in q.modules():  # statistics are not needed past this point
        if isinstance(m, ActQuantizer):
            m._reset_stats()
    set_mode(q, "off")
    _set_rotations(q, True)
    q._wsimamba_quant = spec
    return q


def _freeze(q: nn.Module, spec: QuantSpec) -> None:
    for m in q.modules():
        if isinstance(m, QuantLinear):
            m.freeze()
            m.int8 = spec.int8
        if is_twin(m):
            m.quant_freeze(spec)


def quantize_model(model: nn.Module, calib_batches: Iterable, method: str = "mambaquant", w_bits: int = 8,
                   a_bits: int = 8, **kwargs) -> nn.Module:
    """W{w_bits}A{a_bits} post-training quantization of every Mamba-based model of the project.

    Args:
        model: any nn.Module; registered mixers (Mamba, LBMamba, BiMamba, SRMamba, …) get their quantized
            twins, other nn.Linear layers plain W8A8. Not modified.
        calib_batches: inputs to calibrate on; each item is passed as ``model(item)`` (a tensor),
            ``model(*item)`` (a tuple/list) or ``model(**item)`` (a dict); moved to the model's device.
        method: "naive", "hadamard" or "mambaquant".
        w_bits, a_bits: 8 (or w_bits 4).
        kwargs: granularity ("tensor" | "token"), percentile, alpha, seed, int8 ("auto" | "on" | "off").

    Returns a deep copy with the same forward signature, in eval mode. Its quantization settings are in
    ``model._wsimamba_quant`` (a QuantSpec); :func:`load_quantized_state` rebuilds it from a state dict.
    """
    spec = _spec(method, w_bits, a_bits, kwargs)
    batches = list(calib_batches)
    if spec.granularity == "tensor" and not batches:
        raise QuantError("calib_batches: static (per-tensor) activation scales need at least one calibration batch")
    q = _transform(model, batches, spec)
    _freeze(q, spec)
    if spec.granularity == "tensor":
        set_mode(q, "observe")
        _run(q, batches)
        for m in q.modules():
            if isinstance(m, ActQuantizer):
                m.finish_observing()
    set_mode(q, "quant")
    return q


def load_quantized_state(model: nn.Module, spec: QuantSpec | dict, state_dict: dict) -> nn.Module:
    """Rebuild a quantized model from a float model of the same architecture (its weights are replaced),
    the spec it was quantized with, and the quantized model's state dict. Returns a deep copy."""
    spec = QuantSpec.from_dict(spec) if isinstance(spec, dict) else spec
    q = copy.deepcopy(model).eval()
    build_structure(q, spec)
    _freeze(q, spec)
    try:
        q.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise QuantError(f"quantized state does not fit the model ({' '.join(first[:2])[:300]})") from None
    _set_rotations(q, True)
    set_mode(q, "quant")
    q._wsimamba_quant = spec
    return q
