"""Fused causal depthwise conv1d + SiLU in Triton, forward and backward (the short convolution of a Mamba block).

Contract: `wsimamba.ops.causal_conv1d(..., backend="triton")` calls `causal_conv1d` below with validated
arguments. Shapes:

    x        (batch, dim, length)   fp32 / fp16 / bf16; unit stride along the length, any batch and dim
                                    strides (a channel slice of a wider buffer is read in place)
    weight   (dim, width)           any float dtype, width 1..MAX_WIDTH
    bias     (dim,) or None         any float dtype
    seq_idx  (batch, length) or None, int32 / int64
    out      (batch, dim, length)   contiguous, x's dtype

    p[b, d, t]   = bias[d] + Σ_k weight[d, k] · x[b, d, t − (width − 1) + k]
                   (x = 0 before position 0, and a tap counts only where seq_idx[b, s] == seq_idx[b, t])
    out[b, d, t] = silu(p[b, d, t])   (or p without an activation)

How the kernels work:

- One program owns BLOCK_D channels of one batch element and a run of positions, and reads a tile of
  BLOCK_L positions around them once, with 16-byte vector loads: its own positions plus HALO before them
  (the forward: out[t] needs x[t − width + 1 .. t]) or HALO on both sides (the backward: p needs x before
  a position, dx needs dp after it). The halo is read again by the neighbouring program, from L2.
- Triton has no register shift along a tile, so the taps x[t − width + 1 + k] and, in the backward,
  dp[t + j] are picked out of the tile along its row with `tl.gather` (`_taps`), which compiles to warp
  shuffles where a row of the tile lies in one warp. Shifted loads instead (one masked load per tap)
  cannot be vectorised, and with Triton's 8-position-per-thread layout each became 8 scalar loads per
  thread: a backward that read its taps so moved 10.5 GB through L1 for 1.2 GB of DRAM traffic (ncu,
  H200), and one that also recomputed p at each of the `width` shifts, instead of picking dp(t + j) out
  of the tile, took 2.2 ms where this one takes 0.75 (dim 1024, L 200k).
- The forward accumulates in fp32, applies bias and SiLU, and writes `out` once; nothing else is saved
  for the backward, which recomputes p (a bag of 200k patches at dim 2048 is 0.8 GB per bf16 tensor).
- The backward computes dp = dout · silu'(p) once per tile position, dx[t] = Σ_j weight[width − 1 − j] ·
  dp[t + j] (masked where t + j leaves t's packed sequence), and sums dweight[k] = Σ_t dp[t] · tap_k[t]
  and dbias over its own positions on chip, then adds them with one relaxed fp32 atomic per (channel,
  tap) (their last bits depend on the order the programs finish).
- Channel tiles vary fastest along the grid (`_tile`), so that programs running together add into
  different addresses; with length tiles fastest they all hammered the same few.
- Offsets along batch and channels are int64 (a (8, 2·2048, 200k) buffer has 6.6e9 elements); along
  the length int32.
- `reorder=r` (SRMamba's second branch): the conv of `stride_reorder(x, r)`, whose phase o holds x[o],
  x[o + r], …, read from x in place. A program owns the steps k0 … k0 + TK of every phase: a (BLOCK_D, TK,
  RP) tile (RP the power of two ≥ r, the columns past r masked) whose original positions k·r + o are one
  contiguous run of x and whose reordered indices o·K + k are r contiguous runs of out, so both sides are
  read and written whole; the taps are picks along the tile's rows. Only a phase's first width − 1 steps
  take taps from the previous phase's tail (and in the backward its last width − 1 feed the next phase's
  head): the tiles holding those gather at reordered indices, in a second launch over those tiles only, so
  that the common tiles compile without those registers. (Tiles of consecutive original positions instead, as
  the plain conv reads them, scattered each thread's 8 outputs over 8 phases: slower than a reordered copy.)
- `bags` (with reorder): padded bags (a (batch,) lengths tensor: the kernels read row b's length, so nothing
  is read on the host and CUDA graphs can hold the launches) or packed ones (`wsimamba.ops.ReorderBags`: the
  host lists each launch's (bag, step tile) pairs once per pack), each reordered and convolved alone; every
  kernel gets its bag's length and offsets from `_reorder_tile` and runs the single-bag tile code. Outputs
  outside the bags' reordered sequences, and x's gradient outside the bags, are zeros.

Measured (benchmarks/conv1d.py, H200, bf16, dim 1024, width 4, batch 1, L 200k, 2026-11-27): forward
0.42 ms, forward + backward 1.17 ms, against 2.58 and 7.19 ms for F.conv1d + F.silu (cuDNN) in the
same process; the floors at the measured copy bandwidth are 0.20 and 0.49 ms. Below ~50k positions
forward + backward is bound by host time (two Triton launches and autograd, ~0.5 ms per step there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from wsimamba.ops.reorder import ReorderBags, reordered_length

MAX_WIDTH = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = ("silu", None)
# The largest reordering rate the kernels take (a tile spans next_power_of_2(rate) phases).
MAX_REORDER_RATE = 256

# Tests set this to fill outputs and dx with NaN before each launch, so unwritten elements show.
POISON_OUTPUTS = False
# Tests and tuning set this ({"fwd": {...}, "bwd": {...}}, keys BLOCK_D, BLOCK_L, HALO, num_warps, maxnreg)
# to force tiles.
TILE_OVERRIDE: dict | None = None
# Registers and spills of the last compiled launch of each kernel (the benchmark prints them).
KERNEL_RESOURCES: dict = {}


class TritonConvError(ValueError):
    """Arguments the Triton kernel cannot take (the dispatch layer turns it into a WsimambaError)."""


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _rows(b, offs_d, s_b, s_d):
    """(BLOCK_D,) int64 offsets of the rows (b, offs_d): the product overflows int32 on long bags."""
    return b.to(tl.int64) * s_b + offs_d.to(tl.int64) * s_d


@triton.jit
def _tile(DIM, BLOCK_D: tl.constexpr):
    """(length tile, channel tile, batch element) of this program. Channel tiles vary fastest: programs
    running at the same time then add their dweight and dbias into different addresses (with length tiles
    fastest, every running program added into the same few, and the backward took 2.5 ms instead of 1.5 at
    dim 1024, L 200k on an H200); a length tile's neighbour, whose x it reads as halo, still runs nearby."""
    n_d = tl.cdiv(DIM, BLOCK_D)
    pid = tl.program_id(0)
    return pid // n_d, pid % n_d, tl.program_id(1)


@triton.jit
def _load_tile(ptr, rows, offs_t, mask_d, L):
    """The (BLOCK_D, BLOCK_L) tile at positions offs_t in fp32, zero outside [0, L)."""
    ok = mask_d[:, None] & ((offs_t >= 0) & (offs_t < L))[None, :]
    return tl.load(ptr + rows[:, None] + offs_t[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _taps(tile, idx, shift: tl.constexpr):
    """tile[:, i + shift] at column i (clamped into the tile): a pick along the row, by warp shuffles
    where a row lies in one warp. Columns whose pick was clamped are never used."""
    if shift == 0:
        return tile
    src = tl.minimum(tl.maximum(idx + shift, 0), tile.shape[1] - 1)
    return tl.gather(tile, tl.broadcast_to(src[None, :], tile.shape), axis=1)


@triton.jit
def _load_seq(seq_ptr, row, offs_t, L, shift: tl.constexpr):
    pos = offs_t + shift
    return tl.load(seq_ptr + row + pos, mask=(pos >= 0) & (pos < L), other=-1)


@triton.jit
def _conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, out_ptr,
    DIM, L, s_xb, s_xd, s_sb, s_ob, s_od,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, ACT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HALO: tl.constexpr,
):
    """The tile is the program's own BLOCK_L - HALO positions and the HALO before them, read once."""
    OUT_L: tl.constexpr = BLOCK_L - HALO
    pid_l, pid_d, b = _tile(DIM, BLOCK_D)
    idx = tl.arange(0, BLOCK_L)
    offs_t = pid_l * OUT_L - HALO + idx
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    xt = _load_tile(x_ptr, _rows(b, offs_d, s_xb, s_xd), offs_t, mask_d, L)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32) + bias[:, None]
    if HAS_SEQ:
        seq_row = b.to(tl.int64) * s_sb
        seq_t = _load_seq(seq_ptr, seq_row, offs_t, L, 0)
    for k in tl.static_range(WIDTH):
        w_k = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        # own positions (from HALO >= WIDTH - 1 on) take their taps inside the tile
        tap = _taps(xt, idx, k - (WIDTH - 1))
        if HAS_SEQ and k < WIDTH - 1:
            tap = tl.where((_load_seq(seq_ptr, seq_row, offs_t, L, k - (WIDTH - 1)) == seq_t)[None, :], tap, 0.0)
        acc += w_k[:, None] * tap
    if ACT:
        acc = acc * tl.sigmoid(acc)
    mask = mask_d[:, None] & ((idx >= HALO) & (offs_t < L))[None, :]
    out_rows = _rows(b, offs_d, s_ob, s_od)
    tl.store(out_ptr + out_rows[:, None] + offs_t[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1d_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr,
    DIM, L, s_xb, s_xd, s_sb, s_gb, s_gd, s_dxb, s_dxd,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, ACT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DBIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HALO: tl.constexpr,
):
    """The tile is the program's own BLOCK_L - 2·HALO positions with HALO more on each side: x and dout
    are read once; p needs x up to width - 1 before a position, dx needs dp up to width - 1 after it."""
    OUT_L: tl.constexpr = BLOCK_L - 2 * HALO
    pid_l, pid_d, b = _tile(DIM, BLOCK_D)
    idx = tl.arange(0, BLOCK_L)
    offs_t = pid_l * OUT_L - HALO + idx
    own = (idx >= HALO) & (idx < BLOCK_L - HALO)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_SEQ:
        seq_row = b.to(tl.int64) * s_sb
        seq_t = _load_seq(seq_ptr, seq_row, offs_t, L, 0)
    ws = ()
    for k in tl.static_range(WIDTH):
        ws = ws + (tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32),)
    # p and dp are right from position WIDTH - 1 <= HALO of the tile on (the taps of the first positions
    # are clamped into the tile), which is all that own positions and their dx read
    taps = ()
    p = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32) + bias[:, None]
    if ACT or NEED_DW:
        xt = _load_tile(x_ptr, _rows(b, offs_d, s_xb, s_xd), offs_t, mask_d, L)
        for k in tl.static_range(WIDTH):
            tap = _taps(xt, idx, k - (WIDTH - 1))
            if HAS_SEQ and k < WIDTH - 1:
                tap = tl.where((_load_seq(seq_ptr, seq_row, offs_t, L, k - (WIDTH - 1)) == seq_t)[None, :], tap, 0.0)
            taps = taps + (tap,)
            p += ws[k][:, None] * tap
    # dout is zero outside [0, L), so dp is too
    dp = _load_tile(dout_ptr, _rows(b, offs_d, s_gb, s_gd), offs_t, mask_d, L)
    if ACT:
        dp = _silu_grad(dp, p)
    dp_own = tl.where(own[None, :], dp, 0.0)
    # relaxed: the default acq_rel put a MEMBAR.GPU before each add and made the backward 1.5x slower
    if NEED_DW:
        for k in tl.static_range(WIDTH):
            tl.atomic_add(dw_ptr + offs_d * WIDTH + k, tl.sum(taps[k] * dp_own, axis=1), mask=mask_d, sem="relaxed")
    if NEED_DBIAS:
        tl.atomic_add(dbias_ptr + offs_d, tl.sum(dp_own, axis=1), mask=mask_d, sem="relaxed")
    if NEED_DX:
        dx = ws[WIDTH - 1][:, None] * dp
        for j in tl.static_range(1, WIDTH):
            q = _taps(dp, idx, j)
            if HAS_SEQ:
                # dp(t + j) reaches t only from inside t's packed sequence
                q = tl.where((_load_seq(seq_ptr, seq_row, offs_t, L, j) == seq_t)[None, :], q, 0.0)
            dx += ws[WIDTH - 1 - j][:, None] * q
        mask = mask_d[:, None] & (own & (offs_t < L))[None, :]
        dx_rows = _rows(b, offs_d, s_dxb, s_dxd)
        tl.store(dx_ptr + dx_rows[:, None] + offs_t[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _shift_rows(tile, shift: tl.constexpr):
    """tile[:, k + shift, :] at row k of a (BLOCK_D, TK, RP) tile (clamped into the tile; rows whose pick was
    clamped are never used)."""
    if shift == 0:
        return tile
    src = tl.minimum(tl.maximum(tl.arange(0, tile.shape[1]) + shift, 0), tile.shape[1] - 1)
    return tl.gather(tile, tl.broadcast_to(src[None, :, None], tile.shape), axis=1)


@triton.jit
def _load_tile3(ptr, rows, offs, mask_d, mask):
    """The (BLOCK_D, TK, RP) tile at offsets offs (TK, RP) of the rows, fp32, 0 where masked."""
    return tl.load(ptr + rows[:, None, None] + offs[None, :, :], mask=mask_d[:, None, None] & mask[None, :, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _gather_reordered(x_ptr, rows, mask_d, q, K, L, P, RATE: tl.constexpr):
    """x at reordered indices q (a (TK, RP) tile of them), fp32: 0 where q is outside [0, P) or its original
    position is the reordering's padding (≥ L). For the tiles whose taps cross a phase border."""
    ok = (q >= 0) & (q < P)
    qc = tl.minimum(tl.maximum(q, 0), P - 1)
    src = (qc % K) * RATE + qc // K
    return _load_tile3(x_ptr, rows, src, mask_d, ok & (src < L))


@triton.jit
def _phase_tile(pid_k, OWN: tl.constexpr, HALO: tl.constexpr, K, L, RATE: tl.constexpr, RP: tl.constexpr,
                TK: tl.constexpr):
    """Rows k (phase steps, from HALO before the program's own) × columns o (phases, RP ≥ RATE): the step
    index, the original position k·RATE + o, the reordered index o·K + k, and where x is real there."""
    k0 = pid_k * OWN
    kk = k0 - HALO + tl.arange(0, TK)
    oo = tl.arange(0, RP)
    orig = kk[:, None] * RATE + oo[None, :]
    q = oo[None, :] * K + kk[:, None]
    real = (kk >= 0)[:, None] & (oo < RATE)[None, :] & (orig < L)
    return k0, kk, oo, orig, q, real


@triton.jit
def _reorder_tile(DIM, BLOCK_D: tl.constexpr, F, T, K, L, bag_ptr, tile_ptr, RATE: tl.constexpr,
                  BORDER: tl.constexpr, BAGS: tl.constexpr):
    """This program's (step tile, channel tile, batch element), its bag's length L and steps K, and the offsets
    of its bag in x's row and in the reordered row. Channel tiles vary fastest (`_tile`).

    BAGS 0: every row one bag of length L; the launch's tiles are the border ones, [0, F) and [T, n_k), or
    the interior ones, [F, T). BAGS 1 (padded bags): row b's bag is its first bag_ptr[b] tokens (clamped into
    [0, L]); tiles as BAGS 0 over the longest bag, and the kernel skips those that are not its launch's for
    row b. BAGS 2 (packed bags): the launch's tiles are listed in tile_ptr as (bag, step tile) pairs, and
    bag_ptr holds (start, reordered start, size) per bag."""
    j, pid_d, b = _tile(DIM, BLOCK_D)
    x_off = 0
    r_off = 0
    if BAGS == 2:
        bag = tl.load(tile_ptr + 2 * j)
        pid_k = tl.load(tile_ptr + 2 * j + 1)
        x_off = tl.load(bag_ptr + 3 * bag)
        r_off = tl.load(bag_ptr + 3 * bag + 1)
        L = tl.load(bag_ptr + 3 * bag + 2).to(tl.int32)
        K = tl.cdiv(L, RATE)
    else:
        if BORDER:
            pid_k = tl.where(j < F, j, T + j - F)
        else:
            pid_k = F + j
        if BAGS == 1:
            L = tl.minimum(tl.maximum(tl.load(bag_ptr + b), 0), L).to(tl.int32)
            K = tl.cdiv(L, RATE)
    return pid_k, pid_d, b, K, L, x_off, r_off


@triton.jit
def _conv1d_reorder_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, bag_ptr, tile_ptr,
    DIM, L, K, F, s_xb, s_xd, s_ob, s_od,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RATE: tl.constexpr, RP: tl.constexpr,
    BORDER: tl.constexpr, BAGS: tl.constexpr, BLOCK_D: tl.constexpr, TK: tl.constexpr, HALO: tl.constexpr,
):
    """The conv over the reordered sequence, read from x in its own order. A program owns BLOCK_D channels
    and TK − HALO steps k of every phase o, a (BLOCK_D, TK, RP) tile whose original positions k·RATE + o
    are one contiguous run of x (read once, HALO steps before its own) and whose reordered indices o·K + k
    are RATE contiguous runs of out. Tap i of (k, o) is (k − (WIDTH − 1 − i), o), a pick along the rows;
    in the first tiles (BORDER, a launch of their own) the taps of a phase's first WIDTH − 1 steps reach into
    the previous phase's tail and are gathered at their reordered indices instead (`_gather_reordered`).
    Compiled apart, the interior tiles hold 40 registers instead of 156 (H100, L 200k, dim 1024, rate 10,
    bf16: 0.55 ms against 1.39 with the gathers inline, 0.40 for the plain conv)."""
    OWN: tl.constexpr = TK - HALO
    pid_k, pid_d, b, K, L, x_off, r_off = _reorder_tile(DIM, BLOCK_D, F, F, K, L, bag_ptr, tile_ptr, RATE, BORDER, BAGS)
    if pid_k * OWN < K:  # (always, but for padded bags shorter than the longest)
        _reorder_fwd_tile(x_ptr, w_ptr, bias_ptr, out_ptr, DIM, L, K, pid_k, pid_d, b, x_off, r_off,
                          s_xb, s_xd, s_ob, s_od, WIDTH, HAS_BIAS, ACT, RATE, RP, BORDER, BLOCK_D, TK, HALO)


@triton.jit
def _reorder_fwd_tile(x_ptr, w_ptr, bias_ptr, out_ptr, DIM, L, K, pid_k, pid_d, b, x_off, r_off,
                      s_xb, s_xd, s_ob, s_od, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                      RATE: tl.constexpr, RP: tl.constexpr, BORDER: tl.constexpr, BLOCK_D: tl.constexpr,
                      TK: tl.constexpr, HALO: tl.constexpr):
    """One tile of `_conv1d_reorder_fwd_kernel`, in a bag of L tokens (K steps) at x_off in x's row and r_off
    in the reordered row."""
    OWN: tl.constexpr = TK - HALO
    P = K * RATE
    k0, kk, oo, orig, q, real = _phase_tile(pid_k, OWN, HALO, K, L, RATE, RP, TK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    x_rows = _rows(b, offs_d, s_xb, s_xd) + x_off
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ws = ()
    for i in tl.static_range(WIDTH):
        ws = ws + (tl.load(w_ptr + offs_d * WIDTH + i, mask=mask_d, other=0.0).to(tl.float32),)
    acc = tl.zeros((BLOCK_D, TK, RP), dtype=tl.float32) + bias[:, None, None]
    if BORDER:
        for i in tl.static_range(WIDTH):
            acc += ws[i][:, None, None] * _gather_reordered(x_ptr, x_rows, mask_d, q - (WIDTH - 1 - i), K, L, P, RATE)
    else:
        xt = _load_tile3(x_ptr, x_rows, orig, mask_d, real)
        for i in tl.static_range(WIDTH):
            acc += ws[i][:, None, None] * _shift_rows(xt, i - (WIDTH - 1))
    if ACT:
        acc = acc * tl.sigmoid(acc)
    own = ((kk >= k0) & (kk < K))[:, None] & (oo < RATE)[None, :]
    out_rows = _rows(b, offs_d, s_ob, s_od) + r_off
    tl.store(out_ptr + out_rows[:, None, None] + q[None, :, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_d[:, None, None] & own[None, :, :])


@triton.jit
def _tap_grad(dw_ptr, offs_d, mask_d, x_own, dq, i: tl.constexpr, WIDTH: tl.constexpr):
    """dweight[i] += Σ x(s)·dp(s + WIDTH − 1 − i) over the program's own s (`x_own`: its x tile, 0 off its own
    steps; `dq`: dp at s + WIDTH − 1 − i), one relaxed atomic per channel. Counted by x's position s rather
    than the output's t: the same sum, and dq is the pick of dp that dx needs anyway."""
    tl.atomic_add(dw_ptr + offs_d * WIDTH + i, tl.sum(tl.sum(x_own * dq, axis=2), axis=1), mask=mask_d,
                  sem="relaxed")


@triton.jit
def _bias_grad(dbias_ptr, offs_d, mask_d, dp, own, NEED_DBIAS: tl.constexpr):
    """dbias += Σ dp over the program's own steps, one relaxed atomic per channel."""
    if NEED_DBIAS:
        tl.atomic_add(dbias_ptr + offs_d, tl.sum(tl.sum(tl.where(own[None, :, :], dp, 0.0), axis=2), axis=1),
                      mask=mask_d, sem="relaxed")


@triton.jit
def _silu_grad(dout, p):
    """dout · silu'(p)."""
    sig = tl.sigmoid(p)
    return dout * (sig * (1.0 + p * (1.0 - sig)))


@triton.jit
def _conv1d_reorder_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, bag_ptr, tile_ptr,
    DIM, L, K, F, T, s_xb, s_xd, s_gb, s_gd, s_dxb, s_dxd,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RATE: tl.constexpr, RP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DBIAS: tl.constexpr, BORDER: tl.constexpr,
    BAGS: tl.constexpr, BLOCK_D: tl.constexpr, TK: tl.constexpr, HALO: tl.constexpr,
):
    """The forward's tile with HALO steps on both sides: p needs x up to WIDTH − 1 steps before, dx needs dp up
    to WIDTH − 1 steps after. dout is read at the reordered indices (RATE contiguous runs), dx written at the
    original positions (one contiguous run).

    Two launches, each over its own tiles (`_reorder_tiles`): BORDER False the tiles whose own steps stay
    inside their phase, BORDER True the others (the first and last tiles: a phase's first WIDTH − 1 steps
    take taps from the previous phase's tail, its last WIDTH − 1 feed the next phase's head), gathering taps
    and dp at reordered indices. Apart, the common case is compiled without the gathers' registers (together,
    ptxas spilled: H100, 3.3 ms forward + backward at L 200k against 2.95 for a reordered copy and the plain
    conv).

    dweight is summed by x's position s, Σ_s x(s)·dp(s + j), so the picks dp(s + j) that dx takes serve it
    too; summed by the output's position it re-picked the x taps instead (`_tap_grad`)."""
    OWN: tl.constexpr = TK - 2 * HALO
    pid_k, pid_d, b, K, L, x_off, r_off = _reorder_tile(DIM, BLOCK_D, F, T, K, L, bag_ptr, tile_ptr, RATE, BORDER, BAGS)
    k0 = pid_k * OWN
    go = k0 < K
    if BAGS == 1:
        # padded bags: the launches run every row's tiles of both kinds; each takes its own for row b's length
        inside = (k0 >= WIDTH - 1) & (k0 + OWN + WIDTH - 1 <= K)
        if BORDER:
            go = go & (inside == 0)
        else:
            go = go & inside
    if go:
        _reorder_bwd_tile(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, DIM, L, K, pid_k, pid_d, b,
                          x_off, r_off, s_xb, s_xd, s_gb, s_gd, s_dxb, s_dxd, WIDTH, HAS_BIAS, ACT, RATE, RP,
                          NEED_DX, NEED_DW, NEED_DBIAS, BORDER, BLOCK_D, TK, HALO)


@triton.jit
def _reorder_bwd_tile(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, DIM, L, K, pid_k, pid_d, b,
                      x_off, r_off, s_xb, s_xd, s_gb, s_gd, s_dxb, s_dxd, WIDTH: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RATE: tl.constexpr, RP: tl.constexpr,
                      NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DBIAS: tl.constexpr, BORDER: tl.constexpr,
                      BLOCK_D: tl.constexpr, TK: tl.constexpr, HALO: tl.constexpr):
    """One tile of `_conv1d_reorder_bwd_kernel`, in a bag of L tokens (K steps) at x_off in x's row and r_off
    in the reordered row."""
    OWN: tl.constexpr = TK - 2 * HALO
    P = K * RATE
    k0, kk, oo, orig, q, real = _phase_tile(pid_k, OWN, HALO, K, L, RATE, RP, TK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    x_rows = _rows(b, offs_d, s_xb, s_xd) + x_off
    g_rows = _rows(b, offs_d, s_gb, s_gd) + r_off
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ws = ()
    for i in tl.static_range(WIDTH):
        ws = ws + (tl.load(w_ptr + offs_d * WIDTH + i, mask=mask_d, other=0.0).to(tl.float32),)
    in_seq = ((kk >= 0) & (kk < K))[:, None] & (oo < RATE)[None, :]
    own = in_seq & ((kk >= k0) & (kk < k0 + OWN))[:, None]
    dx_mask = mask_d[:, None, None] & (own & real)[None, :, :]
    dx_ptrs = dx_ptr + (_rows(b, offs_d, s_dxb, s_dxd) + x_off)[:, None, None] + orig[None, :, :]
    if BORDER:
        # dout is 0 outside the sequence, so dp is too
        dp = _load_tile3(dout_ptr, g_rows, q, mask_d, in_seq)
        xs = tl.zeros((BLOCK_D, TK, RP), dtype=tl.float32)
        if ACT:
            p = tl.zeros((BLOCK_D, TK, RP), dtype=tl.float32) + bias[:, None, None]
            for i in tl.static_range(WIDTH):
                tap = _gather_reordered(x_ptr, x_rows, mask_d, q - (WIDTH - 1 - i), K, L, P, RATE)
                p += ws[i][:, None, None] * tap
                if i == WIDTH - 1:
                    xs = tap
            dp = _silu_grad(dp, p)
        elif NEED_DW:
            xs = _gather_reordered(x_ptr, x_rows, mask_d, q, K, L, P, RATE)
        _bias_grad(dbias_ptr, offs_d, mask_d, dp, own, NEED_DBIAS)
        if NEED_DX or NEED_DW:
            x_own = tl.where(own[None, :, :], xs, 0.0)
            dx = ws[WIDTH - 1][:, None, None] * dp
            if NEED_DW:
                _tap_grad(dw_ptr, offs_d, mask_d, x_own, dp, WIDTH - 1, WIDTH)
            for j in tl.static_range(1, WIDTH):
                # dp at q + j, across the phase border where q + j crosses it
                qj = q + j
                dq = _load_tile3(dout_ptr, g_rows, qj, mask_d, in_seq & (qj < P))
                if ACT:
                    pj = tl.zeros((BLOCK_D, TK, RP), dtype=tl.float32) + bias[:, None, None]
                    for i in tl.static_range(WIDTH):
                        pj += ws[i][:, None, None] * _gather_reordered(x_ptr, x_rows, mask_d, qj - (WIDTH - 1 - i),
                                                                       K, L, P, RATE)
                    dq = _silu_grad(dq, pj)
                dx += ws[WIDTH - 1 - j][:, None, None] * dq
                if NEED_DW:
                    _tap_grad(dw_ptr, offs_d, mask_d, x_own, dq, WIDTH - 1 - j, WIDTH)
            if NEED_DX:
                # dx in x's (original) order; the reordering's padding (≥ L) has no x
                tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=dx_mask)
    else:
        dp = _load_tile3(dout_ptr, g_rows, q, mask_d, in_seq)
        xt = tl.zeros((BLOCK_D, TK, RP), dtype=tl.float32)
        if ACT or NEED_DW:
            xt = _load_tile3(x_ptr, x_rows, orig, mask_d, real)
        if ACT:
            p = tl.zeros((BLOCK_D, TK, RP), dtype=tl.float32) + bias[:, None, None]
            for i in tl.static_range(WIDTH):
                p += ws[i][:, None, None] * _shift_rows(xt, i - (WIDTH - 1))
            dp = _silu_grad(dp, p)
        _bias_grad(dbias_ptr, offs_d, mask_d, dp, own, NEED_DBIAS)
        if NEED_DX or NEED_DW:
            # the dp picks serve dx and dweight both (own steps s + j stay inside the tile: HALO after)
            x_own = tl.where(own[None, :, :], xt, 0.0)
            dx = ws[WIDTH - 1][:, None, None] * dp
            if NEED_DW:
                _tap_grad(dw_ptr, offs_d, mask_d, x_own, dp, WIDTH - 1, WIDTH)
            for j in tl.static_range(1, WIDTH):
                dq = _shift_rows(dp, j)
                dx += ws[WIDTH - 1 - j][:, None, None] * dq
                if NEED_DW:
                    _tap_grad(dw_ptr, offs_d, mask_d, x_own, dq, WIDTH - 1 - j, WIDTH)
            if NEED_DX:
                tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=dx_mask)


# ---------------------------------------------------------------------------------------------
# Python side: tiles, checks, autograd


def _config(width: int, backward: bool) -> dict:
    """Tiles: BLOCK_D channels × BLOCK_L positions, num_warps, and HALO positions of the tile that are only
    read: before the program's own in the forward, on both sides in the backward. HALO 8 keeps every tile's
    first position 16-byte aligned in bf16 (32 in fp32), so the tile loads and stores are vectors.

    Forward 16 × 256, 4 warps (a warp holds whole 256-position rows, so the taps are warp shuffles; 3%
    of the tile is halo); backward 8 × 256, 4 warps (6% halo). At dim 1024, L 200k, bf16 on an H200 the
    sweep of `benchmarks/conv1d.py --sweep` gave the backward 0.63 ms at 8 × 256, 0.77 at 16 × 256 and
    1.2 at 16 × 128 (more halo, more atomics); forward tiles from 8 × 512 to 32 × 256 were within the
    run-to-run spread (0.36-0.46 ms)."""
    if backward:
        cfg = dict(BLOCK_D=8, BLOCK_L=256, num_warps=4)
    else:
        cfg = dict(BLOCK_D=16, BLOCK_L=256, num_warps=4)
    cfg["HALO"] = 0 if width == 1 else 8
    override = (TILE_OVERRIDE or {}).get("bwd" if backward else "fwd")
    if override:
        cfg.update(override)
    if not width - 1 <= cfg["HALO"] or _own(cfg, backward) < 1:
        raise ValueError(f"tiles {cfg}: HALO must be at least width - 1 = {width - 1} and leave own positions")
    return cfg


def _reorder_config(width: int, rate: int, backward: bool) -> dict:
    """Tiles of the reordered conv: BLOCK_D channels × TK steps × RP ≥ rate phases (a power of two; the
    columns past `rate` are masked), HALO = width − 1 steps only read (before the own steps in the forward,
    on both sides in the backward). Forward 4 channels × ~1024 positions (TK · RP), backward 8 × ~512, both
    over 8 warps: 16 tile elements per thread.

    H100, dim 1024, L 200k, rate 10, bf16, 2026-11-28 (kernels/NOTES.md, session 21). The backward with every
    gradient (dx, dweight, dbias): 1.24 ms at 8 channels × 32 steps, 8 warps; 1.71 at 8 × 32, 4 warps; 1.85
    at 16 × 32; 2.10 at 16 × 16; 2.15 at 8 × 64; 3.65 at 4 × 32, 4 warps (the previous default); 10.4 at
    4 × 32, 8 warps; the plain conv's backward 0.65. The forward: 0.555 ms at 4 × 64, within 4% at 8 × 64 and
    4 × 128, 0.65 at 16 × 32."""
    rp = triton.next_power_of_2(rate)
    if backward:
        cfg = dict(BLOCK_D=8, TK=max(8, 512 // rp), HALO=width - 1, num_warps=8)
    else:
        cfg = dict(BLOCK_D=4, TK=max(8, 1024 // rp), HALO=width - 1, num_warps=8)
    override = (TILE_OVERRIDE or {}).get("rbwd" if backward else "rfwd")
    if override:
        cfg.update(override)
    cfg["RP"] = rp
    if cfg["HALO"] < width - 1 or _reorder_own(cfg, backward) < 1:
        raise ValueError(f"tiles {cfg}: HALO must be at least width - 1 = {width - 1} steps and leave own steps")
    return cfg


def _own(cfg: dict, backward: bool) -> int:
    return cfg["BLOCK_L"] - (2 if backward else 1) * cfg["HALO"]


def _reorder_own(cfg: dict, backward: bool) -> int:
    return cfg["TK"] - (2 if backward else 1) * cfg["HALO"]


def _grid(cfg: dict, backward: bool, batch: int, dim: int, length: int) -> tuple:
    # tiles on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535), see `_tile`
    return (triton.cdiv(length, _own(cfg, backward)) * triton.cdiv(dim, cfg["BLOCK_D"]), batch)


def _launch(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "maxnreg") if k in cfg}


def _note(name: str, kern) -> None:
    regs, spills = getattr(kern, "n_regs", None), getattr(kern, "n_spills", None)
    if regs is not None:
        KERNEL_RESOURCES[name] = dict(regs=regs, spills=spills)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _new(shape, like: torch.Tensor) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype)
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x, weight, bias, seq_idx, activation, reorder=None) -> None:
    if x.dtype not in _DTYPES:
        raise TritonConvError(f"x: dtype {x.dtype} not supported by the Triton conv1d (fp32, fp16, bf16)")
    if x.dim() != 3 or min(x.shape) < 1:
        raise TritonConvError(f"x must be a non-empty (batch, dim, length), got {tuple(x.shape)}")
    batch, dim, length = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim or weight.dtype not in _WEIGHT_DTYPES:
        raise TritonConvError(f"weight must be a float (dim, width) with dim {dim}, got {weight.dtype} {tuple(weight.shape)}")
    width = weight.shape[1]
    if not 1 <= width <= MAX_WIDTH:
        raise TritonConvError(f"width {width} not supported by the Triton conv1d (1 to {MAX_WIDTH})")
    if bias is not None and (bias.shape != (dim,) or bias.dtype not in _WEIGHT_DTYPES):
        raise TritonConvError(f"bias must be a float ({dim},), got {bias.dtype} {tuple(bias.shape)}")
    if seq_idx is not None and (seq_idx.shape != (batch, length) or seq_idx.dtype not in _INDEX_DTYPES):
        raise TritonConvError(f"seq_idx must be int32/int64 ({batch}, {length}), got {seq_idx.dtype} {tuple(seq_idx.shape)}")
    if activation not in ACTIVATIONS:
        raise TritonConvError(f"activation {activation!r} not supported by the Triton conv1d ('silu' or None)")
    if reorder is not None:
        if isinstance(reorder, bool) or not isinstance(reorder, int) or reorder < 1:
            raise TritonConvError(f"reorder must be a positive int, got {reorder!r}")
        if seq_idx is not None:
            raise TritonConvError("reorder and seq_idx cannot be combined")
        if reorder > MAX_REORDER_RATE:
            raise TritonConvError(f"reorder {reorder} exceeds the kernel's limit {MAX_REORDER_RATE}")
    if batch > 65535:
        raise TritonConvError(f"x: batch {batch} exceeds the kernel's grid (65535)")
    if not x.is_cuda and not _interpreting():
        raise TritonConvError("the Triton conv1d runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")




def _fwd(x, weight, bias, seq_idx, act: bool) -> torch.Tensor:
    batch, dim, length = x.shape
    width = weight.shape[1]
    out = _new((batch, dim, length), x)
    cfg = _config(width, backward=False)
    tiles = {k: cfg[k] for k in ("BLOCK_D", "BLOCK_L", "HALO")}
    kern = _conv1d_fwd_kernel[_grid(cfg, False, batch, dim, length)](
        x, weight, bias if bias is not None else weight, seq_idx if seq_idx is not None else x, out,
        dim, length, x.stride(0), x.stride(1), seq_idx.stride(0) if seq_idx is not None else 0,
        out.stride(0), out.stride(1),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, ACT=act,
        **tiles, **_launch(cfg),
    )
    _note("fwd", kern)
    return out


def _bwd(dout, x, weight, bias, seq_idx, act: bool, need_dx: bool, need_dw: bool, need_dbias: bool):
    batch, dim, length = x.shape
    width = weight.shape[1]
    dout = _unit_stride(dout)
    dx = _new((batch, dim, length), x) if need_dx else None
    # atomics add into these, so they start at zero (not poisoned)
    dw = torch.zeros((dim, width), device=x.device, dtype=torch.float32) if need_dw else None
    dbias = torch.zeros((dim,), device=x.device, dtype=torch.float32) if need_dbias else None
    cfg = _config(width, backward=True)
    tiles = {k: cfg[k] for k in ("BLOCK_D", "BLOCK_L", "HALO")}
    kern = _conv1d_bwd_kernel[_grid(cfg, True, batch, dim, length)](
        x, weight, bias if bias is not None else weight, seq_idx if seq_idx is not None else x,
        dout, dx if dx is not None else dout, dw if dw is not None else weight, dbias if dbias is not None else weight,
        dim, length, x.stride(0), x.stride(1), seq_idx.stride(0) if seq_idx is not None else 0,
        dout.stride(0), dout.stride(1),
        dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
        WIDTH=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, ACT=act,
        NEED_DX=need_dx, NEED_DW=need_dw, NEED_DBIAS=need_dbias,
        **tiles, **_launch(cfg),
    )
    _note("bwd", kern)
    return dx, dw, dbias


def _reorder_tiles(cfg: dict, backward: bool, width: int, steps: int) -> tuple[int, int, int]:
    """(n_k, F, T): the step tiles [0, n_k) split into the border ones, [0, F) and [T, n_k), and the interior
    ones, [F, T). A tile is a border one where a phase's first WIDTH − 1 steps are among its own (their taps
    reach into the previous phase: k0 < width − 1) or, in the backward, its last WIDTH − 1 steps feed another
    phase's dx (k0 + own + width − 1 > steps)."""
    own = _reorder_own(cfg, backward)
    n_k = triton.cdiv(steps, own)
    first = min(n_k, triton.cdiv(width - 1, own))
    tail = n_k
    if backward:
        tail = max(first, min(n_k, (steps - own - width + 1) // own + 1))
    return n_k, first, tail


def _device_rows(rows: list, dtype, device) -> torch.Tensor:
    """Host int rows as one flat tensor on `device`, copied without synchronising (pinned memory)."""
    t = torch.tensor(rows, dtype=dtype).reshape(-1)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _bag_plan(bags, cfg: dict, backward: bool, width: int, rate: int, length: int, device):
    """(BAGS mode, bag array or None, launches): each launch (border, programs along the steps, tile list or
    None, F, T) for `_reorder_tile`. Packed bags' plans are cached on their ReorderBags."""
    if bags is None or isinstance(bags, torch.Tensor):
        n_k, first, tail = _reorder_tiles(cfg, backward, width, -(-length // rate))
        if bags is None:
            return 0, None, [(False, tail - first, None, first, tail), (True, first + n_k - tail, None, first, tail)]
        # padded bags: the border launch of the backward runs every tile (the kernel keeps those of its kind
        # for the row's length); the forward's border tiles are the first ones whatever the length
        return 1, bags.to(torch.int32).contiguous(), [(False, n_k - first, None, first, first),
                                                      (True, n_k if backward else first, None, first, first)]
    key = ("conv", backward, width, rate, cfg["TK"], cfg["HALO"], str(device))
    if key not in bags.cache:
        interior, border = [], []
        for i, n in enumerate(bags.sizes):
            n_k, first, tail = _reorder_tiles(cfg, backward, width, -(-n // rate))
            interior += [(i, k) for k in range(first, tail)]
            border += [(i, k) for k in list(range(first)) + list(range(tail, n_k))]
        rows = [(a, r, n) for a, r, n in zip(bags.starts, bags.reordered_starts(rate), bags.sizes)]
        launches = [(brd, len(t), _device_rows(t, torch.int32, device) if t else None, 0, 0)
                    for brd, t in ((False, interior), (True, border))]
        bags.cache[key] = (_device_rows(rows, torch.int64, device), launches)
    bag_rows, launches = bags.cache[key]
    return 2, bag_rows, launches


def _reorder_launches(kernel, cfg: dict, plan: tuple, backward: bool, batch: int, dim: int, head: tuple, tail: tuple,
                      consts: dict, name: str, stand_in: torch.Tensor):
    """The interior tiles, then the border ones, each launch over its own tiles only (see `_reorder_tile`):
    kernel(*head, bag array, tile list, *tail[:3], F, [T (the backward),] *tail[3:])."""
    mode, bag_rows, launches = plan
    n_d = triton.cdiv(dim, cfg["BLOCK_D"])
    for border, count, tiles, first, last in launches:
        if count:
            fts = (first, last) if backward else (first,)
            kern = kernel[(count * n_d, batch)](
                *head, bag_rows if bag_rows is not None else stand_in, tiles if tiles is not None else stand_in,
                *tail[:3], *fts, *tail[3:], BORDER=border, BAGS=mode, **consts)
            _note(name + ("_border" if border else ""), kern)


def _bag_zeros(bags, length: int) -> bool:
    """Whether positions outside the bags exist (they get zeros: outputs there, x's gradient there)."""
    return bags is not None and not (isinstance(bags, ReorderBags) and sum(bags.sizes) == length)


def _reorder_fwd(x, weight, bias, act: bool, rate: int, bags=None) -> torch.Tensor:
    batch, dim, length = x.shape
    width = weight.shape[1]
    steps = -(-length // rate)
    out_len = reordered_length(bags, length, rate)
    # padded bags leave their rows' ends unwritten: zeros there (packed ones fill the reordered row)
    out = (torch.zeros((batch, dim, out_len), device=x.device, dtype=x.dtype) if isinstance(bags, torch.Tensor)
           else _new((batch, dim, out_len), x))
    cfg = _reorder_config(width, rate, backward=False)
    plan = _bag_plan(bags, cfg, False, width, rate, length, x.device)
    consts = dict(WIDTH=width, HAS_BIAS=bias is not None, ACT=act, RATE=rate,
                  **{k: cfg[k] for k in ("RP", "BLOCK_D", "TK", "HALO")}, **_launch(cfg))
    _reorder_launches(_conv1d_reorder_fwd_kernel, cfg, plan, False, batch, dim,
                      (x, weight, bias if bias is not None else weight, out),
                      (dim, length, steps, x.stride(0), x.stride(1), out.stride(0), out.stride(1)),
                      consts, "fwd_reorder", x)
    return out


def _reorder_bwd(dout, x, weight, bias, act: bool, need_dx: bool, need_dw: bool, need_dbias: bool, rate: int,
                 bags=None):
    batch, dim, length = x.shape
    width = weight.shape[1]
    steps = -(-length // rate)
    dout = _unit_stride(dout)
    dx = None
    if need_dx:
        # x outside the bags gets no gradient
        dx = (torch.zeros((batch, dim, length), device=x.device, dtype=x.dtype) if _bag_zeros(bags, length)
              else _new((batch, dim, length), x))
    cfg = _reorder_config(width, rate, backward=True)
    plan = _bag_plan(bags, cfg, True, width, rate, length, x.device)
    # atomics add into these, so they start at zero (not poisoned)
    dw = torch.zeros((dim, width), device=x.device, dtype=torch.float32) if need_dw else None
    dbias = torch.zeros((dim,), device=x.device, dtype=torch.float32) if need_dbias else None
    consts = dict(WIDTH=width, HAS_BIAS=bias is not None, ACT=act, RATE=rate,
                  NEED_DX=need_dx, NEED_DW=need_dw, NEED_DBIAS=need_dbias,
                  **{k: cfg[k] for k in ("RP", "BLOCK_D", "TK", "HALO")}, **_launch(cfg))
    _reorder_launches(_conv1d_reorder_bwd_kernel, cfg, plan, True, batch, dim,
                      (x, weight, bias if bias is not None else weight, dout, dx if dx is not None else dout,
                       dw if dw is not None else weight, dbias if dbias is not None else weight),
                      (dim, length, steps, x.stride(0), x.stride(1), dout.stride(0), dout.stride(1),
                       dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0),
                      consts, "bwd_reorder", x)
    return dx, dw, dbias


class _Conv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, act, rate=0, bags=None):
        out = _reorder_fwd(x, weight, bias, act, rate, bags) if rate else _fwd(x, weight, bias, seq_idx, act)
        # x, not the pre-activation: the backward recomputes it (a bag of 200k patches at dim 2048 is
        # 0.8 GB per saved bf16 tensor)
        ctx.save_for_backward(x, weight, bias, seq_idx, bags if isinstance(bags, torch.Tensor) else None)
        ctx.act, ctx.rate = act, rate
        ctx.packed = bags if isinstance(bags, ReorderBags) else None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx, lengths = ctx.saved_tensors
        need_dx, need_dw, need_dbias = ctx.needs_input_grad[:3]
        need_dbias = need_dbias and bias is not None
        if not (need_dx or need_dw or need_dbias):
            return None, None, None, None, None, None, None
        if ctx.rate:
            bags = lengths if lengths is not None else ctx.packed
            dx, dw, dbias = _reorder_bwd(dout, x, weight, bias, ctx.act, need_dx, need_dw, need_dbias, ctx.rate, bags)
        else:
            dx, dw, dbias = _bwd(dout, x, weight, bias, seq_idx, ctx.act, need_dx, need_dw, need_dbias)
        return (dx, dw.to(weight.dtype) if dw is not None else None,
                dbias.to(bias.dtype) if dbias is not None else None, None, None, None, None)


def causal_conv1d(x, weight, bias=None, seq_idx=None, activation="silu", reorder=None, bags=None):
    """The Triton backend of `wsimamba.ops.causal_conv1d` (arguments validated there).

    x (batch, dim, length) fp32/fp16/bf16, weight (dim, width), bias (dim,) or None, seq_idx (batch, length)
    int32/int64 or None, activation "silu" or None. Returns out (batch, dim, length), contiguous, in x's
    dtype; differentiable in x, weight and bias. x with a non-unit stride along the length is copied first.

    reorder (a positive int r, or None): the conv of `stride_reorder(x, r)` (zero-padded to K·r positions,
    K = ceil(length / r), then phase by phase), read from x in its own order: out is (batch, dim, K·r) in
    the reordered order, and dx comes back in x's order. Not with seq_idx.

    Raises TritonConvError for inputs the kernel does not take (dtype, width > MAX_WIDTH, device, a reorder
    past MAX_REORDER_RATE).
    """
    _check(x, weight, bias, seq_idx, activation, reorder)
    x = _unit_stride(x)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    seq_idx = seq_idx.contiguous() if seq_idx is not None else None
    rate = int(reorder) if reorder is not None and (reorder > 1 or bags is not None) else 0
    return _Conv1dFn.apply(x, weight, bias, seq_idx, activation == "silu", rate, bags)
