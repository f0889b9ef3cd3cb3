"""The end of an SRMamba block in Triton: restore the reordered branch, add the forward branch, gate.

Contract: `wsimamba.ops.restore_add_gate(..., backend="triton")` calls `restore_add_gate` below with
validated arguments (wsimamba/ops/reorder.py has the definition). Shapes:

    y            (batch, dim, length)   the forward branch; any strides
    y_reordered  (batch, dim, P)        P = K·rate, K = ceil(length / rate): the reordered branch, phase-major
    z            (batch, dim, length)   the gate; any strides (a channel slice of in_proj's output in place)
    out          (batch, dim, length)   contiguous, y's dtype

    out[t] = (y[t] + y_reordered[(t mod rate)·K + ⌊t / rate⌋]) · silu(z[t])

    with bags (padded: a (batch,) lengths tensor; packed: a wsimamba.ops.ReorderBags), the same per bag, K
    its own steps and y_reordered its reordered row's span; out and the gradients are 0 outside the bags

How the kernels work:

- A program owns BLOCK_D channels × TK steps k of every phase o, a (BLOCK_D, TK, RP) tile (RP the power of
  two ≥ rate; the columns past rate are masked). Its original positions k·rate + o are one contiguous run
  of y, z and out, and its reordered indices o·K + k are `rate` contiguous runs of y_reordered, so every
  load and store is coalesced on one side or the other; Triton lays each access out along its contiguous
  axis and moves the tile between them on chip. (Tiles of consecutive original positions, 8 to a
  thread, scatter each thread's 8 values over 8 phases: 2-byte stores; the reordered conv's first version
  did that and was slower than a reordered copy, kernels/NOTES.md session 20.)
- The forward writes out once. The backward covers the K·rate positions (the reordering's padding too):
  with g the gradient of out, it writes dy = g·silu(z) in y's order, the same values at the reordered
  indices for y_reordered (0 at the padding, whose outputs nothing reads), and dz = g·(y + y_reordered)·
  silu'(z): the restore's inverse, the add's fan-out and the gate's gradient in one pass. g arrives as the
  transpose of out_proj's input gradient (unit stride along the channels), read in place.
- All arithmetic is fp32; offsets along batch and channels are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the grid order (channel tiles fastest), int64 row offsets and 3-D tile loads of the conv kernels
from wsimamba.kernels.conv1d import _bag_zeros, _device_rows, _interpreting, _load_tile3, _reorder_tile, _rows
from wsimamba.ops.reorder import ReorderBags

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The largest rate the kernels take (a tile spans next_power_of_2(rate) phases).
MAX_RATE = 1024

# Tests set this to fill outputs with NaN before each launch, so unwritten elements show.
POISON_OUTPUTS = False
# Tests and tuning set this ({"fwd": {...}, "bwd": {...}}, keys BLOCK_D, TK, num_warps) to force tiles.
TILE_OVERRIDE: dict | None = None
# Registers and spills of the last compiled launch of each kernel (benchmarks print them).
KERNEL_RESOURCES: dict = {}


class TritonReorderError(ValueError):
    """Arguments the Triton kernel cannot take (the dispatch layer turns it into a WsimambaError)."""


@triton.jit
def _phase_tile(pid_k, K, L, RATE: tl.constexpr, RP: tl.constexpr, TK: tl.constexpr):
    """Steps k × phases o (RP ≥ RATE columns): original positions k·RATE + o (one contiguous run), reordered
    indices o·K + k (RATE contiguous runs), and where each lies inside [0, L) and inside [0, K·RATE)."""
    kk = pid_k * TK + tl.arange(0, TK)
    oo = tl.arange(0, RP)
    orig = kk[:, None] * RATE + oo[None, :]
    q = oo[None, :] * K + kk[:, None]
    in_seq = (kk < K)[:, None] & (oo < RATE)[None, :]
    return orig, q, in_seq & (orig < L), in_seq


@triton.jit
def _load(ptr, rows, offs, s_l, mask, mask_d):
    """A (BLOCK_D, TK, RP) tile at offsets offs (TK, RP) along a row of stride s_l, fp32, 0 where masked."""
    return _load_tile3(ptr, rows, offs.to(tl.int64) * s_l, mask_d, mask)


@triton.jit
def _store(ptr, rows, offs, value, mask, mask_d):
    tl.store(ptr + rows[:, None, None] + offs[None, :, :], value.to(ptr.dtype.element_ty),
             mask=mask_d[:, None, None] & mask[None, :, :])


@triton.jit
def _fwd_kernel(
    y_ptr, yr_ptr, z_ptr, out_ptr, bag_ptr, tile_ptr,
    DIM, L, K, s_yb, s_yd, s_yl, s_rb, s_rd, s_zb, s_zd, s_zl, s_ob, s_od,
    RATE: tl.constexpr, RP: tl.constexpr, BAGS: tl.constexpr, BLOCK_D: tl.constexpr, TK: tl.constexpr,
):
    """A tile of the bag (of L tokens, K steps) at x_off along y's row and r_off along y_reordered's (bags as
    the conv's `_reorder_tile`)."""
    pid_k, pid_d, b, K, L, x_off, r_off = _reorder_tile(DIM, BLOCK_D, 0, 0, K, L, bag_ptr, tile_ptr, RATE, False,
                                                        BAGS)
    if pid_k * TK < K:  # (always, but for padded bags shorter than the longest)
        orig, q, real, _ = _phase_tile(pid_k, K, L, RATE, RP, TK)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < DIM
        y = _load(y_ptr, _rows(b, offs_d, s_yb, s_yd) + x_off * s_yl, orig, s_yl, real, mask_d)
        yr = _load(yr_ptr, _rows(b, offs_d, s_rb, s_rd) + r_off, q, 1, real, mask_d)
        z = _load(z_ptr, _rows(b, offs_d, s_zb, s_zd) + x_off * s_zl, orig, s_zl, real, mask_d)
        _store(out_ptr, _rows(b, offs_d, s_ob, s_od) + x_off, orig, (y + yr) * (z * tl.sigmoid(z)), real, mask_d)


@triton.jit
def _bwd_kernel(
    g_ptr, y_ptr, yr_ptr, z_ptr, dy_ptr, dyr_ptr, dz_ptr, bag_ptr, tile_ptr,
    DIM, L, K, s_gb, s_gd, s_gl, s_yb, s_yd, s_yl, s_rb, s_rd, s_zb, s_zd, s_zl,
    s_dyb, s_dyd, s_drb, s_drd, s_dzb, s_dzd,
    RATE: tl.constexpr, RP: tl.constexpr, NEED_DY: tl.constexpr, NEED_DYR: tl.constexpr, NEED_DZ: tl.constexpr,
    BAGS: tl.constexpr, BLOCK_D: tl.constexpr, TK: tl.constexpr,
):
    pid_k, pid_d, b, K, L, x_off, r_off = _reorder_tile(DIM, BLOCK_D, 0, 0, K, L, bag_ptr, tile_ptr, RATE, False,
                                                        BAGS)
    if pid_k * TK < K:
        orig, q, real, in_seq = _phase_tile(pid_k, K, L, RATE, RP, TK)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < DIM
        g = _load(g_ptr, _rows(b, offs_d, s_gb, s_gd) + x_off * s_gl, orig, s_gl, real, mask_d)
        z = _load(z_ptr, _rows(b, offs_d, s_zb, s_zd) + x_off * s_zl, orig, s_zl, real, mask_d)
        sig = tl.sigmoid(z)
        gz = g * (z * sig)  # 0 at the reordering's padding, whose outputs nothing reads
        if NEED_DY:
            _store(dy_ptr, _rows(b, offs_d, s_dyb, s_dyd) + x_off, orig, gz, real, mask_d)
        if NEED_DYR:
            _store(dyr_ptr, _rows(b, offs_d, s_drb, s_drd) + r_off, q, gz, in_seq, mask_d)
        if NEED_DZ:
            y = _load(y_ptr, _rows(b, offs_d, s_yb, s_yd) + x_off * s_yl, orig, s_yl, real, mask_d)
            yr = _load(yr_ptr, _rows(b, offs_d, s_rb, s_rd) + r_off, q, 1, real, mask_d)
            _store(dz_ptr, _rows(b, offs_d, s_dzb, s_dzd) + x_off, orig,
                   g * (y + yr) * (sig * (1.0 + z * (1.0 - sig))), real, mask_d)


# ---------------------------------------------------------------------------------------------
# Python side


def _config(rate: int, backward: bool) -> dict:
    """Tiles of BLOCK_D channels × TK steps × RP ≥ rate phases (a power of two; columns past `rate` masked):
    forward 4 channels × ~1024 positions; backward 16 × ~256 (g comes with unit stride along the channels,
    so a tile holds more of them); 8 warps, so at most 16 tile elements a thread: a streaming kernel wants
    the warps (at 4 warps the backward held 201 registers a thread, two programs an SM, and took 4.2 ms
    forward + backward at dim 1024, L 200k on an H100)."""
    rp = triton.next_power_of_2(rate)
    if backward:
        cfg = dict(BLOCK_D=16, TK=max(1, 256 // rp), num_warps=8)
    else:
        cfg = dict(BLOCK_D=4, TK=max(1, 1024 // rp), num_warps=8)
    override = (TILE_OVERRIDE or {}).get("bwd" if backward else "fwd")
    if override:
        cfg.update(override)
    cfg["RP"] = rp
    return cfg


def _bag_plan(bags, cfg: dict, rate: int, length: int, device) -> tuple:
    """(BAGS mode, bag array or None, tile list or None, programs along the steps) for `_reorder_tile`; packed
    bags' plans are cached on their ReorderBags."""
    if bags is None:
        return 0, None, None, triton.cdiv(-(-length // rate), cfg["TK"])
    if isinstance(bags, torch.Tensor):
        return 1, bags.to(torch.int32).contiguous(), None, triton.cdiv(-(-length // rate), cfg["TK"])
    key = ("gate", rate, cfg["TK"], str(device))
    if key not in bags.cache:
        tiles = [(i, k) for i, n in enumerate(bags.sizes) for k in range(triton.cdiv(-(-n // rate), cfg["TK"]))]
        rows = [(a, r, n) for a, r, n in zip(bags.starts, bags.reordered_starts(rate), bags.sizes)]
        bags.cache[key] = (_device_rows(rows, torch.int64, device), _device_rows(tiles, torch.int32, device), len(tiles))
    rows, tiles, count = bags.cache[key]
    return 2, rows, tiles, count


def _note(name: str, kern) -> None:
    regs, spills = getattr(kern, "n_regs", None), getattr(kern, "n_spills", None)
    if regs is not None:
        KERNEL_RESOURCES[name] = dict(regs=regs, spills=spills)


def _new(shape, like: torch.Tensor, dtype, zeros: bool = False) -> torch.Tensor:
    if zeros:
        return torch.zeros(shape, device=like.device, dtype=dtype)
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _check(y, y_reordered, z, rate) -> None:
    for name, t in (("y", y), ("y_reordered", y_reordered), ("z", z)):
        if t.dtype not in _DTYPES:
            raise TritonReorderError(f"{name}: dtype {t.dtype} not supported by the Triton kernel (fp32, fp16, bf16)")
    if y.shape[0] > 65535:
        raise TritonReorderError(f"y: batch {y.shape[0]} exceeds the kernel's grid (65535)")
    if rate > MAX_RATE:
        raise TritonReorderError(f"rate {rate} exceeds the kernel's limit {MAX_RATE}")
    if not y.is_cuda and not _interpreting():
        raise TritonReorderError("the Triton reorder kernel runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")


def _tiles(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("RP", "BLOCK_D", "TK", "num_warps")}


def _fwd(y, yr, z, rate, bags):
    batch, dim, length = y.shape
    out = _new((batch, dim, length), y, y.dtype, _bag_zeros(bags, length))  # 0 outside the bags
    cfg = _config(rate, False)
    mode, rows, tiles, count = _bag_plan(bags, cfg, rate, length, y.device)
    kern = _fwd_kernel[(count * triton.cdiv(dim, cfg["BLOCK_D"]), batch)](
        y, yr, z, out, rows if rows is not None else y, tiles if tiles is not None else y, dim, length,
        -(-length // rate), *y.stride(), yr.stride(0), yr.stride(1), *z.stride(), out.stride(0), out.stride(1),
        RATE=rate, BAGS=mode, **_tiles(cfg),
    )
    _note("fwd", kern)
    return out


def _bwd(g, y, yr, z, rate, need, bags):
    batch, dim, length = y.shape
    padded = yr.shape[-1]
    zeros = _bag_zeros(bags, length)
    # outside the bags the gradients are 0 (and a padded row's reordered sequence ends before the row does)
    dy = _new((batch, dim, length), y, y.dtype, zeros) if need[0] else None
    dyr = _new((batch, dim, padded), y, yr.dtype, isinstance(bags, torch.Tensor)) if need[1] else None
    dz = _new((batch, dim, length), y, z.dtype, zeros) if need[2] else None
    stand_in = next(t for t in (dy, dyr, dz) if t is not None)
    cfg = _config(rate, True)
    mode, rows, tiles, count = _bag_plan(bags, cfg, rate, length, y.device)
    kern = _bwd_kernel[(count * triton.cdiv(dim, cfg["BLOCK_D"]), batch)](
        g, y, yr, z, dy if dy is not None else stand_in, dyr if dyr is not None else stand_in,
        dz if dz is not None else stand_in, rows if rows is not None else y, tiles if tiles is not None else y,
        dim, length, -(-length // rate), *g.stride(), *y.stride(), yr.stride(0), yr.stride(1), *z.stride(),
        *(dy.stride()[:2] if dy is not None else (0, 0)), *(dyr.stride()[:2] if dyr is not None else (0, 0)),
        *(dz.stride()[:2] if dz is not None else (0, 0)),
        RATE=rate, NEED_DY=need[0], NEED_DYR=need[1], NEED_DZ=need[2], BAGS=mode, **_tiles(cfg),
    )
    _note("bwd", kern)
    return dy, dyr, dz


class _RestoreAddGateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, yr, z, rate, bags):
        ctx.save_for_backward(y, yr, z, bags if isinstance(bags, torch.Tensor) else None)
        ctx.rate = rate
        ctx.packed = bags if isinstance(bags, ReorderBags) else None
        return _fwd(y, yr, z, rate, bags)

    @staticmethod
    def backward(ctx, g):
        y, yr, z, lengths = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return None, None, None, None, None
        dy, dyr, dz = _bwd(g, y, yr, z, ctx.rate, need, lengths if lengths is not None else ctx.packed)
        return dy, dyr, dz, None, None


def restore_add_gate(y, y_reordered, z, rate, bags=None):
    """The Triton backend of `wsimamba.ops.restore_add_gate` (arguments validated there). y_reordered with a
    stride along its length other than 1 is copied first. Raises TritonReorderError for inputs it does not
    take (dtype, device)."""
    _check(y, y_reordered, z, rate)
    if y_reordered.stride(-1) != 1:
        y_reordered = y_reordered.contiguous()
    return _RestoreAddGateFn.apply(y, y_reordered, z, int(rate), bags)
