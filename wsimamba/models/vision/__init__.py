"""Mamba vision backbones (Vim, LBVim, VMamba, Res-VMamba): a registry of names (timm style).

    from wsimamba.models.vision import create_backbone, list_backbones
    net = create_backbone("lbvim_tiny", num_classes=10)
    logits = net(images)                     # images (B, 3, H, W)
    pooled = net.forward_features(images)    # (B, net.num_features)
    maps = net.forward_pyramid(images)       # [(B, C_i, H_i, W_i), ...]

Registered: ``vim_tiny``, ``lbvim_tiny`` (:mod:`.vim`), ``vmamba_tiny``, ``resvmamba_small`` (:mod:`.vmamba`).
"""

from wsimamba.models.vision.registry import backbone_kwargs, create_backbone, list_backbones, register_backbone
from wsimamba.models.vision import vim, vmamba  # noqa: E402, F401  (importing registers the backbones)

__all__ = ["backbone_kwargs", "create_backbone", "list_backbones", "register_backbone"]
