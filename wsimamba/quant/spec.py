"""What a quantization run is asked for: the method and its settings, checked in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wsimamba.errors import QuantError

METHODS = ("naive", "hadamard", "mambaquant")
GRANULARITIES = ("tensor", "token")


@dataclass(frozen=True)
class QuantSpec:
    """method: naive (quantize as is), hadamard (QuaRot-style random Hadamard rotations, norms folded),
    mambaquant (KLT-enhanced rotations, smooth-fused rotation of out_proj, smoothing of the conv input;
    with smooth_bc also of the scan's B/C products).

    w_bits: 8 or 4 (weights, symmetric per output channel). a_bits: 8 (activations).
    granularity: activations per ``tensor`` (static scale, percentile observer) or per ``token`` (dynamic).
    percentile: of |x| over the calibration data, for static scales. alpha: SmoothQuant's migration
    strength (s = amax_x^α / amax_w^(1−α)). smooth_bc: mambaquant also smooths the scan's B/C per
    state (exact; off by default, see twins.py). seed: random Hadamard signs. int8: ``auto`` (torch._int_mm
    on CUDA), ``on`` (wherever it runs), ``off`` (fake quantization everywhere).
    """

    method: str = "mambaquant"
    w_bits: int = 8
    a_bits: int = 8
    granularity: str = "tensor"
    percentile: float = 99.99
    alpha: float = 0.5
    seed: int = 0
    int8: str = "auto"
    smooth_bc: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.w_bits not in (4, 8):
            raise QuantError(f"w_bits: expected 8 or 4, got {self.w_bits!r}")
        if self.a_bits not in (8,):
            raise QuantError(f"a_bits: only 8-bit activations are supported, got {self.a_bits!r}")
        if self.granularity not in GRANULARITIES:
            raise QuantError(f"granularity: expected tensor or token, got {self.granularity!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise QuantError(f"percentile: expected a value in (50, 100], got {self.percentile!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise QuantError(f"alpha: expected a value in [0, 1], got {self.alpha!r}")
        if self.int8 not in ("auto", "on", "off"):
            raise QuantError(f"int8: expected auto, on or off, got {self.int8!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise QuantError(f"quantization settings: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**data)
