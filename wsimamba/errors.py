"""The project's error types. Library code raises these; only `wsimamba.cli` prints them."""


class WsimambaError(Exception):
    """Base class: a problem the user can act on. Its message is one line naming the file, key or value."""


class ConfigError(WsimambaError):
    """A configuration key or value is unknown or invalid."""


class SlideError(WsimambaError):
    """A slide cannot be opened, lacks its resolution, or has no tissue."""


class EncoderError(WsimambaError):
    """An encoder name, weight file or state dict is wrong."""


class FeatureStoreError(WsimambaError):
    """A feature file is missing, incomplete or malformed."""


class QuantError(WsimambaError):
    """A quantization method, setting, model or quantized checkpoint is unusable."""
