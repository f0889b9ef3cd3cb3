"""Functional ops (no nn.Module): the selective scan (reference + backend dispatch)."""

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
