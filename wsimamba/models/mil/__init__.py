"""Slide-level MIL aggregators: a registry of names (timm style).

    from wsimamba.models.mil import create_model, list_models
    model = create_model("abmil", in_dim=1024, n_classes=2)
    out = model(features)            # features (B, N, in_dim)
    out.logits                       # (B, n_classes)
    out.attention                    # (B, N) per-patch scores, for heatmaps

Names: meanpool, maxpool, abmil, transmil, mambamil, bimambamil, lbmambamil.
"""

# imported in the order list_models() shows them; importing registers them
from wsimamba.models.mil import pooling as _pooling  # noqa: F401, I001
from wsimamba.models.mil import abmil as _abmil  # noqa: F401
from wsimamba.models.mil import transmil as _transmil  # noqa: F401
from wsimamba.models.mil import mambamil as _mambamil  # noqa: F401
from wsimamba.models.mil.base import AttentionPool, MILModel, MILOutput
from wsimamba.models.mil.registry import create_model, list_models, model_kwargs, register_model

__all__ = ["AttentionPool", "MILModel", "MILOutput", "create_model", "list_models", "model_kwargs", "register_model"]
