"""Fused selective scan in Triton: forward and locally bidirectional (LBMamba), forward and backward.

Contract: DESIGN.md "The selective scan contract"; `wsimamba.ops.selective_scan(..., backend="triton")`
calls `selective_scan` below with validated arguments. Shapes (mamba-ssm layout):

    u, delta, z   (batch, dim, length)        fp32 / fp16 / bf16
    A             (dim, state)                fp32
    B, C          (batch, groups, state, length)  (3-D (batch, state, length) = one group)
    D, delta_bias (dim,)                      fp32

How the kernels work (kernels/NOTES.md has the reasoning and the measurements):

- The forward and backward that run by default (`FORWARD = BACKWARD = "auto"`, state ≤ 64 and LB
  windows ≤ 16) are the sequential ones further down: each thread walks the length position by
  position for its channel and states, the backward in blocks from the end, recomputing h from the
  state the forward saved entering each block. The scan-based kernels below are the fallback for
  larger states and windows (`BACKWARD = "scan"` pairs the sequential forward with the scan backward;
  the forward then saves states at the scan chunks instead).
- The sequential kernels ask for the next block's rows (B, C, u, Δ, z; in the backward also dout and
  the saved state) to be brought into L1 a block ahead (`_prefetch`, PTX `prefetch.global.L1`): B
  and C are read by every channel tile and come from L2, and the compiler places the loads only a few
  dozen instructions before their use. A hint with no effect on results; off in the interpreter, which
  has no inline assembly. At the default tiles (state 16, fp32 B and C) B and C instead come by
  `cp.async` into shared memory a block ahead and are read from there by every walk (`SMEM_ROWS`:
  `_smem_fill`, `_smem_row`), so they hold no registers between the walks. The LB forward also loads u
  and Δ into registers a block ahead (`PREFETCH`), after the walks in program order (`LATE_NEXT`): ptxas
  shares scoreboards between loads, and a load issued before the walks had walk-back FMAs wait on it
  (for memory) a few dozen instructions later (`kernels.sass_check` finds such waits in the SASS).
- At its GPU defaults (state 16) the sequential backward picks a position's Δ, Δu, dy out of its tiles
  with one PTX `shfl.idx`, sums dB, dC over its 8 channels by a reduce-scatter of PTX butterfly
  shuffles over a sub-block's positions (`_pick_row`, `_fold`), and finishes each position's sums
  over states two positions per pair of shuffles (`_state_sum`). The plain forward picks Δ and Δu
  with one `shfl.idx` too (`_pick_row` with 2 lanes). These assume the tile layouts Triton chose
  when they were written, as do the shared-memory row reads; `_bwd_seq` and `_fwd_seq` read the
  compiled kernel's layout before the first launch of each specialization (`_shuffles_fit`) and use
  the `tl` form and loads where it differs (fp32 inputs in the forward, rows not aligned to 16 bytes).
- Packed sequences (`seq_idx`, HAS_RESET): the sequential kernels read a reset flag per position (1
  where a sequence starts) and cut the carried state there: the forward walk's h, both segment
  summaries (a running factor that drops to 0 once the walk passes a start), and in the backward the
  recomputed h and the adjoint's carry ρ = a λ. The local window's terms keep every decay: they never
  cross a window's end, so a sequence that starts at a window's start (checked) needs nothing more.
  The reverse directions run the flipped ids. The scan-based kernels refuse `seq_idx`.
- Scan-based forward and backward: one program owns a tile of BLOCK_D channels of one batch
  element and walks the length in chunks of T positions, carrying the state h (BLOCK_D, state) on chip from chunk to chunk. Within a
  chunk, each state n is a (BLOCK_D, T) tile: a = exp(Δ A_n), b = Δ B_n u, and the recurrence
  h_t = a_t h_{t-1} + b_t is an associative scan along T. Nothing of size (batch, dim, length,
  state) touches memory; B_n and C_n are read once per tile of channels.
- Local bidirectionality rides on the same a and b: g_t = ã_t g_{t+1} + b_t is a reverse scan with
  ã = a except 0 at every window end, and H_t = h_t + a_t g_{t+1} = h_t + g_t - b_t needs no shift.
  Chunks advance by a whole number of windows, so windows never straddle chunks.
- The scan forward saves the state entering every chunk; the scan backward walks chunks in reverse,
  recomputes h from those states, and gets the adjoints from scans whose combine functions fold
  in the one-step shift the adjoint recurrences need (λ_t = dH_t + a_{t+1} λ_{t+1} and, for the
  window term, μ_t = dH_t + ã_{t-1} μ_{t-1}), so no extra exponentials and no register shifts.
  dB and dC are reduced over the channel tile on chip before one atomic add per (state, position).
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

DIRECTIONS = ("forward", "reverse", "bidirectional", "local_bidirectional")
MAX_STATE = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# exp(x) = exp2(x · log2 e): scaling A once per state saves a multiply per element-state
LOG2E = tl.constexpr(1.4426950408889634)
# A segment summary stops walking back once every decay product is below 2^-64 (see the sequential
# forward's notes). Not 0: the smallest subnormal times a factor above 1/2 rounds back to itself.
SUMMARY_CUTOFF = tl.constexpr(5.421010862427522e-20)


class TritonScanError(ValueError):
    """Arguments the Triton kernel cannot take (the dispatch layer turns it into a WsimambaError)."""


# ---------------------------------------------------------------------------------------------
# Scan combine functions. Triton's reverse scan calls combine(later, earlier).


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # forward: (earlier, later); the composition "apply 1, then 2" of x -> a x + b
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _lambda_combine(f_r, p_r, x_r, f_l, p_l, x_l):
    # reverse scan for λ_t = dH_t + a_{t+1} λ_{t+1}. A segment [s..e] is (f, P, X) with
    # λ_s = X + P · (a_{e+1} λ_{e+1}) and f = a_s, which the segment to its left multiplies in.
    k = p_l * f_r
    return f_l, k * p_r, x_l + k * x_r


@triton.jit
def _mu_combine(l_l, p_l, x_l, l_r, p_r, x_r):
    # forward scan for μ_t = dH_t + ã_{t-1} μ_{t-1}. A segment [s..e] is (l, P, X) with
    # μ_e = X + P · (ã_{s-1} μ_{s-1}) and l = ã_e, which the segment to its right multiplies in.
    k = p_r * l_l
    return l_r, k * p_l, x_r + k * x_l


@triton.jit
def _softplus(x):
    """PyTorch's softplus (beta 1, threshold 20) as max(x, 0) + log1p(t), t = exp(-|x|) in (0, 1].

    log1p(t) = t·P(t) with P a degree-8 polynomial fitted to log1p(t)/t on [0, 1] (relative error
    3e-8 in exact arithmetic, ~2e-7 after fp32 rounding; `tests/test_triton_scan.py` checks it on a
    dense grid). One exponential and 9 FMAs, where `tl.log(1 + tl.exp(x))` compiled to about 33
    instructions (libdevice's log and its range handling: kernels/NOTES.md has what that cost) and
    returned 0 below x ≈ -17, where 1 + e^x rounds to 1."""
    t = tl.exp2(-tl.abs(x) * LOG2E)
    p = tl.fma(t, 0.0052327057, -0.029505285)
    p = tl.fma(p, t, 0.07822603)
    p = tl.fma(p, t, -0.13663252)
    p = tl.fma(p, t, 0.1910601)
    p = tl.fma(p, t, -0.24842983)
    p = tl.fma(p, t, 0.33319098)
    p = tl.fma(p, t, -0.49999493)
    p = tl.fma(p, t, 0.99999994)
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + t * p)


@triton.jit
def _column(tile, n_idx, n: tl.constexpr):
    return tl.sum(tl.where(n_idx[None, :] == n, tile, 0.0), axis=1)


@triton.jit
def _lane(tile, t_idx, t: tl.constexpr):
    return tl.sum(tl.where(t_idx[None, :] == t, tile, 0.0), axis=1)


# ---------------------------------------------------------------------------------------------
# Forward
#
# The length is cut into segments of CPS chunks, one program per (channel tile, batch, segment),
# so that a single long bag (batch 1) still fills the GPU. A first, cheaper kernel summarises each
# segment as the affine map h_end = P · h_start + X (from zero, P = exp(A ΣΔ), X = Σ_t b_t
# exp(A (S_end − S_t)) with S the running sum of Δ: no scan, and every exponent ≤ 0); each
# program of the main kernel then folds the summaries of the segments before it into its start state.


@triton.jit
def _load_bias(bias_ptr, offs_d, mask_d, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    return bias


@triton.jit
def _load_dt(dt_ptr, off, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    dt = tl.load(dt_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt = dt + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)  # padding: a = 1, b = 0 passes the state through


@triton.jit
def _fold_step(x_ptr, p_ptr, soff, s2, acc, P):
    """One summary into a `_fold_nearest` sum, where the product of P so far is not yet below 2^-64."""
    live = P >= SUMMARY_CUTOFF
    acc += P * tl.load(x_ptr + soff + s2, mask=live, other=0.0)
    return acc, P * tl.load(p_ptr + soff + s2, mask=live, other=0.0)


@triton.jit
def _fold_nearest(x_ptr, p_ptr, soff, mask_d, first, count, step: tl.constexpr):
    """Σ_k (Π_{j<k} P_j) X_k over the summaries of segments first, first + step, ... (count of them), nearest
    first: X_k and P_k read at soff + first + k·step. Each channel and state stops reading once its product
    of P is below 2^-64 (the summaries' own cut-off: what is left would enter under 2^-64 times its size),
    so the loop no longer waits on one L2 load per segment (folded in order from the farthest, the last
    segments' programs started microseconds after the first ones). Masks, not a loop that stops: a `while`
    with a reduction here made ptxas build the LB forward with 64 registers and 2.8 KB of stack."""
    acc = tl.zeros(soff.shape, dtype=tl.float32)
    P = tl.where(mask_d[:, None], 1.0, 0.0) + acc
    # the two loops as the forward's and backward's folds were written: one `range(0, count)` for both compiled
    # the backward's prologue differently (unrolled) from the code measured; these give the same SASS
    if step > 0:
        for s2 in range(first, first + count):
            acc, P = _fold_step(x_ptr, p_ptr, soff, s2, acc, P)
    else:
        for k in range(0, count):
            acc, P = _fold_step(x_ptr, p_ptr, soff, first - k, acc, P)
    return acc


@triton.jit
def _state_entering(sx_ptr, sp_ptr, b, seg, offs_d, mask_d, n_idx, DIM, n_seg, N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The state entering segment `seg` from the summaries h_end = P·h_start + X of the segments before it
    (both forwards write them in this layout): X_{seg-1} + P_{seg-1} X_{seg-2} + P_{seg-1} P_{seg-2} X_{seg-3} ..."""
    soff = b * DIM * N * n_seg + offs_d[:, None] * (N * n_seg) + n_idx[None, :] * n_seg
    return _fold_nearest(sx_ptr, sp_ptr, soff, mask_d, seg - 1, seg, -1)


@triton.jit
def _channel_accumulators(D_ptr, offs_d, mask_d, N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_D: tl.constexpr):
    """A backward program's D for its channels (0 without D) and zeroed accumulators for dA, dD, dΔ-bias."""
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    return Dv, tl.zeros((BLOCK_D, N), dtype=tl.float32), tl.zeros((BLOCK_D,), dtype=tl.float32), tl.zeros((BLOCK_D,), dtype=tl.float32)


@triton.jit
def _add_channel_grads(dA_ptr, dD_ptr, dbias_ptr, offs_d, mask_d, n_idx, dA_acc, dD_acc, dbias_acc, N: tl.constexpr,
                       HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Add a backward program's dA, dD and dΔ-bias (summed over its length) into the outputs."""
    tl.atomic_add(dA_ptr + offs_d[:, None] * N + n_idx[None, :], dA_acc, mask=mask_d[:, None])
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias_acc, mask=mask_d)


@triton.jit
def _carry_entering(sk_ptr, sj_ptr, b, seg, offs_d, mask_d, n_idx, DIM, n_seg, N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The adjoint carry a·λ entering segment `seg` from its right, from the summaries c_in = K·c_out + J of
    the segments after it (both backwards write them in this layout): J_{seg+1} + K_{seg+1} J_{seg+2} + ..."""
    soff = b * DIM * N * n_seg + offs_d[:, None] * (N * n_seg) + n_idx[None, :] * n_seg
    return _fold_nearest(sj_ptr, sk_ptr, soff, mask_d, seg + 1, n_seg - 1 - seg, 1)


@triton.jit
def _fwd_segment_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, sx_ptr, sp_ptr,
    L, DIM, DPG, n_chunks, CPS, n_seg,
    s_ub, s_ud, s_tb, s_td, s_Bb, s_Bg, s_Bn, s_Ad, s_An,
    N: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, STEP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    g = d0 // DPG
    t_idx = tl.arange(0, T)
    n_idx = tl.arange(0, N)
    in_step = t_idx < STEP
    bias = _load_bias(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    X = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    P = tl.full((BLOCK_D, N), 1.0, dtype=tl.float32)
    c_end = tl.minimum((seg + 1) * CPS, n_chunks)
    for c in range(seg * CPS, c_end):
        offs_t = c * STEP + t_idx
        mask_t = in_step & (offs_t < L)
        mask = mask_d[:, None] & mask_t[None, :]
        row = offs_d[:, None]
        u = tl.load(u_ptr + b * s_ub + row * s_ud + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        dt = _load_dt(dt_ptr, b * s_tb + row * s_td + offs_t[None, :], mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        run = tl.cumsum(dt, axis=1)
        total = tl.sum(dt, axis=1)
        rest = total[:, None] - run  # Σ Δ after position t, ≥ 0
        for n in tl.static_range(N):
            An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0)
            Bn = tl.load(B_ptr + b * s_Bb + g * s_Bg + n * s_Bn + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            x_c = tl.sum(dtu * Bn[None, :] * tl.exp2((An * LOG2E)[:, None] * rest), axis=1)
            p_c = tl.exp(An * total)
            sel = n_idx[None, :] == n
            X = tl.where(sel, p_c[:, None] * X + x_c[:, None], X)
            P = tl.where(sel, P * p_c[:, None], P)
    off = b * DIM * N * n_seg + offs_d[:, None] * (N * n_seg) + n_idx[None, :] * n_seg + seg
    tl.store(sx_ptr + off, X, mask=mask_d[:, None])
    tl.store(sp_ptr + off, P, mask=mask_d[:, None])


@triton.jit
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, hs_ptr, last_ptr, sx_ptr, sp_ptr,
    L, DIM, DPG, n_chunks, CPS, n_seg,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_ob, s_od,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Ad, s_An,
    s_hb, s_hd, s_hn, s_hc,
    N: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, STEP: tl.constexpr, WINDOW: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, SAVE_LAST: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    g = d0 // DPG  # the whole tile lies in one group (the launcher guarantees it)
    t_idx = tl.arange(0, T)
    n_idx = tl.arange(0, N)
    in_step = t_idx < STEP
    if WINDOW > 0:
        keep = ((t_idx + 1) % WINDOW) != 0  # ã = 0 at every window end: g restarts
    bias = _load_bias(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    hc = _state_entering(sx_ptr, sp_ptr, b, seg, offs_d, mask_d, n_idx, DIM, n_seg, N, BLOCK_D)
    c_end = tl.minimum((seg + 1) * CPS, n_chunks)
    for c in range(seg * CPS, c_end):
        offs_t = c * STEP + t_idx
        mask_t = in_step & (offs_t < L)
        mask = mask_d[:, None] & mask_t[None, :]
        row = offs_d[:, None]
        if SAVE_STATES:
            tl.store(hs_ptr + b * s_hb + row * s_hd + n_idx[None, :] * s_hn + c * s_hc, hc, mask=mask_d[:, None])
        u = tl.load(u_ptr + b * s_ub + row * s_ud + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        dt = _load_dt(dt_ptr, b * s_tb + row * s_td + offs_t[None, :], mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        for n in tl.static_range(N):
            An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0)
            Bn = tl.load(B_ptr + b * s_Bb + g * s_Bg + n * s_Bn + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_ptr + b * s_Cb + g * s_Cg + n * s_Cn + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            a = tl.exp2(dt * (An * LOG2E)[:, None])
            bx = dtu * Bn[None, :]
            pa, px = tl.associative_scan((a, bx), 1, _affine_combine)
            h = pa * _column(hc, n_idx, n)[:, None] + px
            if WINDOW > 0:
                am = tl.where(keep[None, :], a, 0.0)
                _, gg = tl.associative_scan((am, bx), 1, _affine_combine, reverse=True)
                y += Cn[None, :] * (h + gg - bx)
            else:
                y += Cn[None, :] * h
            h_end = _lane(h, t_idx, T - 1)
            hc = tl.where(n_idx[None, :] == n, h_end[:, None], hc)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + row * s_zd + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + b * s_ob + row * s_od + offs_t[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    if SAVE_LAST:
        if seg == n_seg - 1:
            lp = last_ptr + b * DIM * N + offs_d[:, None] * N + n_idx[None, :]
            tl.store(lp, hc, mask=mask_d[:, None])


# ---------------------------------------------------------------------------------------------
# Backward
#
# Segments again: the adjoint carry c = a_s λ_s flows from the end, so a first kernel summarises
# each segment as c_in = K · c_out + J (λ from a zero carry is Σ_t dH_t exp(A (S_t − S_s)): no
# scan, exponents ≤ 0), and each program folds the summaries of the segments after it.


@triton.jit
def _bwd_segment_kernel(
    u_ptr, dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, sk_ptr, sj_ptr,
    L, DIM, DPG, n_chunks, CPS, n_seg,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_gb, s_gd, s_Cb, s_Cg, s_Cn, s_Ad, s_An,
    N: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, STEP: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2) + 1  # segment 0's summary is never needed
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    g = d0 // DPG
    t_idx = tl.arange(0, T)
    n_idx = tl.arange(0, N)
    in_step = t_idx < STEP
    bias = _load_bias(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    K = tl.full((BLOCK_D, N), 1.0, dtype=tl.float32)
    J = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    c_lo = seg * CPS
    c_hi = tl.minimum((seg + 1) * CPS, n_chunks)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        offs_t = c * STEP + t_idx
        mask_t = in_step & (offs_t < L)
        mask = mask_d[:, None] & mask_t[None, :]
        row = offs_d[:, None]
        dt = _load_dt(dt_ptr, b * s_tb + row * s_td + offs_t[None, :], mask, bias, HAS_BIAS, SOFTPLUS)
        dy = tl.load(dout_ptr + b * s_gb + row * s_gd + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + row * s_zd + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = dy * z * tl.sigmoid(z)
        run = tl.cumsum(dt, axis=1)
        dt0 = _lane(dt, t_idx, 0)
        since = run - dt0[:, None]  # Σ Δ over (first, t], ≥ 0
        total = tl.sum(dt, axis=1) - dt0
        for n in tl.static_range(N):
            An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0)
            Cn = tl.load(C_ptr + b * s_Cb + g * s_Cg + n * s_Cn + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            x_c = tl.sum(dy * Cn[None, :] * tl.exp2((An * LOG2E)[:, None] * since), axis=1)
            f_c = tl.exp(An * dt0)
            k_c = f_c * tl.exp(An * total)
            sel = n_idx[None, :] == n
            J = tl.where(sel, k_c[:, None] * J + (f_c * x_c)[:, None], J)
            K = tl.where(sel, k_c[:, None] * K, K)
    off = b * DIM * N * n_seg + offs_d[:, None] * (N * n_seg) + n_idx[None, :] * n_seg + seg
    tl.store(sk_ptr + off, K, mask=mask_d[:, None])
    tl.store(sj_ptr + off, J, mask=mask_d[:, None])


@triton.jit
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, hs_ptr, sk_ptr, sj_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    L, DIM, DPG, n_chunks, CPS, n_seg,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_gb, s_gd,
    s_dub, s_dud, s_dtb, s_dtd, s_dzb, s_dzd,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Ad, s_An,
    s_hb, s_hd, s_hn, s_hc,
    s_dBb, s_dBg, s_dBn, s_dCb, s_dCg, s_dCn,
    N: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, STEP: tl.constexpr, WINDOW: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    g = d0 // DPG
    t_idx = tl.arange(0, T)
    n_idx = tl.arange(0, N)
    in_step = t_idx < STEP
    if WINDOW > 0:
        keep = ((t_idx + 1) % WINDOW) != 0
    bias = _load_bias(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    Dv, dA_acc, dD_acc, dbias_acc = _channel_accumulators(D_ptr, offs_d, mask_d, N, BLOCK_D, HAS_D)
    # a_s λ_s of the first position after this segment
    lc = _carry_entering(sk_ptr, sj_ptr, b, seg, offs_d, mask_d, n_idx, DIM, n_seg, N, BLOCK_D)
    ones = tl.full((BLOCK_D, T), 1.0, dtype=tl.float32)
    c_lo = seg * CPS
    c_hi = tl.minimum((seg + 1) * CPS, n_chunks)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        offs_t = c * STEP + t_idx
        mask_t = in_step & (offs_t < L)
        mask = mask_d[:, None] & mask_t[None, :]
        row = offs_d[:, None]
        hc = tl.load(hs_ptr + b * s_hb + row * s_hd + n_idx[None, :] * s_hn + c * s_hc, mask=mask_d[:, None], other=0.0)
        dt, dt_raw, u, dy, G, _ = _seq_block(u_ptr, dt_ptr, dout_ptr, z_ptr, bias, c * STEP, t_idx, offs_d, mask_d, L, b,
                                             s_ub, s_ud, s_tb, s_td, s_gb, s_gd, s_zb, s_zd, STEP, HAS_Z, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        if HAS_Z:
            y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        ddt = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        du = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        for n in tl.static_range(N):
            An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0)
            Bn = tl.load(B_ptr + b * s_Bb + g * s_Bg + n * s_Bn + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_ptr + b * s_Cb + g * s_Cg + n * s_Cn + offs_t, mask=mask_t, other=0.0).to(tl.float32)
            a = tl.exp2(dt * (An * LOG2E)[:, None])
            bx = dtu * Bn[None, :]
            pa, px = tl.associative_scan((a, bx), 1, _affine_combine)
            h = pa * _column(hc, n_idx, n)[:, None] + px
            dH = dy * Cn[None, :]
            _, pl, xl = tl.associative_scan((a, ones, dH), 1, _lambda_combine, reverse=True)
            lam = xl + pl * _column(lc, n_idx, n)[:, None]
            lc_new = _lane(a * lam, t_idx, 0)
            lc = tl.where(n_idx[None, :] == n, lc_new[:, None], lc)
            if WINDOW > 0:
                am = tl.where(keep[None, :], a, 0.0)
                _, gg = tl.associative_scan((am, bx), 1, _affine_combine, reverse=True)
                _, _, mu = tl.associative_scan((am, ones, dH), 1, _mu_combine)
                dbx = lam + mu - dH
                q = lam * (h - bx) + mu * (gg - bx)
                H = h + gg - bx
            else:
                dbx = lam
                q = lam * (h - bx)
                H = h
            ddt += q * An[:, None] + dbx * Bn[None, :] * u
            du += dbx * dt * Bn[None, :]
            dA_n = tl.sum(q * dt, axis=1)
            dA_acc = tl.where(n_idx[None, :] == n, dA_acc + dA_n[:, None], dA_acc)
            # reduce over the channel tile on chip, then one atomic add per (n, t)
            dB_n = tl.sum(dbx * dtu, axis=0)
            dC_n = tl.sum(dy * H, axis=0)
            tl.atomic_add(dB_ptr + b * s_dBb + g * s_dBg + n * s_dBn + offs_t, dB_n, mask=mask_t)
            tl.atomic_add(dC_ptr + b * s_dCb + g * s_dCg + n * s_dCn + offs_t, dC_n, mask=mask_t)
            if HAS_Z:
                y += Cn[None, :] * H
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            if HAS_D:
                y += Dv[:, None] * u
            tl.store(dz_ptr + b * s_dzb + row * s_dzd + offs_t[None, :], (y * G).to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        if HAS_BIAS:
            dbias_acc += tl.sum(tl.where(mask, ddt, 0.0), axis=1)
        tl.store(du_ptr + b * s_dub + row * s_dud + offs_t[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddt_ptr + b * s_dtb + row * s_dtd + offs_t[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=mask)
    _add_channel_grads(dA_ptr, dD_ptr, dbias_ptr, offs_d, mask_d, n_idx, dA_acc, dD_acc, dbias_acc, N, HAS_D, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# Forward, sequential in time (the default where it fits: state ≤ 64, LB windows ≤ 16)
#
# Every thread owns one channel and several states and walks the length one position at a time:
# h = a h + b is one FMA per element-state, the exponential one MUFU op, and y = C·h is summed
# within the thread, so there are no scans and almost no shuffles. The program loads u and Δ for a
# block of TB positions as one (BLOCK_D, TB) tile, which Triton lays out with each thread holding its
# channel's row (16-byte vectors), so picking position t out of it is a register move. B and C are
# read one position at a time as a row of `state` values from transposed copies (batch, groups,
# length, state), the same row for every channel of the tile; on a GPU at the default tiles each
# block's rows are first copied into shared memory a block ahead (`SMEM_ROWS`), so they take no
# registers between the walks.
#
# Local bidirectionality: a block is one window. The walk forward keeps each position's a (a tuple
# of tiles, so registers, not memory), then a walk back over the window gives r_t = a_t (r_{t+1} +
# b_{t+1}) = g_t − b_t (r = 0 at the window's end), and y_t += C_t·r_t. No exponential is recomputed.
#
# Segments: a bag of one long sequence still needs thousands of warps, so the length is cut into
# segments. A segment's effect on the state is h_end = P·h_start + X. The summary kernel walks each
# segment backward from its end with Q = Π a over the positions after t, which is exp2(A·log2(e)·S)
# with S the channel's sum of Δ over them (X += Q b_t, then S += Δ_t: no running product to multiply),
# and stops once Q < 2^-64 for every channel and state of its tile (then P = Q, and P·h_start is
# as negligible). Anything earlier would enter X at under 2^-64 times its size: below fp32's
# rounding of X (2^-24 relative) unless the earlier inputs are over 2^40 times the recent ones.
# With realistic decays the walk is a few hundred positions, not the whole segment; a state that
# barely decays makes it walk the whole segment, which is still exact. (Waiting for Q = 0 exactly
# does not work: the smallest subnormal times a decay above 1/2 rounds back to itself.)


@triton.jit
def _positions(pos0, t_idx, VEC: tl.constexpr):
    """pos0 + t_idx; with VEC > 0 written so the compiler sees runs of only VEC contiguous positions,
    so a (channels, positions) tile of 16-bit values loads as VEC-wide vectors and its layout spreads a
    channel's positions (and the state tile that follows the layout, its states) over more lanes.
    The sequential backward uses VEC = 4 (4 states per thread instead of 8: half the registers)."""
    if VEC > 0:
        return pos0 + (t_idx // VEC) * VEC + t_idx % VEC
    return pos0 + t_idx


@triton.jit
def _seq_block_inputs(u_ptr, dt_ptr, bias, pos0, t_idx, offs_d, mask_d, end, b, s_ub, s_ud, s_tb, s_td,
                      STEP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    pos = pos0 + t_idx
    mask_t = (t_idx < STEP) & (pos < end)
    mask = mask_d[:, None] & mask_t[None, :]
    row = offs_d[:, None]
    u = tl.load(u_ptr + b * s_ub + row * s_ud + pos[None, :], mask=mask, other=0.0).to(tl.float32)
    dt = _load_dt(dt_ptr, b * s_tb + row * s_td + pos[None, :], mask, bias, HAS_BIAS, SOFTPLUS)
    return u, dt, mask


@triton.jit
def _prefetch(ptrs):
    """Ask for the cache lines holding `ptrs` to be brought into L1 (PTX `prefetch.global.L1`): a hint
    with no result, so nothing waits on it. Compiled only: the interpreter has no inline assembly."""
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


# The sequential forward's B and C rows in shared memory (SMEM_ROWS): a static `.shared` array declared once
# in the kernel's PTX, filled a block ahead by `cp.async` (global to shared, no registers), read with 16-byte
# `ld.volatile.shared` where the walks use a row (volatile: ptxas would otherwise merge the walk back's reads
# with the walk forward's and keep the rows in registers, which is what this avoids). Two buffers of
# (B rows, C rows) × 16 positions × 16 fp32 states: 4 KiB per one-warp program.
_SMEM_DECL = tl.constexpr(".shared .align 16 .b8 wsm_bc_rows[4096];\n\tmov.u32 $0, $1;")
_SMEM_COPY = tl.constexpr("{ .reg .u32 a; mov.u32 a, wsm_bc_rows; add.u32 a, a, $1; "
                          "cp.async.ca.shared.global [a], [$2], 16; mov.u32 $0, 0; }")
_SMEM_COMMIT = tl.constexpr("cp.async.commit_group;\n\tmov.u32 $0, $1;")
_SMEM_WAIT = tl.constexpr("cp.async.wait_group 1;\n\tbar.warp.sync -1;\n\tmov.u32 $0, $1;")
_SMEM_SYNC = tl.constexpr("bar.warp.sync -1;\n\tmov.u32 $0, $1;")
_SMEM_WAIT_ALL = tl.constexpr("cp.async.wait_group 0;\n\tmov.u32 $0, $1;")
# pure (so the layout pass leaves no dead copies), one text per walk (3 in the backward): identical reads of
# the walk forward and the walk back would be merged, and the rows kept in registers, the thing this avoids.
# Row r at [base + 64·r].
_SMEM_ROW = tl.constexpr(tuple("{ .reg .u32 a; mov.u32 a, wsm_bc_rows; add.u32 a, a, $4; "
                               "ld.volatile.shared.v4.f32 {$0, $1, $2, $3}, [a+%d]; } // walk %d" % (64 * r, w)
                               for w in range(3) for r in range(32)))


@triton.jit
def _smem_op(code: tl.constexpr, x):
    """A statement of PTX with no result (declare, commit, wait), tied to x so it is emitted once, in order."""
    return tl.inline_asm_elementwise(code, "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _smem_fill(bt_row0, ct_row0, first, last_row, buf, N: tl.constexpr, STEP: tl.constexpr):
    """cp.async the B and C rows of positions first .. first + STEP - 1 (clamped to 0 .. last_row) into
    buffer buf (0 or 1): 2·STEP·N·4 bytes in 16-byte pieces, spread over the warp's lanes."""
    PIECES: tl.constexpr = 2 * STEP * N // 4
    c = tl.arange(0, PIECES)
    which = c // (PIECES // 2)
    row = (c % (PIECES // 2)) // (N // 4)
    part = c % (N // 4)
    pos = tl.maximum(tl.minimum(first + row, last_row), 0).to(tl.int64) * N + part * 4
    src = tl.where(which == 0, bt_row0 + pos, ct_row0 + pos)
    dst = buf * (2 * STEP * N * 4) + which * (STEP * N * 4) + row * (N * 4) + part * 16
    tl.inline_asm_elementwise(_SMEM_COPY, "=r,r,l", [dst, src], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _smem_row(base, row: tl.constexpr, walk: tl.constexpr):
    """Row `row` (B rows 0..STEP-1, then C rows) of the buffer whose per-thread addresses are `base`
    (`_smem_base`), broadcast over the channels, read 16 bytes (4 consecutive states) at a time; in the
    layout `FWD_SHFL_LAYOUT` a thread holds 8 consecutive states of one channel, 2 reads."""
    return tl.inline_asm_elementwise(_SMEM_ROW[32 * walk + row], "=r,=r,=r,=r,r,r,r,r", [base], dtype=tl.float32,
                                     is_pure=True, pack=4)


@triton.jit
def _smem_base(sm, n_idx, like):
    """Byte offsets of a thread's states in the buffer at `sm`, a tile shaped like `like` (channels, N).
    `sm` must come from the wait (`_smem_wait`), which orders the reads after it."""
    return tl.broadcast_to(sm + n_idx[None, :] * 4, like.shape)


@triton.jit
def _smem_wait(buf_off, t_idx):
    """Wait for every copy but the newest group, sync the warp, and return buf_off through the wait so that
    whatever reads at it comes after."""
    tok = tl.inline_asm_elementwise(_SMEM_WAIT, "=r,r", [t_idx * 0 + buf_off], dtype=tl.int32, is_pure=False, pack=1)
    return tl.max(tok, axis=0)


@triton.jit
def _smem_start(bt_row0, ct_row0, first, last_row, t_idx, N: tl.constexpr, STEP: tl.constexpr):
    """Declare the shared array and start copying the rows of the block walked first into buffer 0."""
    _smem_op(_SMEM_DECL, t_idx)
    _smem_fill(bt_row0, ct_row0, first, last_row, 0, N, STEP)
    _smem_op(_SMEM_COMMIT, t_idx)


@triton.jit
def _smem_stage(bt_row0, ct_row0, nxt, last_row, k, t_idx, N: tl.constexpr, STEP: tl.constexpr):
    """At the k-th block walked: once every lane is done with the buffer of block k - 1, start copying the
    rows of the block walked next (from position nxt) into it, and wait for block k's. Returns the byte
    offset of block k's buffer, through the wait (`_smem_wait`)."""
    _smem_op(_SMEM_SYNC, t_idx)
    _smem_fill(bt_row0, ct_row0, nxt, last_row, (k + 1) % 2, N, STEP)
    _smem_op(_SMEM_COMMIT, t_idx)
    return _smem_wait((k % 2) * (2 * STEP * N * 4), t_idx)


@triton.jit
def _pick(tile, t_idx, t: tl.constexpr):
    # column t of a tile whose positions lie in one thread: LLVM folds this to a register read
    return tl.sum(tl.where(t_idx[None, :] == t, tile, -0.0), axis=1)


# Lane shuffles written in PTX, for the sequential backward on a GPU. They assume the layout Triton
# gives that kernel's (8 channels, 16) tiles at its defaults (one warp, BLOCK_D 8, TB 16, VEC 4,
# state 16): sizePerThread [1, 4], threadsPerWarp [8, 4], so lane = 4·channel + column/4 and a thread
# holds 4 consecutive columns (`BWD_SHFL_LAYOUT`). Triton picks layouts from the loads' alignment, so
# `_bwd_seq` reads the layout of every shuffle in the compiled kernel before its first launch and falls
# back to the `tl` path where it is not that one (`_shuffle_layouts_ok`). The interpreter (no inline
# assembly) runs the same logic through `tl.sum` and `tl.gather`; the GPU tests compare the two.
# Column t of a (channels, 16) tile broadcast along the row: one `shfl.idx` from the lane holding it,
# among the channel's 4 lanes (segment mask ((32 - 4) << 8) | 0x1f).
_PICK_PTX = tl.constexpr(tuple(
    "{ .reg .b32 v; shfl.sync.idx.b32 v, $%d, %d, 0x1c1f, -1; mov.b32 $0, v; mov.b32 $1, v; mov.b32 $2, v; mov.b32 $3, v; }"
    % (4 + t % 4, t // 4) for t in range(16)))
# The sequential forward's tiles at its GPU defaults (one warp, BLOCK_D 16, TB 16, state 16, 16-bit
# inputs in rows aligned to 16 bytes) have sizePerThread [1, 8], threadsPerWarp [16, 2] (`FWD_SHFL_LAYOUT`):
# lane = 2·channel + column/8, and a thread holds 8 consecutive columns (positions, or states in a state
# tile). fp32 inputs or unaligned rows give another layout; `_fwd_seq` checks it like the backward's.
# Column t of such a tile broadcast along the row: one `shfl.idx` between a channel's 2 lanes.
_PICK8_PTX = tl.constexpr(tuple(
    "{ .reg .b32 v; shfl.sync.idx.b32 v, $%d, %d, 0x1e1f, -1; " % (8 + t % 8, t // 8)
    + " ".join("mov.b32 $%d, v;" % i for i in range(8)) + " }" for t in range(16)))
# Row c of a (8 channels, state) tile from row c ^ 2^k: the lane 4·2^k away.
_SWAP_PTX = tl.constexpr(tuple("shfl.sync.bfly.b32 $0, $1, %d, 0x1f, -1;" % (4 << k) for k in range(3)))


def _state_sum_ptx(j: int, settle: bool) -> str:
    """PTX for `_state_sum`: the sum over a lane's 4 states of x·y ($4-$7 times $8-$11) goes into
    register j of the position tile s ($12-$15). With `settle` (w, $16, nonzero in the lanes whose
    columns are 4-7), the value then waiting in register j is the sum of position j + 4, and the lane
    pairs (4c, 4c+1) and (4c+2, 4c+3) swap halves: lanes of columns 0-3 keep position j, 4-7 position
    j + 4, and each sends the other. Then pairs two lanes apart add: columns j and j + 4 hold the sums
    over all 16 states (the columns 8-15 get copies, unused)."""
    body = "mul.rn.f32 s, $4, $8; fma.rn.f32 s, $5, $9, s; fma.rn.f32 s, $6, $10, s; fma.rn.f32 s, $7, $11, s; "
    if settle:
        body += ("setp.ne.b32 p, $16, 0; selp.f32 k, $%d, s, p; selp.f32 o, s, $%d, p; "
                 "shfl.sync.bfly.b32 r, o, 1, 0x1f, -1; add.rn.f32 k, k, r; "
                 "shfl.sync.bfly.b32 r, k, 2, 0x1f, -1; add.rn.f32 s, k, r; ") % (12 + j, 12 + j)
    outs = " ".join("mov.b32 $%d, %s;" % (i, "s" if i == j else "$%d" % (12 + i)) for i in range(4))
    return "{ .reg .f32 s, k, o, r; .reg .pred p; " + body + outs + " }"


_HOLD_PTX = tl.constexpr(tuple(_state_sum_ptx(j, False) for j in range(4)))
_SETTLE_PTX = tl.constexpr(tuple(_state_sum_ptx(j, True) for j in range(4)))


@triton.jit
def _state_sum(x, y, s, w, t_idx, t: tl.constexpr, SHFL: tl.constexpr):
    """s, a (channels, TB) tile, with column t set to Σ_state x·y of each row. x, y: (channels, state)
    tiles (or broadcastable to them). With SHFL (state = TB = 16, sub-blocks of at most 8 positions,
    filled from the last: t = 7, 6, ..., 0), positions 4-7 only park their lane's partial sum in the
    register of column t - 4; position t - 4 then finishes both with two shuffles (`_state_sum_ptx`):
    about 3.5 instructions per sum and position after the lane's own 4 states (2 selects, 2 shuffles, 2
    adds and a compare per pair), against 5-6 for `tl.sum`'s two shuffle levels and the placement.
    w: t_idx & 4 broadcast over the tile (which lanes hold columns 4-7)."""
    if SHFL:
        if t >= 4:
            return tl.inline_asm_elementwise(_HOLD_PTX[t - 4], "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r",
                                             [x, tl.broadcast_to(y, s.shape), s], dtype=tl.float32, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_SETTLE_PTX[t], "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                                             [x, tl.broadcast_to(y, s.shape), s, w], dtype=tl.float32, is_pure=True,
                                             pack=4)
    else:
        return tl.where(t_idx[None, :] == t, tl.sum(x * y, axis=1)[:, None], s)


@triton.jit
def _pick_row(tile, t_idx, t: tl.constexpr, SHFL: tl.constexpr, LANES: tl.constexpr = 4):
    """Column t of a (channels, TB) tile, broadcast over the row: with SHFL a (channels, TB) tile
    (TB = state there), else a (channels, 1) column. LANES: the lanes sharing a channel in the layout
    the shuffle was written for, 4 (the backward's, `_PICK_PTX`) or 2 (the forward's, `_PICK8_PTX`)."""
    if SHFL and LANES == 2:
        return tl.inline_asm_elementwise(_PICK8_PTX[t], "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r", [tile],
                                         dtype=tl.float32, is_pure=True, pack=8)
    elif SHFL:
        return tl.inline_asm_elementwise(_PICK_PTX[t], "=r,=r,=r,=r,r,r,r,r", [tile], dtype=tl.float32,
                                         is_pure=True, pack=4)
    else:
        return _pick(tile, t_idx, t)[:, None]


@triton.jit
def _swap_rows(x, c_idx, k: tl.constexpr, SHFL: tl.constexpr):
    """x with row c replaced by row c ^ 2^k."""
    if SHFL:
        return tl.inline_asm_elementwise(_SWAP_PTX[k], "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.gather(x, tl.broadcast_to((c_idx ^ (1 << k))[:, None], x.shape), axis=0)


@triton.jit
def _fold(hi, lo, c_idx, k: tl.constexpr, SHFL: tl.constexpr):
    """One step of a reduce-scatter over the channels: rows with bit k of c set keep `hi` summed
    over c and c ^ 2^k, the others `lo`. Three steps turn 8 (channels, state) tiles, one per position,
    into one whose row c is position c's sum over the 8 channels: 7 shuffles per value and lane
    against the 24 of `tl.sum`'s all-reduce of each tile."""
    up = ((c_idx >> k) & 1)[:, None] == 1
    return tl.where(up, hi, lo) + _swap_rows(tl.where(up, lo, hi), c_idx, k, SHFL)


@triton.jit
def _seq_program(A_ptr, bias_ptr, L, DIM, DPG, SEG_LEN, s_Ad, s_An,
                 N: tl.constexpr, BLOCK_D: tl.constexpr, TB: tl.constexpr, HAS_BIAS: tl.constexpr, SEG0: tl.constexpr):
    """What a sequential program (channel tile, batch, segment SEG0 + grid index) starts from: its batch
    and segment, channels, group, index vectors, Δ bias, A·log2(e), and its segment's positions."""
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2) + SEG0
    d0 = tl.program_id(0) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    t_idx = tl.arange(0, TB)
    n_idx = tl.arange(0, N)
    bias = _load_bias(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    A2 = tl.load(A_ptr + offs_d[:, None] * s_Ad + n_idx[None, :] * s_An, mask=mask_d[:, None], other=0.0) * LOG2E
    start = seg * SEG_LEN
    return b, seg, offs_d, mask_d, d0 // DPG, t_idx, n_idx, bias, A2, start, tl.minimum(start + SEG_LEN, L)


@triton.jit
def _kept(rs_row, pos, end):
    """Packed sequences: the factor on the state carried into position `pos` (rs_row: the batch element's
    reset flags): 0 where a sequence starts, else 1; 1 from `end` on (positions of another segment or none)."""
    return 1.0 - tl.load(rs_row + pos, mask=pos < end, other=0).to(tl.float32)


@triton.jit
def _fwd_seq_summary_kernel(
    u_ptr, dt_ptr, A_ptr, Bt_ptr, bias_ptr, sx_ptr, sp_ptr, rs_ptr,
    L, DIM, DPG, SEG_LEN, n_seg,
    s_ub, s_ud, s_tb, s_td, s_Bb, s_Bg, s_Ad, s_An, s_rb,
    N: tl.constexpr, BLOCK_D: tl.constexpr, TB: tl.constexpr, STEP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr = False,
):
    b, seg, offs_d, mask_d, g, t_idx, n_idx, bias, A2, start, end = _seq_program(
        A_ptr, bias_ptr, L, DIM, DPG, SEG_LEN, s_Ad, s_An, N, BLOCK_D, TB, HAS_BIAS, 0)
    X = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    # The decay product over the positions walked so far is exp2(A·log2(e)·S), S the channel's sum of Δ over
    # them. Keeping S instead of the product: the same one exponential per element-state and position, one
    # multiply less, and the cut-off test needs only each channel's slowest state.
    S = tl.zeros((BLOCK_D,), dtype=tl.float32)
    slowest = tl.max(A2, axis=1)
    # HAS_RESET (packed sequences): 0 once the walk has passed a sequence's first position, whose decay is
    # cut: nothing before it reaches the segment's end
    live = 1.0
    rs_row = rs_ptr + b * s_rb
    i = (end - start + STEP - 1) // STEP - 1
    go = i >= 0
    while go:
        pos0 = start + i * STEP
        u, dt, mask = _seq_block_inputs(u_ptr, dt_ptr, bias, pos0, t_idx, offs_d, mask_d, end, b, s_ub, s_ud, s_tb, s_td,
                                        STEP, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        row_b = Bt_ptr + b * s_Bb + g * s_Bg + pos0.to(tl.int64) * N + n_idx
        for k in tl.static_range(STEP):
            Bt = tl.load(row_b + (STEP - 1 - k) * N).to(tl.float32)
            X += (tl.exp2(S[:, None] * A2) * live) * (_pick(dtu, t_idx, STEP - 1 - k)[:, None] * Bt[None, :])
            S += _pick(dt, t_idx, STEP - 1 - k)
            if HAS_RESET:
                live = live * _kept(rs_row, pos0 + STEP - 1 - k, end)
        i -= 1
        # channels past DIM never hold the loop
        go = (i >= 0) & (tl.max(tl.where(mask_d, tl.exp2(slowest * S), 0.0), axis=0) >= SUMMARY_CUTOFF)
        if HAS_RESET:
            go = go & (live > 0.0)
    Q = tl.exp2(S[:, None] * A2) * live
    off = b * DIM * N * n_seg + offs_d[:, None] * (N * n_seg) + n_idx[None, :] * n_seg + seg
    tl.store(sx_ptr + off, X, mask=mask_d[:, None])
    tl.store(sp_ptr + off, Q, mask=mask_d[:, None])


@triton.jit
def _place(y, ys, t_idx, STEP: tl.constexpr):
    """y (channels, TB) plus the per-position sums ys in their columns."""
    for t in tl.static_range(STEP):
        y = tl.where(t_idx[None, :] == t, y + ys[t][:, None], y)
    return y


@triton.jit
def _walk_window(h, A2, y, dt, dtu, t_idx, row_b, row_c, sm, N: tl.constexpr, STEP: tl.constexpr, WINDOW: tl.constexpr,
                 PREFETCH_BC: tl.constexpr, SUMS_AFTER: tl.constexpr, SHFL_PICK: tl.constexpr, SMEM_ROWS: tl.constexpr,
                 rs_row, pos0, end, HAS_RESET: tl.constexpr):
    """One block of the sequential forward: the walk forward, h_t = a_t h_{t-1} + Δ_t u_t B_t and
    y_t += C_t·h_t; for LB then the window's walk back, y_t += C_t·r_t. row_b, row_c point at the
    block's first B and C row. Returns h and y.
    SUMS_AFTER: the per-position sums are kept as a tuple of (channels,) vectors and go into y once,
    after both walks (`_place`). Measured faster with blocks of 16, where a channel's positions are
    split over two lanes (LB forward 1.57 against 1.84 ms, kernels/NOTES.md, session 10). Blocks of
    4 and 8 keep the other form: SUMS_AFTER compiled to more spills or registers there (not timed).
    SHFL_PICK (16 positions, state 16, the layout `FWD_SHFL_LAYOUT`): picks by one PTX shuffle
    (`_pick_row` with 2 lanes).
    SMEM_ROWS (the same tiles, fp32 rows): B and C rows read from the shared-memory buffer at byte offset sm
    (`_smem_row`) instead of loaded, by the walk forward and again by the walk back.
    HAS_RESET (packed sequences): the carried h is dropped where a sequence starts (`_kept`); the window's
    walk back keeps every decay (it never crosses a window's end, and a sequence starts at a window's start)."""
    kept = ()
    ys = ()
    n_idx = tl.arange(0, N)
    if SMEM_ROWS:
        base = _smem_base(sm, n_idx, h)
    if PREFETCH_BC:
        Bt_next = tl.load(row_b + n_idx)
        Ct_next = tl.load(row_c + n_idx)
    for t in tl.static_range(STEP):
        if PREFETCH_BC:
            # B and C of position t were asked for one position ago: their latency hides behind this one
            Bt = Bt_next.to(tl.float32)[None, :]
            Ct = Ct_next.to(tl.float32)[None, :]
            if t + 1 < STEP:
                Bt_next = tl.load(row_b + (t + 1) * N + n_idx)
                Ct_next = tl.load(row_c + (t + 1) * N + n_idx)
        elif SMEM_ROWS:
            Bt = _smem_row(base, t, 0)
            Ct = _smem_row(base, STEP + t, 0)
        else:
            Bt = tl.load(row_b + t * N + n_idx).to(tl.float32)[None, :]
            Ct = tl.load(row_c + t * N + n_idx).to(tl.float32)[None, :]
        a = tl.exp2(_pick_row(dt, t_idx, t, SHFL_PICK, 2) * A2)
        if HAS_RESET:
            h = (a * _kept(rs_row, pos0 + t, end)) * h + _pick_row(dtu, t_idx, t, SHFL_PICK, 2) * Bt
        else:
            h = a * h + _pick_row(dtu, t_idx, t, SHFL_PICK, 2) * Bt
        if SUMS_AFTER:
            ys = ys + (tl.sum(h * Ct, axis=1),)
        else:
            y = tl.where(t_idx[None, :] == t, y + tl.sum(h * Ct, axis=1)[:, None], y)
        if WINDOW > 0:
            kept = kept + (a,)
    if WINDOW > 0:
        # the window's backward half: r_t = a_t (r_{t+1} + b_{t+1}) = g_t - b_t, r at the window end = 0
        r = tl.zeros(h.shape, dtype=tl.float32)
        back = ()
        for k in tl.static_range(STEP - 1):
            # position t = STEP - 2 - k of the window
            if SMEM_ROWS:
                B1 = _smem_row(base, STEP - 1 - k, 1)
                Ct = _smem_row(base, 2 * STEP - 2 - k, 1)
            else:
                B1 = tl.load(row_b + (STEP - 1 - k) * N + n_idx).to(tl.float32)[None, :]
                Ct = tl.load(row_c + (STEP - 2 - k) * N + n_idx).to(tl.float32)[None, :]
            r = kept[STEP - 2 - k] * (r + _pick_row(dtu, t_idx, STEP - 1 - k, SHFL_PICK, 2) * B1)
            if SUMS_AFTER:
                back = (tl.sum(r * Ct, axis=1),) + back
            else:
                y = tl.where(t_idx[None, :] == STEP - 2 - k, y + tl.sum(r * Ct, axis=1)[:, None], y)
        if SUMS_AFTER:
            both = ()
            for t in tl.static_range(STEP - 1):
                both = both + (ys[t] + back[t],)
            ys = both + (ys[STEP - 1],)
    if SUMS_AFTER:
        y = _place(y, ys, t_idx, STEP)
    return h, y


@triton.jit
def _fwd_seq_kernel(
    u_ptr, dt_ptr, A_ptr, Bt_ptr, Ct_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, hs_ptr, last_ptr, sx_ptr, sp_ptr, rs_ptr,
    L, DIM, DPG, SEG_LEN, n_seg,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_ob, s_od,
    s_Bb, s_Bg, s_Cb, s_Cg, s_Ad, s_An,
    s_hb, s_hd, s_hn, s_hc, s_rb,
    N: tl.constexpr, BLOCK_D: tl.constexpr, TB: tl.constexpr, STEP: tl.constexpr, WINDOW: tl.constexpr,
    SAVE_EVERY: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_BC: tl.constexpr, PREFETCH_L1: tl.constexpr,
    IN_AHEAD: tl.constexpr, LATE_NEXT: tl.constexpr, SUMS_AFTER: tl.constexpr, SHFL_PICK: tl.constexpr,
    SMEM_ROWS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_LAST: tl.constexpr,
    HAS_RESET: tl.constexpr = False,
):
    b, seg, offs_d, mask_d, g, t_idx, n_idx, bias, A2, start, end = _seq_program(
        A_ptr, bias_ptr, L, DIM, DPG, SEG_LEN, s_Ad, s_An, N, BLOCK_D, TB, HAS_BIAS, 0)
    rs_row = rs_ptr + b * s_rb
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    h = _state_entering(sx_ptr, sp_ptr, b, seg, offs_d, mask_d, n_idx, DIM, n_seg, N, BLOCK_D)
    bt_row0 = Bt_ptr + b * s_Bb + g * s_Bg
    ct_row0 = Ct_ptr + b * s_Cb + g * s_Cg
    if PREFETCH_L1:
        pf_idx = tl.arange(0, 2 * TB)
        crow = tl.minimum(offs_d, DIM - 1)
    # B and C rows are read unmasked: the launcher pads them by TB rows, and past `end` the block has
    # Δ = u = 0, so b = 0 and a = 1 there whatever B holds, and those outputs are not stored
    n_blocks = (end - start + STEP - 1) // STEP
    if SMEM_ROWS:
        _smem_start(bt_row0, ct_row0, start, L + TB - 1, t_idx, N, STEP)
    if PREFETCH:
        u_next, dt_next, mask_next = _seq_block_inputs(u_ptr, dt_ptr, bias, start, t_idx, offs_d, mask_d, end, b, s_ub, s_ud,
                                                       s_tb, s_td, STEP, HAS_BIAS, SOFTPLUS)
    for blk in range(0, n_blocks):
        pos0 = start + blk * STEP
        if SMEM_ROWS:
            # the next block's B and C rows into the other buffer, then wait for this block's
            sm = _smem_stage(bt_row0, ct_row0, pos0 + STEP, L + TB - 1, blk, t_idx, N, STEP)
        else:
            sm = 0
        if PREFETCH_L1:
            # the next block's B and C rows (one 64-byte row per position) and u, Δ, z (one run of STEP
            # positions per channel) into L1 now, a block of work before they are read: B and C come
            # from L2 (every channel tile reads them), u, Δ and z from memory
            # (addresses kept inside the tensors: B and C have TB padding rows, u, Δ, z end at L - 1)
            if SMEM_ROWS:
                pass  # the rows come by cp.async
            else:
                rows = tl.minimum(pos0 + STEP + pf_idx % TB, L + TB - 1).to(tl.int64) * N
                _prefetch(tl.where(pf_idx < TB, bt_row0 + rows, ct_row0 + rows))
            nxt = tl.minimum(pos0 + STEP, L - 1)
            # u and Δ IN_AHEAD blocks ahead (1 by default; sweeps)
            nxt_in = tl.minimum(pos0 + IN_AHEAD * STEP, L - 1)
            _prefetch(u_ptr + b * s_ub + crow * s_ud + nxt_in)
            _prefetch(dt_ptr + b * s_tb + crow * s_td + nxt_in)
            if HAS_Z:
                _prefetch(z_ptr + b * s_zb + crow * s_zd + nxt)
        if PREFETCH:
            # this block's inputs were loaded one block ago; ask for the next block's now
            u, dt, mask = u_next, dt_next, mask_next
            if not LATE_NEXT:
                u_next, dt_next, mask_next = _seq_block_inputs(u_ptr, dt_ptr, bias, pos0 + STEP, t_idx, offs_d, mask_d, end,
                                                               b, s_ub, s_ud, s_tb, s_td, STEP, HAS_BIAS, SOFTPLUS)
        else:
            u, dt, mask = _seq_block_inputs(u_ptr, dt_ptr, bias, pos0, t_idx, offs_d, mask_d, end, b, s_ub, s_ud, s_tb, s_td,
                                            STEP, HAS_BIAS, SOFTPLUS)
        if SAVE_STATES:
            # the state entering every chunk of STEP·SAVE_EVERY positions (the scan backward's chunks)
            if (pos0 // STEP) % SAVE_EVERY == 0:
                c = pos0 // (STEP * SAVE_EVERY)
                tl.store(hs_ptr + b * s_hb + offs_d[:, None] * s_hd + n_idx[None, :] * s_hn + c * s_hc, h, mask=mask_d[:, None])
        dtu = dt * u
        if HAS_D:
            y = Dv[:, None] * u
        else:
            y = tl.zeros((BLOCK_D, TB), dtype=tl.float32)
        row_b = bt_row0 + pos0.to(tl.int64) * N
        row_c = ct_row0 + pos0.to(tl.int64) * N
        h, y = _walk_window(h, A2, y, dt, dtu, t_idx, row_b, row_c, sm, N, STEP, WINDOW, PREFETCH_BC, SUMS_AFTER, SHFL_PICK,
                            SMEM_ROWS, rs_row, pos0, end, HAS_RESET)
        if PREFETCH and LATE_NEXT:
            u_next, dt_next, mask_next = _seq_block_inputs(u_ptr, dt_ptr, bias, pos0 + STEP, t_idx, offs_d, mask_d, end,
                                                           b, s_ub, s_ud, s_tb, s_td, STEP, HAS_BIAS, SOFTPLUS)
        row = offs_d[:, None]
        pos = pos0 + t_idx
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + row * s_zd + pos[None, :], mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + b * s_ob + row * s_od + pos[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    if SMEM_ROWS:
        _smem_op(_SMEM_WAIT_ALL, t_idx)
    if SAVE_LAST:
        if seg == n_seg - 1:
            lp = last_ptr + b * DIM * N + offs_d[:, None] * N + n_idx[None, :]
            tl.store(lp, h, mask=mask_d[:, None])


# ---------------------------------------------------------------------------------------------
# Backward, sequential in time (the default wherever the sequential forward runs)
#
# A program owns BLOCK_D channels × all states of one batch element and one segment, one warp, and
# walks its segment's blocks (STEP positions: TB, or one LB window) from the last to the first.
# The forward saved the state entering every block. A block is done in sub-blocks of SUB positions,
# from the last; for each:
# - a walk forward from the block's saved state to the sub-block (h, and for LB the window's
#   μ_t = dH_t + a_{t-1} μ_{t-1}, which restarts at the window start), then over the sub-block keeping
#   every h_t (and μ_t) as a tuple of tiles: registers;
# - a walk back: λ_t = dH_t + a_{t+1} λ_{t+1} (the carry ρ = a_{t+1} λ_{t+1} comes from the position
#   after, and into the segment's last block from the summaries of the segments after it), for LB
#   r_t = a_t (r_{t+1} + b_{t+1}) (0 at the window end), and every gradient of position t.
# Two exponentials per element-state (2.5 with two sub-blocks per block), no scans. The sums over
# states (dΔ, du, y for dz) are `tl.sum`s of the (BLOCK_D, state) tile (with SHFL: `_state_sum`); those
# over the tile's channels (dB, dC) a reduce-scatter over the sub-block's positions (`_fold`; `tl.sum`s
# where SCATTER is off).
# B_t and C_t are read as rows of transposed copies, and dB, dC are added into transposed
# (batch, groups, length, state) buffers, one (SUB, state) tile per sub-block and program.
#
# The summary kernel gives each segment s > 0 its effect on the carry that leaves it to the left,
# ρ_out = K·ρ_in + J with K = Π_t a_t and J = Σ_t (Π_{k≤t} a_k) dH_t over the segment, walking it
# forward from its start; like the forward's summary it stops once every running product is below
# 2^-64.


@triton.jit
def _bwd_seq_summary_kernel(
    u_ptr, dt_ptr, A_ptr, Ct_ptr, z_ptr, bias_ptr, dout_ptr, sk_ptr, sj_ptr, rs_ptr,
    L, DIM, DPG, SEG_LEN, n_seg,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_gb, s_gd, s_Cb, s_Cg, s_Ad, s_An, s_rb,
    N: tl.constexpr, BLOCK_D: tl.constexpr, TB: tl.constexpr, STEP: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr = False,
):
    b, seg, offs_d, mask_d, g, t_idx, n_idx, bias, A2, start, end = _seq_program(
        A_ptr, bias_ptr, L, DIM, DPG, SEG_LEN, s_Ad, s_An, N, BLOCK_D, TB, HAS_BIAS, 1)
    J = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    # the decay product over the positions walked so far, R = exp2(A·log2(e)·S) with S the channel's sum of Δ
    # (as in the forward's summary kernel)
    S = tl.zeros((BLOCK_D,), dtype=tl.float32)
    slowest = tl.max(A2, axis=1)
    base_c = Ct_ptr + b * s_Cb + g * s_Cg + n_idx
    # HAS_RESET (packed sequences): 0 from a sequence's first position on: no carry passes it to the left
    live = 1.0
    rs_row = rs_ptr + b * s_rb
    pos0 = start
    go = pos0 < end
    while go:
        dt, _, _, dy, _, _ = _seq_block(u_ptr, dt_ptr, dout_ptr, z_ptr, bias, pos0, t_idx, offs_d, mask_d, end, b,
                                        s_ub, s_ud, s_tb, s_td, s_gb, s_gd, s_zb, s_zd, STEP, HAS_Z, HAS_BIAS, SOFTPLUS)
        row_c = base_c + pos0.to(tl.int64) * N
        for t in tl.static_range(STEP):
            S += _pick(dt, t_idx, t)
            if HAS_RESET:
                live = live * _kept(rs_row, pos0 + t, end)
            J += (tl.exp2(S[:, None] * A2) * live) * (_pick(dy, t_idx, t)[:, None] * tl.load(row_c + t * N).to(tl.float32)[None, :])
        pos0 += STEP
        # channels past DIM never hold the loop
        go = (pos0 < end) & (tl.max(tl.where(mask_d, tl.exp2(slowest * S), 0.0), axis=0) >= SUMMARY_CUTOFF)
        if HAS_RESET:
            go = go & (live > 0.0)
    R = tl.exp2(S[:, None] * A2) * live
    off = b * DIM * N * n_seg + offs_d[:, None] * (N * n_seg) + n_idx[None, :] * n_seg + seg
    tl.store(sk_ptr + off, R, mask=mask_d[:, None])
    tl.store(sj_ptr + off, J, mask=mask_d[:, None])


@triton.jit
def _seq_block(u_ptr, dt_ptr, dout_ptr, z_ptr, bias, pos0, t_idx, offs_d, mask_d, end, b,
               s_ub, s_ud, s_tb, s_td, s_gb, s_gd, s_zb, s_zd,
               STEP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               VEC: tl.constexpr = 0):
    """A block's inputs as (BLOCK_D, TB) tiles: Δ (after bias and softplus), Δ before softplus, u,
    dy = dout·silu(z) and the gate's factor for dz (dz = y · G); 0 past the block or the segment.

    VEC: see `_positions` (the sequential backward's tiles load 4-wide, so a thread holds 4 states)."""
    pos = _positions(pos0, t_idx, VEC)
    mask = mask_d[:, None] & ((t_idx < STEP) & (pos < end))[None, :]
    row = offs_d[:, None]
    u = tl.load(u_ptr + b * s_ub + row * s_ud + pos[None, :], mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(dt_ptr + b * s_tb + row * s_td + pos[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    dt = tl.where(mask, dt, 0.0)
    dout = tl.load(dout_ptr + b * s_gb + row * s_gd + pos[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + row * s_zd + pos[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        dy = dout * z * sig
        G = dout * sig * (1.0 + z * (1.0 - sig))
    else:
        dy = dout
        G = dout
    return dt, raw, u, dy, G, mask


@triton.jit
def _bwd_seq_kernel(
    u_ptr, dt_ptr, A_ptr, Bt_ptr, Ct_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, hs_ptr, sk_ptr, sj_ptr,
    du_ptr, ddt_ptr, dA_ptr, dBt_ptr, dCt_ptr, dD_ptr, dz_ptr, dbias_ptr, rs_ptr,
    L, DIM, DPG, SEG_LEN, n_seg,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_gb, s_gd,
    s_dub, s_dud, s_dtb, s_dtd, s_dzb, s_dzd,
    s_Bb, s_Bg, s_Cb, s_Cg, s_Ad, s_An,
    s_hb, s_hd, s_hn, s_hc, s_rb,
    N: tl.constexpr, BLOCK_D: tl.constexpr, TB: tl.constexpr, STEP: tl.constexpr, SUB: tl.constexpr,
    SUBP: tl.constexpr, WINDOW: tl.constexpr, VEC: tl.constexpr, PREFETCH_L1: tl.constexpr, PF: tl.constexpr,
    SCATTER: tl.constexpr, SHFL: tl.constexpr, SMEM_ROWS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_RESET: tl.constexpr = False,
):
    b, seg, offs_d, mask_d, g, t_idx, n_idx, bias, A2, start, end = _seq_program(
        A_ptr, bias_ptr, L, DIM, DPG, SEG_LEN, s_Ad, s_An, N, BLOCK_D, TB, HAS_BIAS, 0)
    # HAS_RESET (packed sequences): the forward recurrence's decay is cut where a sequence starts (`_kept`), so
    # h is recomputed with the cut and the adjoint λ passes no carry ρ = a λ to the left of it; μ and r, the
    # window's terms, keep every decay (a sequence starts at a window's start, where they restart anyway)
    rs_row = rs_ptr + b * s_rb
    NSUB: tl.constexpr = (STEP + SUB - 1) // SUB
    r_idx = tl.arange(0, SUBP)
    c_idx = tl.arange(0, BLOCK_D)  # the tile's channels, for the reduce-scatter of dB and dC
    lanes_hi = tl.broadcast_to((t_idx & 4)[None, :], (BLOCK_D, TB))  # for `_state_sum`
    row = offs_d[:, None]
    Dv, dA_acc, dD_acc, dbias_acc = _channel_accumulators(D_ptr, offs_d, mask_d, N, BLOCK_D, HAS_D)
    # ρ = a_{t+1} λ_{t+1} entering the segment's last position
    rho = _carry_entering(sk_ptr, sj_ptr, b, seg, offs_d, mask_d, n_idx, DIM, n_seg, N, BLOCK_D)
    base_b = Bt_ptr + b * s_Bb + g * s_Bg + n_idx
    base_c = Ct_ptr + b * s_Cb + g * s_Cg + n_idx
    n_blocks = (end - start + STEP - 1) // STEP
    if PREFETCH_L1:
        pf_idx = tl.arange(0, 2 * PF)
        crow = tl.minimum(offs_d, DIM - 1)
    if SMEM_ROWS:
        # B and C rows in shared memory (as in the forward, `_smem_fill`): the last block's now, then each
        # block's predecessor (walked next) while the block is worked on
        bt_row0 = Bt_ptr + b * s_Bb + g * s_Bg
        ct_row0 = Ct_ptr + b * s_Cb + g * s_Cg
        _smem_start(bt_row0, ct_row0, start + (n_blocks - 1) * STEP, L + STEP - 1, t_idx, N, STEP)
    for i in range(0, n_blocks):
        pos0 = start + (n_blocks - 1 - i) * STEP
        blk_end = tl.minimum(pos0 + STEP, end)
        if SMEM_ROWS:
            sm = _smem_stage(bt_row0, ct_row0, tl.maximum(pos0 - STEP, 0), L + STEP - 1, i, t_idx, N, STEP)
        if PREFETCH_L1:
            # the block before (walked next) into L1 while this one is worked on: its saved state, B and C
            # rows, and u, Δ, dout, z (addresses kept inside the tensors: at the first block, position 0)
            prv = tl.maximum(pos0 - STEP, 0)
            if SMEM_ROWS:
                pass  # the rows come by cp.async
            else:
                rows = (prv + pf_idx % PF).to(tl.int64) * N
                _prefetch(tl.where(pf_idx < PF, Bt_ptr + b * s_Bb + g * s_Bg + rows, Ct_ptr + b * s_Cb + g * s_Cg + rows))
            _prefetch(hs_ptr + b * s_hb + crow * s_hd + (prv // STEP) * s_hc)
            _prefetch(u_ptr + b * s_ub + crow * s_ud + prv)
            _prefetch(dt_ptr + b * s_tb + crow * s_td + prv)
            _prefetch(dout_ptr + b * s_gb + crow * s_gd + prv)
            if HAS_Z:
                _prefetch(z_ptr + b * s_zb + crow * s_zd + prv)
        h0 = tl.load(hs_ptr + b * s_hb + row * s_hd + n_idx[None, :] * s_hn + (pos0 // STEP) * s_hc, mask=mask_d[:, None], other=0.0)
        r = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        b_next = r
        for jj in range(0, NSUB):
            # sub-blocks from the last; a runtime loop, so the compiler keeps one sub-block's values, not the block's
            ps = pos0 + (NSUB - 1 - jj) * SUB
            # walk forward from the block's start to this sub-block: h, and for LB μ (restarts at the window's start)
            h = h0
            mu = tl.zeros((BLOCK_D, N), dtype=tl.float32)
            a_prev = mu
            for j2 in range(0, NSUB - 1 - jj):
                pw = pos0 + j2 * SUB
                dt, _, u, dy, _, _ = _seq_block(u_ptr, dt_ptr, dout_ptr, z_ptr, bias, pw, t_idx, offs_d, mask_d, blk_end, b,
                                                s_ub, s_ud, s_tb, s_td, s_gb, s_gd, s_zb, s_zd, SUB, HAS_Z, HAS_BIAS, SOFTPLUS, VEC)
                dtu = dt * u
                row_b = base_b + pw.to(tl.int64) * N
                row_c = base_c + pw.to(tl.int64) * N
                if SMEM_ROWS:
                    sbase = _smem_base(sm + j2 * (SUB * N * 4), n_idx, A2)
                for t in tl.static_range(SUB):
                    a = tl.exp2(_pick_row(dt, t_idx, t, SHFL) * A2)
                    if SMEM_ROWS:
                        Bw = _smem_row(sbase, t, 0)
                    else:
                        Bw = tl.load(row_b + t * N).to(tl.float32)[None, :]
                    if HAS_RESET:
                        h = (a * _kept(rs_row, pw + t, blk_end)) * h + _pick_row(dtu, t_idx, t, SHFL) * Bw
                    else:
                        h = a * h + _pick_row(dtu, t_idx, t, SHFL) * Bw
                    if WINDOW > 0:
                        if SMEM_ROWS:
                            Cw = _smem_row(sbase, STEP + t, 0)
                        else:
                            Cw = tl.load(row_c + t * N).to(tl.float32)[None, :]
                        mu = _pick_row(dy, t_idx, t, SHFL) * Cw + a_prev * mu
                        a_prev = a
            # the sub-block itself: walk forward keeping h_t (and μ_t), then back
            dt, _, u, dy, _, _ = _seq_block(u_ptr, dt_ptr, dout_ptr, z_ptr, bias, ps, t_idx, offs_d, mask_d, blk_end, b,
                                            s_ub, s_ud, s_tb, s_td, s_gb, s_gd, s_zb, s_zd, SUB, HAS_Z, HAS_BIAS, SOFTPLUS, VEC)
            dtu = dt * u
            row_b = base_b + ps.to(tl.int64) * N
            row_c = base_c + ps.to(tl.int64) * N
            if SMEM_ROWS:
                sbase = _smem_base(sm + (NSUB - 1 - jj) * (SUB * N * 4), n_idx, A2)
            h_in = h  # the state entering the sub-block: h_{t-1} of its first position
            hist = ()
            mus = ()
            for t in tl.static_range(SUB):
                a = tl.exp2(_pick_row(dt, t_idx, t, SHFL) * A2)
                if SMEM_ROWS:
                    Bw = _smem_row(sbase, t, 1)
                else:
                    Bw = tl.load(row_b + t * N).to(tl.float32)[None, :]
                if HAS_RESET:
                    h = (a * _kept(rs_row, ps + t, blk_end)) * h + _pick_row(dtu, t_idx, t, SHFL) * Bw
                else:
                    h = a * h + _pick_row(dtu, t_idx, t, SHFL) * Bw
                hist = hist + (h,)
                if WINDOW > 0:
                    if SMEM_ROWS:
                        Cw = _smem_row(sbase, STEP + t, 1)
                    else:
                        Cw = tl.load(row_c + t * N).to(tl.float32)[None, :]
                    mu = _pick_row(dy, t_idx, t, SHFL) * Cw + a_prev * mu
                    mus = mus + (mu,)
                    a_prev = a
            sb_t = tl.zeros((BLOCK_D, TB), dtype=tl.float32)  # Σ_n dbx·B per position
            sq_t = tl.zeros((BLOCK_D, TB), dtype=tl.float32)  # Σ_n q·A2
            y_t = tl.zeros((BLOCK_D, TB), dtype=tl.float32)   # Σ_n C·H (the output before D and the gate)
            if SCATTER:
                # partial sums of the reduce-scatter (`_fold`), waiting for their pair: positions 2m+1,
                # then pairs 2m'+1, then the upper four; zero where a pair's upper half is past SUB
                pb1 = tl.zeros((BLOCK_D, N), dtype=tl.float32)
                pb2, pb3, pc1, pc2, pc3, dB_rows, dC_rows = pb1, pb1, pb1, pb1, pb1, pb1, pb1
            else:
                dB_rows = tl.zeros((SUBP, N), dtype=tl.float32)
                dC_rows = tl.zeros((SUBP, N), dtype=tl.float32)
            for k in tl.static_range(SUB):
                dt_c = _pick_row(dt, t_idx, SUB - 1 - k, SHFL)
                dtu_c = _pick_row(dtu, t_idx, SUB - 1 - k, SHFL)
                dy_c = _pick_row(dy, t_idx, SUB - 1 - k, SHFL)
                if SMEM_ROWS:
                    Bt = _smem_row(sbase, SUB - 1 - k, 2)
                    Ct = _smem_row(sbase, STEP + SUB - 1 - k, 2)
                else:
                    Bt = tl.load(row_b + (SUB - 1 - k) * N).to(tl.float32)[None, :]
                    Ct = tl.load(row_c + (SUB - 1 - k) * N).to(tl.float32)[None, :]
                dH = dy_c * Ct
                lam = dH + rho
                a = tl.exp2(dt_c * A2)
                rho_in = rho
                if HAS_RESET:
                    rho = (a * _kept(rs_row, ps + SUB - 1 - k, blk_end)) * lam
                else:
                    rho = a * lam
                ht = hist[SUB - 1 - k]
                # q = λ_t a_t h_{t-1} = ρ_{t-1} h_{t-1} from the kept states, not λ_t (h_t - b_t): that
                # difference cancels when a_t is tiny
                if k < SUB - 1:
                    h_prev = hist[SUB - 2 - k]
                else:
                    h_prev = h_in
                if WINDOW > 0:
                    r = a * (r + b_next)  # 0 at the window's end: r and b_next start at 0 in every block
                    b_next = dtu_c * Bt
                    mu = mus[SUB - 1 - k]
                    dbx = rho_in + mu  # λ_t + μ_t - dH_t
                    q = rho * h_prev + mu * r
                    Hf = ht + r
                else:
                    dbx = lam
                    q = rho * h_prev
                    Hf = ht
                dA_acc += q * dt_c
                sb_t = _state_sum(dbx, Bt, sb_t, lanes_hi, t_idx, SUB - 1 - k, SHFL)
                sq_t = _state_sum(q, A2, sq_t, lanes_hi, t_idx, SUB - 1 - k, SHFL)
                if HAS_Z:
                    y_t = _state_sum(Hf, Ct, y_t, lanes_hi, t_idx, SUB - 1 - k, SHFL)
                if SCATTER:
                    xb = dbx * dtu_c
                    xc = dy_c * Hf
                    if (SUB - 1 - k) % 2 == 1:
                        pb1, pc1 = xb, xc
                    else:
                        xb = _fold(pb1, xb, c_idx, 0, SHFL)
                        xc = _fold(pc1, xc, c_idx, 0, SHFL)
                        if ((SUB - 1 - k) // 2) % 2 == 1:
                            pb2, pc2 = xb, xc
                        else:
                            xb = _fold(pb2, xb, c_idx, 1, SHFL)
                            xc = _fold(pc2, xc, c_idx, 1, SHFL)
                            if SUB - 1 - k == 4:
                                pb3, pc3 = xb, xc
                            else:
                                # position 0: row c holds position c's sums over the tile's channels
                                dB_rows = _fold(pb3, xb, c_idx, 2, SHFL)
                                dC_rows = _fold(pc3, xc, c_idx, 2, SHFL)
                else:
                    rsel = r_idx[:, None] == SUB - 1 - k
                    dB_rows = tl.where(rsel, tl.sum(dbx * dtu_c, axis=0)[None, :], dB_rows)
                    dC_rows = tl.where(rsel, tl.sum(dy_c * Hf, axis=0)[None, :], dC_rows)
            # the sub-block's outputs; u, Δ before softplus and the gate are read again after the first
            # store (the compiler cannot keep them across it), so they hold no registers during the walks
            pos = ps + t_idx
            mask = mask_d[:, None] & ((t_idx < SUB) & (pos < blk_end))[None, :]
            du = dt * sb_t
            if HAS_D:
                du += Dv[:, None] * dy
            tl.store(du_ptr + b * s_dub + row * s_dud + pos[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
            _, raw, u, _, G, _ = _seq_block(u_ptr, dt_ptr, dout_ptr, z_ptr, bias, ps, t_idx, offs_d, mask_d, blk_end, b,
                                            s_ub, s_ud, s_tb, s_td, s_gb, s_gd, s_zb, s_zd, SUB, HAS_Z, HAS_BIAS, SOFTPLUS, VEC)
            ddt = sq_t * 0.6931471805599453 + u * sb_t  # Σ q·A = ln 2 · Σ q·A2
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            if HAS_D:
                dD_acc += tl.sum(dy * u, axis=1)
            if HAS_BIAS:
                dbias_acc += tl.sum(tl.where(mask, ddt, 0.0), axis=1)
            tl.store(ddt_ptr + b * s_dtb + row * s_dtd + pos[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=mask)
            if HAS_Z:
                if HAS_D:
                    y_t += Dv[:, None] * u
                tl.store(dz_ptr + b * s_dzb + row * s_dzd + pos[None, :], (y_t * G).to(dz_ptr.dtype.element_ty), mask=mask)
            # the sub-block's rows of dB and dC (summed over the tile's channels), one add per element
            if SCATTER:
                rpos = ps + c_idx
                rmask = ((c_idx < SUB) & (rpos < blk_end))[:, None]
            else:
                rpos = ps + r_idx
                rmask = ((r_idx < SUB) & (rpos < blk_end))[:, None]
            roff = rpos.to(tl.int64)[:, None] * N + n_idx[None, :]
            tl.atomic_add(dBt_ptr + b * s_Bb + g * s_Bg + roff, dB_rows, mask=rmask, sem="relaxed")
            tl.atomic_add(dCt_ptr + b * s_Cb + g * s_Cg + roff, dC_rows, mask=rmask, sem="relaxed")
    if SMEM_ROWS:
        _smem_op(_SMEM_WAIT_ALL, t_idx)
    _add_channel_grads(dA_ptr, dD_ptr, dbias_ptr, offs_d, mask_d, n_idx, dA_acc, dD_acc, dbias_acc, N, HAS_D, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# Launch configuration


def _fit_channels(block_d: int, dim: int, groups: int) -> int:
    """A channel tile no larger than needed, and (with groups) not straddling two groups: the largest
    power of two ≤ block_d dividing dim/groups."""
    if groups > 1:
        while block_d > 1 and (dim // groups) % block_d:
            block_d //= 2
        return block_d
    return min(block_d, triton.next_power_of_2(dim))


def _config(dim: int, groups: int, state: int, window: int | None, backward: bool, override: dict | None = None) -> dict:
    """Tile sizes: BLOCK_D channels × T positions per state; T a power of two ≥ the window.

    `override` (keys BLOCK_D, T, num_warps, CPS) is for tuning and tests; the group rule still applies.
    """
    # defaults: the fastest of the sweeps on an H200 at B1 D1024 N16 L131072 (kernels/NOTES.md)
    T = 64
    block_d = 8 if backward else 2
    num_warps = None
    cps = None
    if override:
        T = override.get("T", T)
        block_d = override.get("BLOCK_D", block_d)
        num_warps = override.get("num_warps")
        cps = override.get("CPS")
    if window:
        T = max(T, triton.next_power_of_2(window))
    block_d = _fit_channels(block_d, dim, groups)
    step = T if not window else (T // window) * window
    if num_warps is None:
        num_warps = max(1, min(8, block_d * T // 256))
    return dict(BLOCK_D=block_d, T=T, STEP=step, num_warps=num_warps, CPS=cps)


def _segments(n_chunks: int, programs: int, num_warps: int, device: torch.device, cps: int | None,
              warps_per_sm: int = 48) -> tuple[int, int]:
    """(chunks per segment, segments): enough programs to fill the GPU even for one long sequence.

    The segment count keeps the programs within the warps asked (`warps_per_sm` on every SM) when that
    still fills at least 3/4 of them: at batch > 1 rounding up instead put a sliver of the programs in
    one more wave (H200, D1024 N16 bf16, kernels/NOTES.md session 14: forward 1.46 -> 1.18 ms at B8
    L16384, 1.60 -> 1.19 at B4 L32768). Otherwise, rounded up."""
    if cps is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            sms = 4
        want_warps = warps_per_sm * sms
        per_seg = max(1, programs * num_warps)
        fit = want_warps // per_seg
        n_seg = fit if fit >= 1 and 4 * fit * per_seg >= 3 * want_warps else -(-want_warps // per_seg)
        n_seg = max(1, min(n_chunks, n_seg))
        cps = max(1, -(-n_chunks // n_seg))
    cps = max(1, int(cps))
    return cps, -(-n_chunks // cps)


# Which forward runs: "auto" (sequential where `_seq_fits`, else scan), "seq" or "scan" (tests, benchmarks).
FORWARD = "auto"
# Which backward runs: "auto" (sequential wherever the sequential forward runs, else scan) or "scan".
BACKWARD = "auto"
SEQ_MAX_STATE = 64
SEQ_MAX_WINDOW = 16
# Warps the sequential forward asks per SM before it splits the length into more segments.
SEQ_WARPS_PER_SM = 16
# The same for the sequential backward.
BWD_SEQ_WARPS_PER_SM = 32

# Tests set this to fill outputs with NaN before each launch, so unwritten elements show.
POISON_OUTPUTS = False
# Tests and tuning set this ({"fwd": {...}, "bwd": {...}, "seq": {...}, "bwd_seq": {...}}) to force tiles:
# fwd/bwd (scan kernels) keys BLOCK_D, T, num_warps, CPS; seq (sequential forward) keys BLOCK_D, TB,
# num_warps, SEG (scan chunks per segment), PREFETCH, PREFETCH_BC; bwd_seq (sequential backward) keys
# TB (plain block), SUB, VEC, BLOCK_D, num_warps, SEG (blocks per segment), WARPS_PER_SM, maxnreg.
TILE_OVERRIDE: dict | None = None



def _saved_states(batch: int, dim: int, Np: int, n_chunks: int, device) -> torch.Tensor:
    """The states the forward saves for the backward, indexed (batch, dim, state, chunk) but laid out
    (batch, chunk, dim, state): a chunk's states are one contiguous slab, so saving them is a
    coalesced store of every channel's row rather than one scattered 4-byte store per element."""
    return torch.empty((batch, n_chunks, dim, Np), device=device, dtype=torch.float32).permute(0, 2, 3, 1)


# Registers and spills of the last compiled launch of each kernel (benchmarks print them).
KERNEL_RESOURCES: dict = {}


def _note_kernel(name: str, kern) -> None:
    regs, spills = getattr(kern, "n_regs", None), getattr(kern, "n_spills", None)
    if regs is not None:
        KERNEL_RESOURCES[name] = dict(regs=regs, spills=spills)


def _out_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if POISON_OUTPUTS else torch.empty_like(t)


# ---------------------------------------------------------------------------------------------
# Python side: checks, autograd


def _as_groups(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise TritonScanError(f"{name} must be (batch, state, length) or (batch, groups, state, length), got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(u, delta, A, B, C, D, z, delta_bias):
    for name, t in (("u", u), ("delta", delta), ("z", z)):
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise TritonScanError(f"{name}: dtype {t.dtype} not supported by the Triton scan (fp32, fp16, bf16)")
        if t.dim() != 3 or t.shape != u.shape:
            raise TritonScanError(f"{name} must be (batch, dim, length) like u {tuple(u.shape)}, got {tuple(t.shape)}")
    if A.dtype != torch.float32 or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise TritonScanError(f"A must be fp32 (dim, state) with dim {u.shape[1]}, got {A.dtype} {tuple(A.shape)}")
    if A.shape[1] > MAX_STATE:
        raise TritonScanError(f"A: state size {A.shape[1]} exceeds the Triton scan's limit {MAX_STATE}")
    for name, t in (("B", B), ("C", C)):
        if t.dtype not in _DTYPES:
            raise TritonScanError(f"{name}: dtype {t.dtype} not supported by the Triton scan")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != u.shape[1]):
            raise TritonScanError(f"{name} must be (dim,) = ({u.shape[1]},), got {tuple(t.shape)}")
    if not u.is_cuda and not _interpreting():
        raise TritonScanError("the Triton scan runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rows_kernel(B_ptr, C_ptr, Bt_ptr, Ct_ptr, L, LP, G, s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
                 N: tl.constexpr, BLOCK_L: tl.constexpr):
    """B and C (batch, groups, N, L), any strides, into contiguous (batch, groups, LP, N) row buffers, zero
    from row L on: one launch for both (program axis 2 picks which). The sequential kernels read one
    row per position."""
    l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    bg = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    n = tl.arange(0, N)
    src = b * s_Bb + g * s_Bg + n[:, None] * s_Bn + l[None, :].to(tl.int64) * s_Bl
    dst = (bg.to(tl.int64) * LP + l[None, :]) * N + n[:, None]
    inside = (l < L)[None, :]
    rows = (l < LP)[None, :]
    if tl.program_id(2) == 0:
        tl.store(Bt_ptr + dst, tl.load(B_ptr + src, mask=inside, other=0.0), mask=rows)
    else:
        src = b * s_Cb + g * s_Cg + n[:, None] * s_Cn + l[None, :].to(tl.int64) * s_Cl
        tl.store(Ct_ptr + dst, tl.load(C_ptr + src, mask=inside, other=0.0), mask=rows)


def _transposed_rows(B4: torch.Tensor, C4: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, groups, L + extra, state) contiguous fp32 copies of B4 and C4 transposed, the extra rows zero.
    Same as `F.pad(X.transpose(2, 3), (0, 0, 0, extra)).float()` for both (the tests compare them),
    in one launch instead of four (a fill and a copy each).

    fp32 whatever B and C come in (bf16 under autocast: x_proj's output), which changes no value and lets
    the sequential kernels stage the rows in shared memory (`SMEM_ROWS`: fp32 rows of 16 states only)."""
    batch, groups, N, L = B4.shape
    LP = L + extra
    Bt = torch.empty((batch, groups, LP, N), device=B4.device, dtype=torch.float32)
    Ct = torch.empty((batch, groups, LP, N), device=C4.device, dtype=torch.float32)
    block_l = max(16, 4096 // N)
    _rows_kernel[(triton.cdiv(LP, block_l), batch * groups, 2)](
        B4, C4, Bt, Ct, L, LP, groups, *B4.stride(), *C4.stride(), N=N, BLOCK_L=block_l, num_warps=4)
    return Bt, Ct


def _pad_state(A, B4, C4, Np):
    N = A.shape[1]
    if Np == N:
        return A, B4, C4
    # tl.arange needs a power of two: padded states have A = B = C = 0 and contribute nothing
    pad = torch.nn.functional.pad
    return pad(A, (0, Np - N)), pad(B4, (0, 0, 0, Np - N)), pad(C4, (0, 0, 0, Np - N))


def _fwd(u, delta, A, B4, C4, D, z, delta_bias, softplus, window, save_states, save_last, cfg=None, resets=None):
    """The forward: sequential kernels where they fit (`FORWARD`), else the scan kernels.

    Returns out, saved states (or None), last state (or None), and a config for the backward: the
    scan kernels' config, whose chunks index the saved states, with "bwd" = "scan"; or, where the
    sequential backward runs, its config with "bwd" = "seq" (states saved at every one of its blocks).
    resets: (batch, length + 1) int8, 1 where a packed sequence starts (the sequential kernels only).
    """
    N = A.shape[1]
    Np = triton.next_power_of_2(N)
    use_seq = FORWARD == "seq" or (FORWARD == "auto" and _seq_fits(Np, window))
    tiles = TILE_OVERRIDE or {}
    if use_seq:
        seq_override = tiles.get("seq")
        bwd_seq = None
        if save_states and BACKWARD == "auto":
            bwd_seq = _bwd_seq_config(u.shape[1], B4.shape[1], Np, window, tiles.get("bwd_seq"))
            # the forward walks blocks of the backward's size and saves the state entering each
            seq_override = {**(seq_override or {}), "TB": bwd_seq["STEP"]}
        elif save_states and resets is not None:
            raise TritonScanError("seq_idx: packed sequences run in the sequential backward only (BACKWARD='auto')")
        out, hs, last, scan_cfg = _fwd_seq(u, delta, A, B4, C4, D, z, delta_bias, softplus, window, save_states,
                                           save_last, cfg=cfg, seq_override=seq_override,
                                           save_every=bwd_seq["STEP"] if bwd_seq is not None else None, resets=resets)
        rows = scan_cfg.pop("rows")
        return out, hs, last, ({**bwd_seq, "bwd": "seq", "rows": rows} if bwd_seq is not None else {**scan_cfg, "bwd": "scan"})
    if resets is not None:
        raise TritonScanError(f"seq_idx: packed sequences run in the sequential kernels only (state ≤ {SEQ_MAX_STATE}, "
                              f"window ≤ {SEQ_MAX_WINDOW}), got state {N}" + (f" and window {window}" if window else ""))
    out, hs, last, scan_cfg = _fwd_scan(u, delta, A, B4, C4, D, z, delta_bias, softplus, window, save_states, save_last,
                                        cfg=cfg)
    return out, hs, last, {**scan_cfg, "bwd": "scan"}


def _seq_fits(Np: int, window: int | None) -> bool:
    """Where the sequential forward fits: a thread keeps its states (and for LB a window's decays) in registers."""
    if window:
        return window <= SEQ_MAX_WINDOW and Np * triton.next_power_of_2(window) <= 256
    return Np <= SEQ_MAX_STATE


def _bwd_seq_config(dim: int, groups: int, Np: int, window: int | None, override: dict | None) -> dict:
    """The sequential backward's blocks and tiles.

    A block is STEP positions (TB = 16, or one LB window), loaded as (BLOCK_D, TB) tiles; the forward
    saves the state entering every block. A block is walked in sub-blocks of SUB positions from the
    last: the walk forward keeps h_t (and μ_t for LB) of a sub-block's positions in registers, so
    SUB bounds them; each sub-block but the first costs a walk from the block's start (2.5
    exponentials per element-state at SUB = STEP / 2 instead of 2). The tiles load as VEC-wide rows
    (`_positions`), so TB/VEC lanes share a channel and BLOCK_D = 32·warps/(TB/VEC) channels fill a warp
    (8 at the defaults: 4 states per thread at state 16).
    """
    override = override or {}
    step = int(window) if window else int(override.get("TB", 16))
    sub = min(step, int(override.get("SUB", step if step <= 8 else -(-step // 2))))
    # tiles of at least 16 positions (of which SUB are used), read as VEC-wide vectors: TB/VEC lanes per
    # channel, and the state tile (BLOCK_D, state) follows that layout with state/(TB/VEC) states per thread
    tb = max(16, triton.next_power_of_2(sub))
    vec = int(override.get("VEC", 4))
    num_warps = int(override.get("num_warps", 1))
    lanes = tb // (vec or 8)
    block_d = int(override.get("BLOCK_D", 32 * num_warps // lanes))
    block_d = _fit_channels(block_d, dim, groups)
    # the picks of a position's Δ, Δu, dy, the sums over states and the lane swaps below in PTX shuffles
    # (`_pick_row`, `_state_sum`, `_swap_rows`): only for the tile layout they were written for, and not
    # in the interpreter
    shfl = (bool(override.get("SHFL", True)) and not _interpreting() and block_d == 8 and Np == 16 and tb == 16
            and vec == 4 and num_warps == 1 and sub <= 8)
    # dB and dC summed over the tile's 8 channels by a reduce-scatter over a sub-block's (at most 8)
    # positions (`_fold`) instead of a `tl.sum` per position. Compiled, only with the PTX swaps: through
    # `tl.gather` it goes via shared memory and is slower (9.3 against 6.2 ms, kernels/NOTES.md); in the
    # interpreter, where that does not matter, with `tl.gather`, so that its logic is tested on the CPU
    scatter = bool(override.get("SCATTER", True)) and block_d == 8 and sub <= 8 and (shfl or _interpreting())
    # B and C rows staged in shared memory, as in the forward (`_smem_fill`): the same tiles as the shuffles,
    # blocks of 16; `_bwd_seq` also needs fp32 rows and checks the compiled layout
    smem = (bool(override.get("SMEM_ROWS", True)) and not _interpreting() and block_d == 8 and Np == 16 and tb == 16
            and step == 16 and vec == 4 and num_warps == 1 and sub <= 8)
    return dict(BLOCK_D=block_d, STEP=step, SUB=sub, TB=tb, VEC=vec, num_warps=num_warps, SEG=override.get("SEG"),
                SCATTER=scatter, SHFL=shfl, SMEM_ROWS=smem,
                maxnreg=override.get("maxnreg"), WARPS_PER_SM=int(override.get("WARPS_PER_SM", BWD_SEQ_WARPS_PER_SM)),
                # the block walked next asked into L1 a block ahead (inline PTX: not in the interpreter)
                PREFETCH_L1=bool(override.get("PREFETCH_L1", True)) and not _interpreting())


def _seq_config(dim: int, groups: int, window: int | None, chunk: int, override: dict | None) -> dict:
    """Block of TB positions (STEP of them live): one window for LB; BLOCK_D channels for one warp."""
    if window:
        step, tb = window, triton.next_power_of_2(window)
    else:
        # blocks of TB positions (any count: the sequential backward's blocks need not be a power of two)
        step = (override or {}).get("TB", 16)
        tb = triton.next_power_of_2(step)
    if chunk % step:
        raise TritonScanError(f"internal: scan chunk {chunk} is not a multiple of the sequential block {step}")
    num_warps = (override or {}).get("num_warps", 1)
    # 16-byte rows of u and Δ per thread: 8 positions of bf16/fp16 per lane, so TB/8 lanes share a channel
    # (4-wide rows, as the backward uses, measured slower here: kernels/NOTES.md)
    block_d = (override or {}).get("BLOCK_D", 32 * num_warps * 8 // max(8, tb))
    block_d = _fit_channels(block_d, dim, groups)
    shfl_tiles = not _interpreting() and block_d == 16 and tb == 16 and step == 16 and num_warps == 1
    smem = bool((override or {}).get("SMEM_ROWS", True)) and shfl_tiles
    return dict(BLOCK_D=block_d, TB=tb, STEP=step, SAVE_EVERY=chunk // step, num_warps=num_warps,
                SEG=(override or {}).get("SEG"),
                # measured on an H200 at B1 D1024 N16 L131072 (kernels/NOTES.md): the u/Δ prefetch pays for LB
                # and costs the plain forward registers and time; B/C one position ahead pays for the plain
                # forward (1.32 against 1.51 ms) and not for LB windows of 16 (1.56 against 1.53, session 10;
                # smaller windows keep it: without it ptxas spills more there, SASS)
                PREFETCH=bool((override or {}).get("PREFETCH", bool(window))),
                PREFETCH_BC=bool((override or {}).get("PREFETCH_BC", not (window and tb >= 16))),
                # the next block's rows asked into L1 a block ahead (inline PTX: not in the interpreter)
                PREFETCH_L1=bool((override or {}).get("PREFETCH_L1", True)) and not _interpreting(),
                # with PREFETCH, the next block's u and Δ asked for after the walks in program order, not before:
                # ptxas had walk-back FMAs wait on that load's scoreboard (shared with shared-memory reads) 14-20
                # instructions after it, for memory; after the walks those waits come 219 and 256 instructions later
                # (`kernels.sass_check`) and the loads are not live across the walks. H200, B1 D1024 N16 L131072
                # (session 15, kernels/NOTES.md): LB 16 1.392 -> 1.265 ms
                LATE_NEXT=bool((override or {}).get("LATE_NEXT", True)),
                # how many blocks ahead the L1 hint for u and Δ goes (2 took most of that cost out with the loads
                # before the walks, 1.39 -> 1.31 ms; with them after, 1 is best: 1.265 against 1.285)
                IN_AHEAD=int((override or {}).get("IN_AHEAD", 1)),
                # each position's sum over states added into the output tile after the walks, not during them
                # (`_walk_window`): pays where a channel's positions are split over lanes (TB 16)
                SUMS_AFTER=bool((override or {}).get("SUMS_AFTER", tb >= 16)),
                # a position's Δ and Δu picked by one PTX shuffle (`_pick_row`): only at the tiles it was written
                # for (`_fwd_seq` also checks the compiled layout; state 16 there). Measured on an H200 at B1 D1024
                # N16 L131072 bf16 (kernels/NOTES.md, session 12): plain forward 1.31 -> 1.23 ms; LB 16 1.53 ->
                # 1.56, so off there by default
                # 1.56, so off there by default; and off where the rows come from shared memory (below): plain forward
                # 0.985 against 1.067 ms with the picks by shuffle (session 14)
                SHFL_PICK=bool((override or {}).get("SHFL_PICK", not window and not smem)) and shfl_tiles,
                # the same where the rows do not come from shared memory after all (`_fwd_seq`: bf16 rows, say)
                SHFL_PICK_ALONE=bool((override or {}).get("SHFL_PICK", not window)) and shfl_tiles,
                # the B and C rows staged in shared memory by cp.async a block ahead and read from there by both walks
                # (`_smem_fill`, `_smem_row`; inline PTX: not in the interpreter). `_fwd_seq` also needs fp32 rows of
                # 16 states and checks the compiled layout. H200, B1 D1024 N16 L131072 bf16 (session 14): plain forward
                # 1.145 -> 0.985 ms (with the picks above off), LB 16 1.474 -> 1.394
                SMEM_ROWS=smem,
                # a register cap for ptxas (sweeps only: every cap tried made the LB forward slower)
                maxnreg=(override or {}).get("maxnreg"))


def _fwd_seq(u, delta, A, B4, C4, D, z, delta_bias, softplus, window, save_states, save_last, cfg=None, seq_override=None,
             save_every=None, resets=None):
    """The sequential forward. States are saved entering every scan chunk (for the scan backward), or
    every `save_every` positions, one of its own blocks (for the sequential backward)."""
    batch, dim, L = u.shape
    groups, N = B4.shape[1], A.shape[1]
    if dim % groups:
        raise TritonScanError(f"dim {dim} is not a multiple of groups {groups}")
    scan_cfg = _config(dim, groups, N, window, backward=False, override=cfg)
    chunk = save_every or scan_cfg["STEP"]
    sc = _seq_config(dim, groups, window, chunk, seq_override)
    bd, nw = sc["BLOCK_D"], sc["num_warps"]
    n_chunks = triton.cdiv(L, chunk)
    d_tiles = triton.cdiv(dim, bd)
    if sc["SEG"] is not None:
        cps = max(1, int(sc["SEG"]))
    else:
        cps, _ = _segments(n_chunks, d_tiles * batch, nw, u.device, None, warps_per_sm=SEQ_WARPS_PER_SM)
    n_seg = triton.cdiv(n_chunks, cps)
    seg_len = cps * chunk
    Np = triton.next_power_of_2(N)
    A, B4, C4 = _pad_state(A, B4, C4, Np)
    # (batch, groups, length + TB, state): one row per position, TB zero rows so blocks read unmasked
    Bt, Ct = _transposed_rows(B4, C4, sc["TB"])
    out = _out_like(u)
    f32 = dict(device=u.device, dtype=torch.float32)
    hs = _saved_states(batch, dim, Np, n_chunks, u.device) if save_states else out
    last = torch.empty((batch, dim, Np), **f32) if save_last else out
    sx = torch.empty((batch, dim, Np, n_seg), **f32)
    sp = torch.empty((batch, dim, Np, n_seg), **f32)
    zz = z if z is not None else u
    bias = delta_bias if delta_bias is not None else u
    rs = resets if resets is not None else u
    s_rb = resets.stride(0) if resets is not None else 0
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus))
    tiles = dict(N=Np, BLOCK_D=bd, TB=sc["TB"], STEP=sc["STEP"])
    if n_seg > 1:
        _fwd_seq_summary_kernel[(d_tiles, batch, n_seg - 1)](
            u, delta, A, Bt, bias, sx, sp, rs, L, dim, dim // groups, seg_len, n_seg,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), Bt.stride(0), Bt.stride(1),
            A.stride(0), A.stride(1), s_rb, **tiles, **flags, HAS_RESET=resets is not None, num_warps=nw,
        )
    args = (
        u, delta, A, Bt, Ct, D if D is not None else u, zz, bias, out, hs, last, sx, sp, rs,
        L, dim, dim // groups, seg_len, n_seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1), out.stride(0), out.stride(1),
        Bt.stride(0), Bt.stride(1), Ct.stride(0), Ct.stride(1), A.stride(0), A.stride(1),
        *(hs.stride() if save_states else (0, 0, 0, 0)), s_rb,
    )
    # B and C rows staged in shared memory: fp32 rows of 16 states (64 bytes) only
    smem_rows = sc["SMEM_ROWS"] and Np == 16 and Bt.dtype == torch.float32
    consts = dict(
        **tiles, WINDOW=int(window or 0), SAVE_EVERY=sc["SAVE_EVERY"], PREFETCH=sc["PREFETCH"],
        PREFETCH_BC=sc["PREFETCH_BC"] and not smem_rows,
        PREFETCH_L1=sc["PREFETCH_L1"], IN_AHEAD=sc["IN_AHEAD"], LATE_NEXT=sc["LATE_NEXT"],
        SUMS_AFTER=sc["SUMS_AFTER"],
        SHFL_PICK=sc["SHFL_PICK" if smem_rows else "SHFL_PICK_ALONE"] and Np == 16,
        SMEM_ROWS=smem_rows,
        HAS_D=D is not None, HAS_Z=z is not None, **flags,
        SAVE_STATES=save_states, SAVE_LAST=save_last, HAS_RESET=resets is not None, num_warps=nw,
        **({"maxnreg": sc["maxnreg"]} if sc["maxnreg"] else {}),
    )
    grid = (d_tiles, batch, n_seg)
    if (consts["SHFL_PICK"] or consts["SMEM_ROWS"]) and not _shuffles_fit(_fwd_seq_kernel, args, consts, grid,
                                                                         FWD_SHFL_LAYOUT):
        # both are written for FWD_SHFL_LAYOUT: neither runs on another
        consts.update(SHFL_PICK=False, SMEM_ROWS=False, PREFETCH_BC=sc["PREFETCH_BC"])
    kern = _fwd_seq_kernel[grid](*args, **consts)
    _note_kernel("fwd_seq_lb" if window else "fwd_seq", kern)
    # the row copies go with the config, for the sequential backward to reuse (`_bwd_seq`: one launch and
    # two buffers fewer; they are small beside the saved states)
    return out, (hs if save_states else None), (last[:, :, :N] if save_last else None), {**scan_cfg, "rows": (Bt, Ct)}


def _fwd_scan(u, delta, A, B4, C4, D, z, delta_bias, softplus, window, save_states, save_last, cfg=None):
    """Launch the scan forward kernels. Returns out, saved chunk states (or None), last state (or None), config."""
    batch, dim, L = u.shape
    groups, N = B4.shape[1], A.shape[1]
    if dim % groups:
        raise TritonScanError(f"dim {dim} is not a multiple of groups {groups}")
    cfg = _config(dim, groups, N, window, backward=False, override=cfg)
    bd, T, step, nw = cfg["BLOCK_D"], cfg["T"], cfg["STEP"], cfg["num_warps"]
    n_chunks = triton.cdiv(L, step)
    d_tiles = triton.cdiv(dim, bd)
    cps, n_seg = _segments(n_chunks, d_tiles * batch, nw, u.device, cfg["CPS"])
    Np = triton.next_power_of_2(N)
    A, B4, C4 = _pad_state(A, B4, C4, Np)
    out = _out_like(u)
    f32 = dict(device=u.device, dtype=torch.float32)
    hs = _saved_states(batch, dim, Np, n_chunks, u.device) if save_states else out
    last = torch.empty((batch, dim, Np), **f32) if save_last else out
    sx = torch.empty((batch, dim, Np, n_seg), **f32)
    sp = torch.empty((batch, dim, Np, n_seg), **f32)
    zz = z if z is not None else u
    bias = delta_bias if delta_bias is not None else u
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus))
    if n_seg > 1:
        _fwd_segment_kernel[(d_tiles, batch, n_seg - 1)](
            u, delta, A, B4, bias, sx, sp,
            L, dim, dim // groups, n_chunks, cps, n_seg,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
            A.stride(0), A.stride(1),
            N=Np, BLOCK_D=bd, T=T, STEP=step, **flags, num_warps=nw,
        )
    _fwd_kernel[(d_tiles, batch, n_seg)](
        u, delta, A, B4, C4, D if D is not None else u, zz, bias, out, hs, last, sx, sp,
        L, dim, dim // groups, n_chunks, cps, n_seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1), out.stride(0), out.stride(1),
        B4.stride(0), B4.stride(1), B4.stride(2), C4.stride(0), C4.stride(1), C4.stride(2), A.stride(0), A.stride(1),
        *(hs.stride() if save_states else (0, 0, 0, 0)),
        N=Np, BLOCK_D=bd, T=T, STEP=step, WINDOW=int(window or 0),
        HAS_D=D is not None, HAS_Z=z is not None, **flags,
        SAVE_STATES=save_states, SAVE_LAST=save_last, num_warps=nw,
    )
    return out, (hs if save_states else None), (last[:, :, :N] if save_last else None), cfg


def _grad_buffers(u, delta, z, D, delta_bias, softplus, Np, n_seg, b_shape, c_shape):
    """What a backward launch writes: du, dΔ, dz (poisoned in tests), dA, dB, dC, dD, dΔ-bias (zeroed: the
    kernels add into them), the segment summaries sk, sj; then stand-ins the kernels take for absent
    z, dz and bias (never read: the flags say so) and those flags."""
    batch, dim, _ = u.shape
    f32 = dict(device=u.device, dtype=torch.float32)
    du = _out_like(u)
    dz = _out_like(z) if z is not None else None
    zero_dim = (lambda: torch.zeros(dim, **f32))
    return (du, _out_like(delta), dz, torch.zeros((dim, Np), **f32), torch.zeros(b_shape, **f32),
            torch.zeros(c_shape, **f32), zero_dim() if D is not None else None,
            zero_dim() if delta_bias is not None else None,
            torch.empty((batch, dim, Np, n_seg), **f32), torch.empty((batch, dim, Np, n_seg), **f32),
            z if z is not None else u, dz if dz is not None else du, delta_bias if delta_bias is not None else u,
            dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus)))


def _bwd(dout, u, delta, A, B4, C4, D, z, delta_bias, softplus, window, hs, fwd_cfg, cfg=None, rows=None, resets=None):
    """Launch the backward kernels; `fwd_cfg` is the forward's config (its chunks or blocks index `hs`);
    `rows`: the sequential forward's B and C row copies, if it kept them."""
    if fwd_cfg["bwd"] == "seq":
        return _bwd_seq(dout, u, delta, A, B4, C4, D, z, delta_bias, softplus, window, hs, fwd_cfg, rows=rows,
                        resets=resets)
    if resets is not None:  # (`_fwd` refuses this pairing)
        raise TritonScanError("seq_idx: packed sequences run in the sequential backward only")
    batch, dim, L = u.shape
    groups, N = B4.shape[1], A.shape[1]
    Np = hs.shape[2]
    cfg = _config(dim, groups, N, window, backward=True, override={**(cfg or {}), "T": fwd_cfg["T"]})
    cfg["STEP"] = fwd_cfg["STEP"]
    bd, T, step, nw = cfg["BLOCK_D"], cfg["T"], cfg["STEP"], cfg["num_warps"]
    n_chunks = hs.shape[3]
    d_tiles = triton.cdiv(dim, bd)
    cps, n_seg = _segments(n_chunks, d_tiles * batch, nw, u.device, cfg["CPS"])
    A, B4, C4 = _pad_state(A, B4, C4, Np)
    dout = _rows(dout)
    du, ddt, dz, dA, dB, dC, dD, dbias, sk, sj, zz, dzz, bias, flags = _grad_buffers(
        u, delta, z, D, delta_bias, softplus, Np, n_seg, B4.shape, C4.shape)
    if n_seg > 1:
        _bwd_segment_kernel[(d_tiles, batch, n_seg - 1)](
            u, delta, A, C4, zz, bias, dout, sk, sj,
            L, dim, dim // groups, n_chunks, cps, n_seg,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
            dout.stride(0), dout.stride(1), C4.stride(0), C4.stride(1), C4.stride(2), A.stride(0), A.stride(1),
            N=Np, BLOCK_D=bd, T=T, STEP=step, **flags, num_warps=nw,
        )
    _bwd_kernel[(d_tiles, batch, n_seg)](
        u, delta, A, B4, C4, D if D is not None else u, zz, bias, dout, hs, sk, sj,
        du, ddt, dA, dB, dC, dD if dD is not None else dA, dzz, dbias if dbias is not None else dA,
        L, dim, dim // groups, n_chunks, cps, n_seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1),
        du.stride(0), du.stride(1), ddt.stride(0), ddt.stride(1), dzz.stride(0), dzz.stride(1),
        B4.stride(0), B4.stride(1), B4.stride(2), C4.stride(0), C4.stride(1), C4.stride(2), A.stride(0), A.stride(1),
        hs.stride(0), hs.stride(1), hs.stride(2), hs.stride(3),
        dB.stride(0), dB.stride(1), dB.stride(2), dC.stride(0), dC.stride(1), dC.stride(2),
        N=Np, BLOCK_D=bd, T=T, STEP=step, WINDOW=int(window or 0), HAS_D=D is not None, **flags, num_warps=nw,
    )
    return du, ddt, dA[:, :N], dB[:, :, :N], dC[:, :, :N], dD, dz, dbias


# The layout `_PICK_PTX` and `_SWAP_PTX` were written for, as Triton prints it in the TTGIR
BWD_SHFL_LAYOUT = "sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [1, 1], order = [1, 0]"
# and the one `_PICK8_PTX` was written for (the forward)
FWD_SHFL_LAYOUT = "sizePerThread = [1, 8], threadsPerWarp = [16, 2], warpsPerCTA = [1, 1], order = [1, 0]"
# Per kernel and specialization with PTX shuffles: whether they got the layout they were written for
_SHUFFLES_CHECKED: dict = {}


# What marks the inline assembly written for one tile layout: the PTX shuffles, and the shared-memory row reads
LAYOUT_ASM = ("shfl.sync", "ld.volatile.shared")


def _shuffle_layouts_ok(ttgir: str, layout: str = BWD_SHFL_LAYOUT, markers: tuple = ("shfl.sync",)) -> bool:
    """Whether a compiled kernel has PTX shuffles (inline assembly containing one of `markers`; the
    shared-memory row reads too, with `LAYOUT_ASM`) and every one of them works on tensors of `layout`
    (Triton chooses layouts from the loads' alignment: a row stride not a multiple of 16 elements, say,
    gives another one, where the shuffles would read the wrong lanes)."""
    blocked = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{(.*)\}>", ttgir, re.M))
    shuffles = [line for line in ttgir.splitlines()
                if "tt.elementwise_inline_asm" in line and any(m in line for m in markers)]
    return bool(shuffles) and all(
        blocked.get(alias) == layout for line in shuffles for alias in re.findall(r"tensor<[0-9x]+x[fi]32, (#\w+)>", line))


def _specialization(args: tuple, consts: dict) -> tuple:
    """What Triton specializes a launch on, or finer: dtypes and 16-byte alignment of tensors, integers
    equal to 1 or multiples of 16, and the compile-time constants."""
    key = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0, a >= 2**31)
                for a in args)
    return key + tuple(sorted(consts.items()))


def _shuffles_fit(kernel, args: tuple, consts: dict, grid: tuple, layout: str) -> bool:
    """Whether `kernel`, launched with these arguments, has its layout-bound assembly (PTX shuffles, shared-memory
    row reads: `LAYOUT_ASM`) on tiles of `layout`: compiled without launching and read once per specialization
    (`_specialization`, about 8 µs of host time per launch)."""
    key = (kernel.fn.__name__,) + _specialization(args, consts)
    if key not in _SHUFFLES_CHECKED:
        _SHUFFLES_CHECKED[key] = _shuffle_layouts_ok(kernel.warmup(*args, grid=grid, **consts).asm["ttgir"], layout,
                                                     LAYOUT_ASM)
    return _SHUFFLES_CHECKED[key]


def _bwd_seq(dout, u, delta, A, B4, C4, D, z, delta_bias, softplus, window, hs, sc, rows=None, resets=None):
    """Launch the sequential backward; `sc` is its config, whose blocks index the saved states `hs`. `rows`:
    the forward's (Bt, Ct) row copies, used where their zero rows past the end are as many as needed here."""
    batch, dim, L = u.shape
    groups, N = B4.shape[1], A.shape[1]
    Np = hs.shape[2]
    bd, step, nw = sc["BLOCK_D"], sc["STEP"], sc["num_warps"]
    n_blocks = hs.shape[3]
    d_tiles = triton.cdiv(dim, bd)
    if sc["SEG"] is not None:
        cps = max(1, int(sc["SEG"]))
    else:
        cps, _ = _segments(n_blocks, d_tiles * batch, nw, u.device, None, warps_per_sm=sc["WARPS_PER_SM"])
    n_seg = triton.cdiv(n_blocks, cps)
    seg_len = cps * step
    A, B4, C4 = _pad_state(A, B4, C4, Np)
    # The kernel reads B and C rows without a mask, in sub-blocks of SUB from each block's start: up to
    # ceil(STEP / SUB) * SUB - 1 rows past the last block's start, which can be more than STEP rows past
    # the end (STEP 4, SUB 3: 6 rows). Zero rows there; a row read past the buffer was heap garbage,
    # and 0 × NaN poisoned the gradients at the sequence's end now and then.
    extra = triton.cdiv(step, sc["SUB"]) * sc["SUB"]
    if rows is not None and rows[0].shape[2] - L >= extra and rows[0].shape[3] == Np:
        Bt, Ct = rows
    else:
        Bt, Ct = _transposed_rows(B4, C4, extra)
    dout = _rows(dout)
    # dB and dC accumulate in the transposed (batch, groups, length, state) layout of Bt and Ct
    du, ddt, dz, dA, dBt, dCt, dD, dbias, sk, sj, zz, dzz, bias, flags = _grad_buffers(
        u, delta, z, D, delta_bias, softplus, Np, n_seg, Bt.shape, Ct.shape)
    rs = resets if resets is not None else u
    s_rb = resets.stride(0) if resets is not None else 0
    if n_seg > 1:
        _bwd_seq_summary_kernel[(d_tiles, batch, n_seg - 1)](
            u, delta, A, Ct, zz, bias, dout, sk, sj, rs, L, dim, dim // groups, seg_len, n_seg,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
            dout.stride(0), dout.stride(1), Ct.stride(0), Ct.stride(1), A.stride(0), A.stride(1), s_rb,
            N=Np, BLOCK_D=bd, TB=triton.next_power_of_2(step), STEP=step, **flags, HAS_RESET=resets is not None,
            num_warps=nw,
        )
    args = (
        u, delta, A, Bt, Ct, D if D is not None else u, zz, bias, dout, hs, sk, sj,
        du, ddt, dA, dBt, dCt, dD if dD is not None else dA, dzz, dbias if dbias is not None else dA, rs,
        L, dim, dim // groups, seg_len, n_seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1),
        du.stride(0), du.stride(1), ddt.stride(0), ddt.stride(1), dzz.stride(0), dzz.stride(1),
        Bt.stride(0), Bt.stride(1), Ct.stride(0), Ct.stride(1), A.stride(0), A.stride(1),
        hs.stride(0), hs.stride(1), hs.stride(2), hs.stride(3), s_rb,
    )
    consts = dict(
        N=Np, BLOCK_D=bd, TB=sc["TB"], STEP=step, SUB=sc["SUB"], SUBP=max(2, triton.next_power_of_2(sc["SUB"])),  # a 1-row tile trips the interpreter
        WINDOW=int(window or 0), VEC=sc["VEC"], PREFETCH_L1=sc["PREFETCH_L1"], PF=triton.next_power_of_2(step),
        SCATTER=sc["SCATTER"], SHFL=sc["SHFL"], SMEM_ROWS=sc["SMEM_ROWS"] and Bt.dtype == torch.float32,
        HAS_D=D is not None, **flags, HAS_RESET=resets is not None, num_warps=nw,
        **({"maxnreg": sc["maxnreg"]} if sc.get("maxnreg") else {}),
    )
    grid = (d_tiles, batch, n_seg)
    if (consts["SHFL"] or consts["SMEM_ROWS"]) and not _shuffles_fit(_bwd_seq_kernel, args, consts, grid,
                                                                     BWD_SHFL_LAYOUT):
        # the `tl` path, loads (the reduce-scatter needs the shuffles; all three are written for BWD_SHFL_LAYOUT)
        consts.update(SHFL=False, SCATTER=False, SMEM_ROWS=False)
    kern = _bwd_seq_kernel[grid](*args, **consts)
    _note_kernel("bwd_seq", kern)
    dB = dBt[:, :, :L].transpose(2, 3)
    dC = dCt[:, :, :L].transpose(2, 3)
    return du, ddt, dA[:, :N], dB[:, :, :N], dC[:, :, :N], dD, dz, dbias


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, window, return_last_state, resets=None):
        B3, C3 = B.dim() == 3, C.dim() == 3
        B4, C4 = _as_groups(B, "B"), _as_groups(C, "C")
        if B4.shape[1] != C4.shape[1]:
            raise TritonScanError(f"B and C must have the same groups, got {B4.shape[1]} and {C4.shape[1]}")
        u, delta = _rows(u), _rows(delta)
        z = _rows(z) if z is not None else None
        A = A.contiguous()
        need_grad = any(ctx.needs_input_grad[:8])
        tiles = TILE_OVERRIDE or {}
        out, hs, last, cfg = _fwd(u, delta, A, B4, C4, D, z, delta_bias, softplus, window, need_grad, return_last_state,
                                  cfg=tiles.get("fwd"), resets=resets)
        rows = cfg.pop("rows", None)
        if need_grad:
            ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, hs, *(rows or ()))
        ctx.cfg, ctx.resets = cfg, resets
        ctx.softplus, ctx.window, ctx.B3, ctx.C3 = softplus, window, B3, C3
        ctx.B_dtype, ctx.C_dtype = B.dtype, C.dtype
        if return_last_state:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        u, delta, A, B4, C4, D, z, delta_bias, hs, *rows = ctx.saved_tensors
        du, ddt, dA, dB, dC, dD, dz, dbias = _bwd(dout, u, delta, A, B4, C4, D, z, delta_bias, ctx.softplus, ctx.window, hs, ctx.cfg,
                                                   cfg=(TILE_OVERRIDE or {}).get("bwd"), rows=tuple(rows) or None,
                                                   resets=ctx.resets)
        dB = dB.to(ctx.B_dtype)
        dC = dC.to(ctx.C_dtype)
        if ctx.B3:
            dB = dB.squeeze(1)
        if ctx.C3:
            dC = dC.squeeze(1)
        return du, ddt, dA, dB, dC, dD, dz, dbias, None, None, None, None


def _one(u, delta, A, B, C, D, z, delta_bias, softplus, window, return_last_state, resets=None):
    return _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, softplus, window, return_last_state, resets)


def _resets(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, length + 1) int8: 1 where a packed sequence starts after position 0 (the carry into it is
    dropped); a zero column at the end."""
    out = torch.zeros(seq_idx.shape[0], seq_idx.shape[1] + 1, dtype=torch.int8, device=seq_idx.device)
    out[:, 1:-1] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int8)
    return out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   direction="forward", window=None, return_last_state=False, seq_idx=None):
    """The Triton backend of `wsimamba.ops.selective_scan` (arguments already validated there).

    Returns out (batch, dim, length) in u's dtype, and (batch, dim, state) fp32 last state with
    `return_last_state` (forward direction only).

    seq_idx (batch, length) int, nondecreasing: packed sequences, each scanned as if alone, in the sequential
    kernels (state ≤ SEQ_MAX_STATE; else TritonScanError). local_bidirectional takes them only where every
    sequence starts at a multiple of the window (its windows are counted from position 0; checked, one read
    of the flags on the host), else TritonScanError.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    if direction not in DIRECTIONS:
        raise TritonScanError(f"direction {direction!r} not supported by the Triton scan")
    if return_last_state and direction != "forward":
        raise TritonScanError("return_last_state is only defined for direction='forward'")
    if direction == "local_bidirectional" and (window is None or window < 1):
        raise TritonScanError(f"local_bidirectional needs a positive window, got {window!r}")
    resets = _resets(seq_idx) if seq_idx is not None else None
    if direction == "forward":
        return _one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, return_last_state, resets)
    if direction == "local_bidirectional":
        if resets is not None:
            starts = resets[:, :-1].bool() & (torch.arange(u.shape[-1], device=u.device) % int(window) != 0)
            if bool(starts.any()):
                raise TritonScanError(f"seq_idx: with local_bidirectional every packed sequence must start at a "
                                      f"multiple of the window ({window}) here")
        return _one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, int(window), False, resets)

    def flip(t):
        return None if t is None else t.flip(-1)

    rev = _one(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus, None, False,
               _resets(seq_idx.flip(-1)) if seq_idx is not None else None).flip(-1)
    if direction == "reverse":
        return rev
    return _one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, False, resets) + rev
