"""The multi-head scan (MHS) of MHS-VM (Ji, 2024): selective scans along several routes in parallel subspaces.

Scan routes are computed for any H × W grid (no lookup tables); each is a permutation ``p`` of the
H·W pixel indices (pixel (i, j) has index i·W + j) with ``p[t]`` the pixel visited at step t.
:func:`route_inverse` gives the order that puts a scanned sequence back in pixel order
(``seq[..., inv]`` with ``seq = x[..., p]`` is ``x``).

Routes (:data:`ROUTES`): ``raster_rows``, ``raster_cols`` (row- / column-major), ``snake_rows``,
``snake_cols`` (boustrophedon), ``zigzag_diag``, ``zigzag_antidiag`` (JPEG-style zigzag along the
anti-diagonals / the diagonals), ``spiral_cw``, ``spiral_ccw`` (from the top-left corner inwards,
first along the top row / first down the left column). Route pairs (:data:`ROUTE_PAIRS`) group
two routes of one kind; a head of :class:`MultiHeadScan` scans its pair forwards and reversed.

:class:`MultiHeadScan` replaces SS2D in VM-UNet: depthwise 3×3 conv → SiLU → a linear projection
into ``heads`` subspaces of ``d_model // heads`` channels → per head, four selective scans (route A,
A reversed, route B, B reversed), each with its own x_proj, dt_proj, A and D, all four of every head
in one scan call → outputs put back in pixel order → :class:`RouteAttentionGate` fuses each head's
four → heads concatenated → LayerNorm → Linear → LayerNorm (out norm).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.nn.mamba import _a_log, _dt_proj, _skip
from wsimamba.ops import selective_scan

__all__ = ["ROUTES", "ROUTE_PAIRS", "MultiHeadScan", "RouteAttentionGate", "route", "route_inverse", "routes_for"]


def _raster_rows(h: int, w: int) -> list[int]:
    return list(range(h * w))


def _raster_cols(h: int, w: int) -> list[int]:
    return [i * w + j for j in range(w) for i in range(h)]


def _snake_rows(h: int, w: int) -> list[int]:
    return [i * w + (j if i % 2 == 0 else w - 1 - j) for i in range(h) for j in range(w)]


def _snake_cols(h: int, w: int) -> list[int]:
    return [(i if j % 2 == 0 else h - 1 - i) * w + j for j in range(w) for i in range(h)]


def _zigzag_diag(h: int, w: int) -> list[int]:
    out = []
    for s in range(h + w - 1):  # anti-diagonal i + j = s
        rows = range(max(0, s - w + 1), min(h - 1, s) + 1)
        # alternate the direction on every diagonal so consecutive tokens stay neighbours
        rows = reversed(rows) if s % 2 == 0 else rows
        out += [i * w + (s - i) for i in rows]
    return out


def _zigzag_antidiag(h: int, w: int) -> list[int]:
    # the zigzag of the left-right mirrored grid, mapped back: it runs along the diagonals j − i = const
    return [(p // w) * w + (w - 1 - p % w) for p in _zigzag_diag(h, w)]


def _spiral_cw(h: int, w: int) -> list[int]:
    out = []
    top, bottom, left, right = 0, h - 1, 0, w - 1
    while top <= bottom and left <= right:
        out += [top * w + j for j in range(left, right + 1)]
        out += [i * w + right for i in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * w + j for j in range(right - 1, left - 1, -1)]
        if left < right:
            out += [i * w + left for i in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out


def _spiral_ccw(h: int, w: int) -> list[int]:
    # the clockwise spiral of the transposed grid is the counter-clockwise one of this grid
    return [(p % h) * w + p // h for p in _spiral_cw(w, h)]


ROUTES: dict[str, Callable[[int, int], list[int]]] = {
    "raster_rows": _raster_rows, "raster_cols": _raster_cols,
    "snake_rows": _snake_rows, "snake_cols": _snake_cols,
    "zigzag_diag": _zigzag_diag, "zigzag_antidiag": _zigzag_antidiag,
    "spiral_cw": _spiral_cw, "spiral_ccw": _spiral_ccw,
}
ROUTE_PAIRS: dict[str, tuple[str, str]] = {
    "snake": ("snake_rows", "snake_cols"),
    "zigzag": ("zigzag_diag", "zigzag_antidiag"),
    "spiral": ("spiral_cw", "spiral_ccw"),
    "raster": ("raster_rows", "raster_cols"),
}


@functools.lru_cache(maxsize=256)
def _route_cpu(name: str, height: int, width: int) -> torch.Tensor:
    # a cached tensor made under inference_mode could never be saved for a later backward
    with torch.inference_mode(False):
        return torch.tensor(ROUTES[name](height, width), dtype=torch.long)


def route(name: str, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The scan route `name` over a height × width grid: a permutation (height·width,) of pixel indices."""
    if name not in ROUTES:
        raise ConfigError(f"unknown scan route {name!r}; choose one of {', '.join(ROUTES)}")
    for label, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"scan route {name!r}: {label} must be a positive int, got {v!r}")
    return _route_cpu(name, height, width).to(device or "cpu")


def route_inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``seq[..., route_inverse(p)]`` puts ``seq = x[..., p]`` back in pixel order."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def routes_for(pairs: Sequence[str], height: int, width: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather and restore indices for heads scanning `pairs`, cached by (pairs, H, W, device).

    Returns (scan, restore), both (heads, 4, H·W) int64: for head k the sequences are route A,
    A reversed, route B, B reversed; ``x[..., scan[k, s]]`` is sequence s and ``y[..., restore[k, s]]``
    puts its output back in pixel order.
    """
    key = (tuple(pairs), height, width, str(device))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = _build_indices(pairs, height, width, device)
    return _INDEX_CACHE[key]


def _build_indices(pairs, height, width, device):
    # normal tensors even when the first call comes under inference_mode: training reuses the cache
    with torch.inference_mode(False):
        scans = []
        for pair in pairs:
            a, b = (route(n, height, width) for n in ROUTE_PAIRS[pair])
            scans.append(torch.stack([a, a.flip(0), b, b.flip(0)]))
        scan = torch.stack(scans)
        restore = torch.argsort(scan, dim=-1)  # the inverse of each row's permutation
        if len(_INDEX_CACHE) > 64:  # many distinct sizes (e.g. sliding over odd tiles): keep memory bounded
            _INDEX_CACHE.clear()
        return scan.to(device), restore.to(device)


class RouteAttentionGate(nn.Module):
    """Scan-route attention: fuses the outputs of one head's routes with a variation gate.

    For the K route outputs y_k of a head at each pixel and channel (put back in pixel order), the
    fused output is Σ_k y_k · g with g = ReLU(CV − t), CV = std_k(y) / (mean_k(y − min_k y) + ε) the
    coefficient of variation across routes (shifted to be non-negative). Where the routes agree the
    gate closes; where they disagree (a route saw a structure the others did not) it opens. This is
    the fusion unit of the released MHS-VM code; ``threshold`` is its t (0 there).

    Shapes: ys (batch, heads, K, channels, length) → (batch, heads, channels, length);
    :meth:`gate` returns g, (batch, heads, 1, channels, length).
    """

    def __init__(self, threshold: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.threshold, self.eps = float(threshold), float(eps)

    def gate(self, ys: torch.Tensor) -> torch.Tensor:
        """ys (batch, heads, K, channels, length) → gate (batch, heads, 1, channels, length)."""
        if ys.dim() != 5 or ys.shape[2] < 2:
            raise ConfigError(f"route gate: expected (batch, heads, K ≥ 2, channels, length), got {tuple(ys.shape)}")
        std = ys.std(dim=2, keepdim=True)
        shifted = ys - ys.min(dim=2, keepdim=True).values
        return F.relu(std / (shifted.mean(dim=2, keepdim=True) + self.eps) - self.threshold)

    def forward(self, ys: torch.Tensor) -> torch.Tensor:
        """ys (batch, heads, K, channels, length) → (batch, heads, channels, length)."""
        return (ys.sum(dim=2, keepdim=True) * self.gate(ys)).squeeze(2)


class MultiHeadScan(nn.Module):
    """The multi-head scan mixer (MHS), a drop-in replacement for SS2D (channels last).

    Args:
        d_model: channels C of the input map; divisible by ``heads``.
        heads: subspaces h, each of C / h channels.
        routes: the route pair of every head (names from :data:`ROUTE_PAIRS`); None takes
            snake, zigzag, spiral, raster in turn.
        d_state: SSM state size N (16, as in MHS-VM).
        dt_rank: rank of dt per subspace; "auto" = ceil((C / h) / 16).
        d_conv: depthwise conv kernel before the scans; < 2 disables it.
        gate_threshold: t of :class:`RouteAttentionGate`.
        dt_min, dt_max, dt_init_floor: initial softplus(dt bias) range (as :class:`wsimamba.nn.Mamba`).
        backend: selective-scan backend ("auto", "reference", "triton", "mamba_ssm").

    Parameters: 2·C² (subspace and output projections) + 9·C + C (conv) + 4·C (two LayerNorms) +
    per head 4 × (x_proj, dt_proj, A, D) on C / h channels.

    Shapes: x (batch, H, W, C) → (batch, H, W, C).
    """

    K = 4  # sequences per head: route A, A reversed, route B, B reversed

    def __init__(self, d_model: int, heads: int = 4, routes: Sequence[str] | None = None, d_state: int = 16,
                 dt_rank: int | str = "auto", d_conv: int = 3, gate_threshold: float = 0.0, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4, backend: str = "auto"):
        super().__init__()
        for name, value in (("d_model", d_model), ("heads", heads), ("d_state", d_state)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MultiHeadScan {name}: expected a positive int, got {value!r}")
        if d_model % heads:
            raise ConfigError(f"MultiHeadScan: d_model {d_model} is not divisible by heads {heads}")
        order = list(ROUTE_PAIRS)
        routes = [order[k % len(order)] for k in range(heads)] if routes is None else list(routes)
        if len(routes) != heads or any(r not in ROUTE_PAIRS for r in routes):
            raise ConfigError(f"MultiHeadScan routes: expected {heads} names from {', '.join(ROUTE_PAIRS)}, "
                              f"got {routes!r}")
        self.d_model, self.heads, self.routes, self.d_state, self.backend = d_model, heads, routes, d_state, backend
        self.d_head = d = d_model // heads
        self.dt_rank = r = math.ceil(d / 16) if dt_rank == "auto" else int(dt_rank)
        k = heads * self.K

        self.conv2d = (nn.Conv2d(d_model, d_model, d_conv, padding=(d_conv - 1) // 2, groups=d_model)
                       if d_conv > 1 else None)
        self.in_proj = nn.Linear(d_model, d_model, bias=False)  # into the h subspaces
        bound = d**-0.5
        # one (dt, B, C) projection per scanned sequence, stacked so one einsum serves all of them
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * d_state, d).uniform_(-bound, bound))
        dt_projs = [_dt_proj(r, d, dt_min, dt_max, dt_init_floor) for _ in range(k)]
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.detach() for p in dt_projs]))  # (k, d, r)
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.detach() for p in dt_projs]))  # (k, d)
        self.dt_projs_bias._no_reinit = True
        self.A_logs = _a_log(k * d, d_state)
        self.Ds = _skip(k * d)
        self.route_gate = RouteAttentionGate(gate_threshold)
        self.cat_norm = nn.LayerNorm(d_model)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_norm = nn.LayerNorm(d_model)

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head route scans. x (batch, C, H, W) → fused (batch, heads, C / heads, H·W), fp32."""
        b, c, h, w = x.shape
        length, heads, d, n, K = h * w, self.heads, self.d_head, self.d_state, self.K
        scan_idx, restore_idx = routes_for(self.routes, h, w, x.device)
        x = x.reshape(b, heads, 1, d, length).expand(b, heads, K, d, length)
        xs = torch.gather(x, -1, scan_idx[None, :, :, None, :].expand(b, heads, K, d, length))
        xs = xs.reshape(b, heads * K, d, length)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        # one scan call: sequences stacked on channels, so channel s·d + i reads B/C group s
        ys = selective_scan(
            xs.reshape(b, heads * K * d, length), dts.reshape(b, heads * K * d, length),
            -torch.exp(self.A_logs.float()), Bs.contiguous(), Cs.contiguous(), self.Ds.float(), None,
            delta_bias=self.dt_projs_bias.reshape(-1).float(), delta_softplus=True, direction="forward",
            backend=self.backend,
        )
        # restoring and gating in fp32: the gate divides by a spread that bf16 would round to zero
        ys = ys.float().reshape(b, heads, K, d, length)
        ys = torch.gather(ys, -1, restore_idx[None, :, :, None, :].expand(b, heads, K, d, length))
        return self.route_gate(ys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, H, W, C) → (batch, H, W, C)."""
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ConfigError(f"MultiHeadScan input: expected (batch, H, W, {self.d_model}), got {tuple(x.shape)}")
        b, h, w, c = x.shape
        y = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            y = self.conv2d(y)
        y = self.in_proj(F.silu(y).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.scan(y)  # (b, heads, d, L)
        y = y.reshape(b, c, h * w).transpose(1, 2).reshape(b, h, w, c).to(x.dtype)
        return self.out_norm(self.out_proj(self.cat_norm(y)))
