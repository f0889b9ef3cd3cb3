"""Building blocks (nn.Module): the Mamba block and its variants."""

from wsimamba.nn.mamba import AlternatingFlip, BiMamba, LBMamba, Mamba, SRMamba, stride_reorder, stride_restore
from wsimamba.nn.padding import PackedBags, PaddedBags

__all__ = ["AlternatingFlip", "BiMamba", "LBMamba", "Mamba", "PackedBags", "PaddedBags", "SRMamba", "stride_reorder", "stride_restore"]
