"""wsimamba: whole-slide images to slide-level predictions with Mamba aggregators."""

__version__ = "0.1.0"

from wsimamba.errors import WsimambaError  # noqa: E402

__all__ = ["WsimambaError", "__version__"]
