"""SS2D, VMamba's 2-D selective scan, and the four-way cross-scan / cross-merge it runs on.

:func:`cross_scan` unrolls a feature map into four sequences (row-major, column-major, and both
reversed); :func:`cross_merge` folds four such sequences back onto the map and sums them. The two
are each other's adjoint, so ``cross_merge(cross_scan(x)) == 4 * x``. Both are plain view / flip /
transpose ops, so autograd needs nothing special. The segmentation networks reuse them.

:class:`SS2D` follows VMamba's ``v05`` form: in_proj → depthwise 3×3 conv → SiLU → cross-scan →
one selective scan over the four directions stacked on the channel axis (each direction with its
own x_proj, dt_proj, A and D; B and C grouped per direction) → cross-merge → LayerNorm (out norm)
→ optional SiLU gate → out_proj. Parameter names follow VMamba (in_proj, conv2d, x_proj_weight,
dt_projs_weight, dt_projs_bias, A_logs, Ds, out_norm, out_proj).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.nn.mamba import _a_log, _dt_proj, _skip
from wsimamba.ops import selective_scan

__all__ = ["SS2D", "cross_merge", "cross_scan"]

DIRECTIONS_2D = 4


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Four scan orders of a feature map.

    x (batch, channels, H, W) → (batch, 4, channels, H·W): direction 0 is row-major (token h·W + w),
    1 column-major (token w·H + h), 2 and 3 are 0 and 1 reversed.
    """
    if x.dim() != 4:
        raise ConfigError(f"cross_scan: expected (batch, channels, H, W), got shape {tuple(x.shape)}")
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    two = torch.stack([rows, cols], dim=1)
    return torch.cat([two, two.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sum four sequences in :func:`cross_scan`'s orders back onto the map (its adjoint).

    ys (batch, 4, channels, height·width) → (batch, channels, height, width).
    """
    b, k, c, length = ys.shape
    if k != DIRECTIONS_2D or length != height * width:
        raise ConfigError(f"cross_merge: expected (batch, 4, channels, {height * width}), got shape {tuple(ys.shape)}")
    two = ys[:, :2] + ys[:, 2:].flip(-1)
    rows = two[:, 0].reshape(b, c, height, width)
    cols = two[:, 1].reshape(b, c, width, height).transpose(2, 3)
    return rows + cols


class SS2D(nn.Module):
    """VMamba's 2-D selective-scan mixer.

    Args:
        d_model: channels C of the input map.
        d_state: SSM state size N (VMamba v2/v3 uses 1).
        ssm_ratio: d_inner = ssm_ratio · d_model.
        dt_rank: rank of dt; "auto" = ceil(d_model / 16).
        d_conv: depthwise conv kernel (3); < 2 disables the conv.
        conv_bias: bias of the depthwise conv.
        gate: multiply the normed scan output by SiLU(z) from a second in_proj half (VMamba v0/v1 and
            ``v05``); False is VMamba's released ``v05_noz`` (no z: in_proj is half the size).
        bias: biases of in_proj / out_proj.
        dt_min, dt_max, dt_init_floor: initial softplus(dt bias) range, as in :class:`wsimamba.nn.Mamba`.
        dropout: dropout after out_proj.
        backend: selective-scan backend ("auto", "reference", "triton", "mamba_ssm").

    Shapes: x (batch, H, W, d_model), channels last → (batch, H, W, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, dt_rank: int | str = "auto",
                 d_conv: int = 3, conv_bias: bool = False, gate: bool = False, bias: bool = False,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SS2D {name}: expected a positive int, got {value!r}")
        if not ssm_ratio > 0:
            raise ConfigError(f"SS2D ssm_ratio: expected a positive number, got {ssm_ratio!r}")
        self.d_model, self.d_state, self.gate, self.backend = d_model, d_state, gate, backend
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k, di, r = DIRECTIONS_2D, self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(d_model, di * (2 if gate else 1), bias=bias)
        self.conv2d = (nn.Conv2d(di, di, d_conv, padding=(d_conv - 1) // 2, groups=di, bias=conv_bias)
                       if d_conv > 1 else None)
        # per direction: (dt, B, C) from the sequence, stored stacked so one einsum serves all four
        bound = di**-0.5
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * d_state, di).uniform_(-bound, bound))
        dt_projs = [_dt_proj(r, di, dt_min, dt_max, dt_init_floor) for _ in range(k)]
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.detach() for p in dt_projs]))  # (k, di, r)
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.detach() for p in dt_projs]))  # (k, di)
        self.dt_projs_bias._no_reinit = True
        self.A_logs = _a_log(k * di, d_state)  # (k·di, N): direction-major, matching the stacked channels
        self.Ds = _skip(k * di)
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The four-direction selective scan. x (batch, d_inner, H, W) → (batch, d_inner, H, W)."""
        b, di, h, w = x.shape
        k, n, length = DIRECTIONS_2D, self.d_state, h * w
        xs = cross_scan(x)  # (b, k, di, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        # one scan call: directions stacked on channels, so channel k·di + d reads B/C group k
        ys = selective_scan(
            xs.reshape(b, k * di, length), dts.reshape(b, k * di, length), -torch.exp(self.A_logs.float()),
            Bs.contiguous(), Cs.contiguous(), self.Ds.float(), None,
            delta_bias=self.dt_projs_bias.reshape(-1).float(), delta_softplus=True, direction="forward",
            backend=self.backend,
        )
        # merging in fp32: four bf16 sums lose more than the scan itself does
        return cross_merge(ys.reshape(b, k, di, length).float(), h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, H, W, d_model) → (batch, H, W, d_model)."""
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ConfigError(f"SS2D input: expected (batch, H, W, {self.d_model}), got shape {tuple(x.shape)}")
        xz = self.in_proj(x)
        if self.gate:
            x, z = xz.chunk(2, dim=-1)
        else:
            x, z = xz, None
        x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = F.silu(x)
        y = self.out_norm(self.scan(x).permute(0, 2, 3, 1).to(xz.dtype))
        if z is not None:
            y = y * F.silu(z)
        return self.dropout(self.out_proj(y))
