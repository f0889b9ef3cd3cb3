"""MambaQuant: W8A8 post-training quantization of Mamba models by module type.

    from wsimamba.quant import quantize_model
    q = quantize_model(model, calib_batches, method="mambaquant")   # or "naive", "hadamard"

Pieces: ``rotation`` (Hadamard matrices of any size, fast transform, KLT-enhanced rotation),
``quantizers`` (per-channel weights, per-tensor/per-token activations, QuantLinear with an int8 path),
``twins`` (quantized twins of module types; one registration per type), ``model`` (the whole-model
steps), ``run`` (``wsimamba quantize``: a run folder's folds, calibrated and evaluated).
"""

from wsimamba.quant.model import fold_norms, load_quantized_state, quantize_model, set_mode, transform_model
from wsimamba.quant.quantizers import ActQuantizer, OnlineRotation, QuantLinear, fake_quant_weight, quantize_weight
from wsimamba.quant.rotation import hadamard_matrix, hadamard_transform, klt_rotation, random_signs
from wsimamba.quant.spec import METHODS, QuantSpec
from wsimamba.quant.twins import QuantTwin, register_quant_twin

__all__ = [
    "METHODS",
    "ActQuantizer",
    "OnlineRotation",
    "QuantLinear",
    "QuantSpec",
    "QuantTwin",
    "fake_quant_weight",
    "fold_norms",
    "hadamard_matrix",
    "hadamard_transform",
    "klt_rotation",
    "load_quantized_state",
    "quantize_model",
    "quantize_weight",
    "random_signs",
    "register_quant_twin",
    "set_mode",
    "transform_model",
]
