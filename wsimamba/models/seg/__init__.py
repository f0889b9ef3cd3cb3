"""Mamba segmentation networks (LightM-UNet, MSVM-UNet, VM-UNet with the multi-head scan): a registry.

    from wsimamba.models.seg import create_segmenter, list_segmenters
    net = create_segmenter("lightm_unet", in_channels=3, num_classes=2)
    logits = net(images)                     # images (B, 3, H, W) → (B, 2, H, W)

Registered: ``lightm_unet`` (2D and 3D, :mod:`.lightm_unet`), ``msvm_unet`` (:mod:`.msvm_unet`),
``mhs_vmunet`` (:mod:`.mhs_vmunet`).
"""

from wsimamba.models.seg.registry import create_segmenter, list_segmenters, register_segmenter, segmenter_kwargs
from wsimamba.models.seg import lightm_unet, mhs_vmunet, msvm_unet  # noqa: E402, F401  (importing registers them)

__all__ = ["create_segmenter", "list_segmenters", "register_segmenter", "segmenter_kwargs"]
