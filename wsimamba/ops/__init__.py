"""Functional ops (no nn.Module): the selective scan, the causal depthwise conv1d and MambaMIL's sequence reordering
(references + backend dispatch)."""

from wsimamba.ops.conv1d import (
    CONV_BACKENDS,
    ConvArgumentError,
    ConvBackendError,
    causal_conv1d,
    causal_conv1d_reference,
)
from wsimamba.ops.reorder import (
    REORDER_BACKENDS,
    ReorderArgumentError,
    ReorderBackendError,
    ReorderBags,
    restore_add_gate,
    restore_add_gate_reference,
    stride_reorder,
    stride_restore,
)
from wsimamba.ops.selective_scan import (
    DIRECTIONS,
    ScanArgumentError,
    ScanBackendError,
    default_window,
    list_backends,
    register_backend,
    selective_scan,
    selective_scan_naive,
    selective_scan_reference,
)

__all__ = [
    "CONV_BACKENDS",
    "ConvArgumentError",
    "ConvBackendError",
    "causal_conv1d",
    "causal_conv1d_reference",
    "REORDER_BACKENDS",
    "ReorderArgumentError",
    "ReorderBackendError",
    "ReorderBags",
    "restore_add_gate",
    "restore_add_gate_reference",
    "stride_reorder",
    "stride_restore",
    "DIRECTIONS",
    "ScanArgumentError",
    "ScanBackendError",
    "default_window",
    "list_backends",
    "register_backend",
    "selective_scan",
    "selective_scan_naive",
    "selective_scan_reference",
]
