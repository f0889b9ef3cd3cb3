"""TransMIL (Shao et al., NeurIPS 2021): two Nyström-attention layers around a PPEG position encoder.

The Nyström approximation (Xiong et al., AAAI 2021) replaces softmax(QKᵀ)V, O(n²), by
softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V with m landmarks Q̃, K̃ (means of m contiguous
segments), O(n·m). :func:`softmax_attention` is the exact reference it stands beside; with m = n
landmarks and an exact pseudo-inverse the two agree (tests check this).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.mil.base import MILModel, MILOutput
from wsimamba.models.mil.registry import register_model


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention. q, k, v (B, h, n, dh), q already scaled → (out (B, h, n, dh), probs (B, h, n, n))."""
    p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    return p @ v, p


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of m contiguous segments of near-equal length (sizes differ by at most one), no padding.

    x (B, h, n, d) → (B, h, m, d); needs 1 ≤ m ≤ n.
    """
    n = x.shape[-2]
    seg = torch.arange(n, device=x.device) * m // n  # token i belongs to segment floor(i·m/n)
    sums = x.new_zeros(*x.shape[:-2], m, x.shape[-1]).index_add(-2, seg, x)
    counts = torch.bincount(seg, minlength=m).to(x.dtype)
    return sums / counts[:, None]


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a (..., m, m) by the third-order Newton-Schulz-type iteration
    of Razavi et al. 2014, started at aᵀ / (‖a‖₁ ‖a‖∞), which converges for any nonzero a.

    ``iters = 0`` uses ``torch.linalg.pinv`` (SVD) instead: exact, slower on GPU.
    """
    if iters == 0:
        return torch.linalg.pinv(a)
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    norm1 = a.abs().sum(-2).amax(-1)  # max column sum
    norm_inf = a.abs().sum(-1).amax(-1)  # max row sum
    z = a.transpose(-1, -2) / (norm1 * norm_inf)[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: int, pinv_iters: int = 6,
                      query_rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nyström attention. q, k, v (B, h, n, dh), q already scaled; 1 ≤ landmarks ≤ n.

    Returns out (B, h, n, dh) and, when `query_rows` is given, the approximate attention
    probabilities of those query rows (B, h, rows, n) (TransMIL's class token is row 0).
    """
    ql, kl = segment_means(q, landmarks), segment_means(k, landmarks)
    k1 = torch.softmax(q @ kl.transpose(-1, -2), dim=-1)  # (n, m)
    k2 = torch.softmax(ql @ kl.transpose(-1, -2), dim=-1)  # (m, m)
    k3 = torch.softmax(ql @ k.transpose(-1, -2), dim=-1)  # (m, n)
    k1p = k1 @ iterative_pinv(k2, pinv_iters)
    out = k1p @ (k3 @ v)
    rows = k1p[..., query_rows, :] @ k3 if query_rows is not None else None
    return out, rows


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with a depthwise residual convolution over values.

    forward(x (B, n, dim)) → (out (B, n, dim), cls_attn (B, n): head-averaged attention of token 0).
    Sequences no longer than `landmarks` use exact softmax attention (the approximation would not
    save anything). Attention is computed in fp32 whatever the autocast dtype: the pseudo-inverse
    iteration diverges in bf16.

    The residual convolution runs over the sequence tokens only, skipping the first `skip_conv`
    (class) tokens: otherwise the class token's output would copy the values of whichever patches
    happen to sit next to it in the sequence, a path that lets the model memorise bags (on planted-
    witness bags it cost TransMIL ~0.3 AUC in our tests).
    """

    def __init__(self, dim: int, heads: int = 8, landmarks: int = 256, pinv_iters: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.1, skip_conv: int = 0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.d_model {dim} is not divisible by model.heads {heads}")
        self.heads, self.dh, self.landmarks, self.pinv_iters = heads, dim // heads, landmarks, pinv_iters
        self.skip_conv = skip_conv
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = q.float() * self.dh**-0.5, k.float(), v.float()
            if n <= self.landmarks:
                out, p = softmax_attention(q, k, v)
                cls = p[:, :, 0]
            else:
                out, rows = nystrom_attention(q, k, v, self.landmarks, self.pinv_iters, query_rows=slice(0, 1))
                cls = rows[:, :, 0]
            s = self.skip_conv
            out = torch.cat([out[:, :, :s], out[:, :, s:] + self.res_conv(v[:, :, s:])], dim=2)
        out = out.to(x.dtype).transpose(1, 2).reshape(b, n, dim)
        return self.out(out), cls.mean(1)


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)); forward (B, n, dim) → ((B, n, dim), cls_attn (B, n))."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iters: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, landmarks=landmarks, pinv_iters=pinv_iters, dropout=dropout,
                                     skip_conv=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, cls = self.attn(self.norm(x))
        return x + y, cls


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7×7, 5×5 and 3×3 convolutions over the patch tokens laid
    on a side×side square, added to the identity; the class token (index 0) passes through.

    forward(x (B, 1 + side², dim), side) → same shape.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, dim = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    """Linear(in→d)+ReLU, class token, TransLayer, PPEG, TransLayer, LayerNorm, Linear(d→n_classes).

    The N patch tokens are laid on the smallest square (side = ⌈√N⌉) by repeating the first ones, as
    in the paper. forward(x (B, N, in_dim)) → logits (B, n_classes), attention (B, N): the class
    token's attention in the last layer, with the share of repeated tokens added to their originals.
    """

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 512, heads: int = 8, landmarks: int | None = None,
                 pinv_iters: int = 6, dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        landmarks = landmarks or d_model // 2
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.layer1 = TransLayer(d_model, heads, landmarks, pinv_iters, dropout)
        self.ppeg = PPEG(d_model)
        self.layer2 = TransLayer(d_model, heads, landmarks, pinv_iters, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> MILOutput:
        self._check_input(x, self.in_dim, lengths)  # refuses lengths: the square layout has no padding mask
        b, n, _ = x.shape
        h = self.embed(x)
        side = math.ceil(math.sqrt(n))
        source = torch.arange(side * side, device=x.device) % n  # token j of the square repeats patch j mod N
        h = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h[:, source]], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, cls_attn = self.layer2(h)
        logits = self.classifier(self.norm(h)[:, 0])
        attention = cls_attn.new_zeros(b, n).index_add(1, source, cls_attn[:, 1:])
        return MILOutput(logits, attention)


@register_model("transmil", "TransMIL: Nyström self-attention + PPEG (Shao et al. 2021)")
def transmil(in_dim: int, n_classes: int, d_model: int = 512, heads: int = 8, landmarks: int | None = None,
             pinv_iters: int = 6, dropout: float = 0.1) -> TransMIL:
    return TransMIL(in_dim, n_classes, d_model=d_model, heads=heads, landmarks=landmarks, pinv_iters=pinv_iters,
                    dropout=dropout)
