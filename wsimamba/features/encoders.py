"""Patch encoders: a registry of names mapping to constructors (timm style).

`create_encoder(name, weights=PATH)` or `create_encoder(name, random_init=True)` builds one; nothing is
ever downloaded. Built-in names:

- `resnet50-trunc`: torchvision ResNet-50 up to layer3 plus global average pooling, 1024-d (CLAM's
  standard); weights are a torchvision ResNet-50 state dict (layer4 / fc keys are ignored).
- `uni`: timm ViT-L/16 with UNI's settings (224 px, LayerScale 1e-5, no head), 1024-d.
- `timm:<name>`: any timm architecture, built without its classifier head; weights are a timm state
  dict for that architecture.
- `vim_tiny`, `lbvim_tiny`, `vmamba_tiny`, `resvmamba_small`: the Mamba vision backbones of
  `wsimamba.models.vision` without their head (pooled features, 224 px, ImageNet mean/std); weights are
  a state dict of that backbone (a `head.*` in it is ignored).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from wsimamba.errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Encoder:
    """An encoder ready to embed patches.

    model: maps float (B, 3, H, W), normalised, to (B, dim).
    input_size: the side patches are resized to before the model, or None to keep the patch size.
    mean, std: per-channel normalisation applied to [0, 1] pixels.
    weights_sha256: SHA-256 of the weight file, or "random-init".
    """

    name: str
    model: nn.Module
    dim: int
    input_size: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_sha256: str = "random-init"
    weights_path: str = ""
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, Callable[..., tuple[nn.Module, int, int | None, tuple, tuple]]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_encoder(name: str, description: str):
    """Decorator: register a constructor returning (module, dim, input_size, mean, std)."""

    def deco(fn):
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return deco


def list_encoders() -> dict[str, str]:
    """Registered encoder names with a one-line description; `timm:<name>` is accepted too."""
    out = dict(_DESCRIPTIONS)
    out["timm:<name>"] = "any timm architecture without its head, e.g. timm:vit_small_patch16_224"
    return out


class ResNet50Trunc(nn.Module):
    """ResNet-50 through layer3, global average pooled: (B, 3, H, W) → (B, 1024)."""

    def __init__(self):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.pool(x).flatten(1)


@register_encoder("resnet50-trunc", "torchvision ResNet-50 to layer3 + average pool, 1024-d (CLAM standard)")
def _resnet50_trunc():
    # CLAM feeds the patch at its own size (no resize) with ImageNet normalisation
    return ResNet50Trunc(), 1024, None, IMAGENET_MEAN, IMAGENET_STD


def _timm_model(arch: str, **kwargs):
    import timm

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError("Unknown model ...")
        raise EncoderError(f"timm has no model {arch!r} ({e})") from e
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    input_size = cfg.get("input_size", (3, 224, 224))[-1]
    if kwargs.get("dynamic_img_size"):
        input_size = kwargs.get("img_size", input_size)
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return model, int(model.num_features), int(input_size), mean, std


@register_encoder("uni", "timm ViT-L/16 with UNI's settings (224 px, LayerScale 1e-5), 1024-d")
def _uni():
    model, dim, _, _, _ = _timm_model(
        "vit_large_patch16_224", img_size=224, init_values=1e-5, dynamic_img_size=True
    )
    return model, dim, 224, IMAGENET_MEAN, IMAGENET_STD


def _vision_backbone(name: str):
    def build():
        from wsimamba.models.vision import create_backbone  # imported on use: features need not load models

        model = create_backbone(name, num_classes=0)
        return model, model.num_features, 224, IMAGENET_MEAN, IMAGENET_STD

    return build


# the Mamba vision backbones of wsimamba.models.vision, pooled features at 224 px
for _name, _description in (
    ("vim_tiny", "Vim-Ti (BiMamba v2, middle class token), 192-d"),
    ("lbvim_tiny", "LBVim-Ti (locally bidirectional Mamba, flipped per layer, mean pool), 192-d"),
    ("vmamba_tiny", "VMamba-T (SS2D four-way scan), 768-d"),
    ("resvmamba_small", "Res-VMamba on VMamba-S, 768-d"),
):
    register_encoder(_name, _description)(_vision_backbone(_name))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderError(f"{path}: cannot read the weight file ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"{path}: not a state dict of tensors")
    # DDP / torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _apply_weights(name: str, model: nn.Module, path: Path) -> None:
    sd = _load_state_dict(path)
    own = model.state_dict()
    # heads the encoder does not use (classifier, ResNet layer4) are allowed in the file
    ignored = ("fc.", "head.", "layer4.", "classifier.")
    unexpected = [k for k in sd if k not in own and not k.startswith(ignored)]
    missing = [k for k in own if k not in sd]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise EncoderError(f"{path}: not weights for encoder {name!r}: {'; '.join(parts)}")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise EncoderError(
            f"{path}: weight {k!r} has shape {tuple(sd[k].shape)}, encoder {name!r} expects {tuple(own[k].shape)}"
        )
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


def create_encoder(
    name: str,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Encoder:
    """Build a registered encoder (or `timm:<arch>`) in eval mode, on the CPU or on `device`.

    Exactly one of `weights` (a local state-dict file) and `random_init=True` must be given; the
    returned Encoder records which (`weights_sha256` is the file's hash or "random-init").

    `device` (a CUDA device): the model is built there, its parameters initialised there. A module's
    default initialisation draws its random numbers one after another on the CPU: building a ViT-L
    took 2.7 s on an H200 host (6.5 s on the 2-core CI machine), all of it thrown away when weights
    are loaded. Random-init weights are then drawn by that device's generator: reproducible for a
    seed and a device type, but not the same numbers as a CPU build.
    """
    check_encoder(name, weights, random_init)
    if name.startswith("timm:"):
        arch = name[len("timm:") :]
        build = lambda: _timm_model(arch)  # noqa: E731
    else:
        build = _REGISTRY[name]
    # random init must be reproducible: the features file says "random-init", and two runs agree
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else [], device_type="cuda"), dev:
        torch.manual_seed(seed)
        model, dim, input_size, mean, std = build()
    sha = "random-init"
    wpath = ""
    if weights is not None:
        p = Path(weights)
        _apply_weights(name, model, p)
        sha = _file_sha256(p)
        wpath = str(p)
    model.eval()
    return Encoder(
        name=name, model=model, dim=dim, input_size=input_size, mean=tuple(mean), std=tuple(std),
        weights_sha256=sha, weights_path=wpath,
    )


def check_encoder(name: str, weights: str | Path | None = None, random_init: bool = False) -> None:
    """Raise `EncoderError` for what `create_encoder` would refuse without building anything: no
    weights and no --random-init (or both), an unknown name, a missing weight file. Milliseconds, so an
    extraction checks this before it starts any work; a file that does not fit the model is only found
    by `create_encoder`."""
    if weights is None and not random_init:
        raise EncoderError(
            f"encoder {name!r} needs weights: pass --weights PATH (a local state dict), "
            "or --random-init to use random weights on purpose"
        )
    if weights is not None and random_init:
        raise EncoderError("give either --weights or --random-init, not both")
    if name.startswith("timm:"):
        if not name[len("timm:") :]:
            raise EncoderError("encoder 'timm:' needs an architecture name, e.g. timm:vit_small_patch16_224")
    elif name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) + ", timm:<name>"
        raise EncoderError(f"unknown encoder {name!r}; known: {known}")
    if weights is not None and not Path(weights).is_file():
        raise EncoderError(f"{Path(weights)}: no such weight file")
