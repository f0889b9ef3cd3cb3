"""The selective scan: a chunked PyTorch reference, a naive per-step oracle, and backend dispatch.

Layout follows mamba-ssm (DESIGN.md, "The selective scan contract"):

    u, delta, z   (batch, dim, length)
    A             (dim, state), real
    B, C          (batch, state, length) or (batch, groups, state, length), dim % groups == 0
    D, delta_bias (dim,)

Per batch b, channel d and state n, with Δ = softplus(delta + delta_bias) when asked:

    a_t = exp(Δ_t A),  b_t = Δ_t B_t u_t
    forward              h_t = a_t h_{t-1} + b_t,           y_t = C_t·h_t + D u_t
    reverse              the forward op on the flipped sequence, flipped back
    bidirectional        forward output + reverse output (D u counts in both terms)
    local_bidirectional  g_t = a_t g_{t+1} + b_t inside each window of `window` tokens
                         (aligned at multiples of `window`, g = 0 past the window end),
                         y_t = C_t·(h_t + a_t g_{t+1}) + D u_t
    out = y · silu(z) when z is given.

Packed sequences (``seq_idx``, (batch, length) int, nondecreasing along the length, mamba-ssm's
convention): a new sequence starts wherever seq_idx changes, and every sequence is scanned as if alone:
h restarts at its first token, the reverse scan at its last, and local_bidirectional's windows are
counted from its first token (so a window never spans two sequences). The reference, the naive oracle
and the Triton kernels take it (Triton: in its sequential kernels, state ≤ 64, and for
local_bidirectional only where every sequence starts at a multiple of the window, as the models' packed
slots do; ``auto`` runs the reference otherwise); mamba-ssm's does not (a ScanBackendError by name).

State and accumulation are fp32 (fp64 when any input is fp64, for gradcheck); the output has u's dtype.

Backends
--------
``reference``  this module; any device; every direction; differentiable (first order: chunks are
               recomputed in backward, see :class:`_ChunkedScan`).
``triton``     the module ``wsimamba.kernels.selective_scan``, imported on first use. It defines
               ``DIRECTIONS`` (the directions it supports), ``selective_scan(u, delta, A, B, C, D, z,
               delta_bias, delta_softplus, direction, window, return_last_state)`` taking validated
               arguments (``window`` resolved to an int for ``local_bidirectional``, else None), and
               optionally ``TritonScanError``, raised for inputs it does not take (``auto`` then uses the
               reference; an explicit request gets a ScanBackendError). CUDA tensors only, or CPU tensors
               under ``TRITON_INTERPRET=1`` when asked for by name. :func:`register_backend` can also
               supply a backend.
``mamba_ssm``  mamba-ssm's CUDA kernel, when that package imports; forward natively, reverse and
               bidirectional by flipping; no ``local_bidirectional``.
``auto``       ``triton`` for CUDA tensors when it loads and supports the direction, else ``reference``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from wsimamba.errors import WsimambaError

__all__ = [
    "DIRECTIONS",
    "ScanArgumentError",
    "ScanBackendError",
    "default_window",
    "list_backends",
    "register_backend",
    "selective_scan",
    "selective_scan_naive",
    "selective_scan_reference",
]

DIRECTIONS = ("forward", "reverse", "bidirectional", "local_bidirectional")
_BACKEND_NAMES = ("auto", "reference", "triton", "mamba_ssm")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Elements of one (batch, dim, chunk, state) working tensor the reference aims for when it picks the
# chunk length itself: 2**21 fp32 elements are 8 MiB, and a chunk keeps about ten such tensors alive.
_CHUNK_ELEMENTS = 2**21
_MIN_CHUNK, _MAX_CHUNK = 32, 2048


class ScanArgumentError(WsimambaError):
    """An argument of the selective scan has a wrong shape, dtype or value."""


class ScanBackendError(WsimambaError):
    """The requested selective-scan backend cannot run these inputs here."""


def default_window(length: int) -> int:
    """LBMamba's window rule: 4 tokens for length ≤ 128, 8 for length ≤ 256, else 16."""
    if length <= 128:
        return 4
    if length <= 256:
        return 8
    return 16


# --------------------------------------------------------------------------------------------------
# argument checks


@dataclass(frozen=True)
class _Sizes:
    batch: int
    dim: int
    length: int
    state: int
    groups: int
    window: int | None


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ScanArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ScanArgumentError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")


def _check_seq_idx(seq_idx, batch: int, length: int, device, direction: str, window) -> None:
    if seq_idx is None:
        return
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in (torch.int32, torch.int64):
        raise ScanArgumentError(f"seq_idx: expected an int32/int64 tensor, got "
                                f"{seq_idx.dtype if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__}")
    if tuple(seq_idx.shape) != (batch, length):
        raise ScanArgumentError(f"seq_idx: expected shape ({batch}, {length}), got {_shape(seq_idx)}")
    if seq_idx.device != device:
        raise ScanArgumentError(f"seq_idx: on {seq_idx.device}, but u is on {device}")
    if length > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ScanArgumentError("seq_idx: must be nondecreasing along the length (one id per packed sequence, in order)")
    if direction == "local_bidirectional" and window is None:
        raise ScanArgumentError("window: give it with seq_idx (LBMamba's default depends on each sequence's length)")


def _segment_resets(seq_idx: torch.Tensor, window: int | None):
    """(batch, length) bool masks of a packing: where a sequence starts (the forward scan drops its carry
    there), where one ends (the reverse scan drops it), and for a local window where the local reverse
    scan restarts (the last token of a window counted from its sequence's first token, or of the sequence)."""
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    start = F.pad(change, (1, 0), value=True)
    end = F.pad(change, (0, 1), value=True)
    if window is None:
        return start, end, None
    pos = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=1).values  # its sequence's first token
    return start, end, end | ((pos - first + 1) % window == 0)


def _check_args(u, delta, A, B, C, D, z, delta_bias, direction, window, return_last_state, seq_idx=None) -> _Sizes:
    _check_float("u", u)
    if u.dim() != 3:
        raise ScanArgumentError(f"u: expected shape (batch, dim, length), got {_shape(u)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ScanArgumentError(f"u: length must be at least 1, got shape {_shape(u)}")
    _check_float("delta", delta)
    if delta.shape != u.shape:
        raise ScanArgumentError(f"delta: expected shape {_shape(u)} like u, got {_shape(delta)}")
    _check_float("A", A)
    if A.dim() != 2 or A.shape[0] != dim:
        raise ScanArgumentError(f"A: expected shape ({dim}, state), got {_shape(A)}")
    state = A.shape[1]
    if state < 1:
        raise ScanArgumentError(f"A: state size must be at least 1, got shape {_shape(A)}")
    groups = None
    for name, t in (("B", B), ("C", C)):
        _check_float(name, t)
        if t.dim() == 3 and t.shape == (batch, state, length):
            g = 1
        elif t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (state, length) and t.shape[1] >= 1:
            g = t.shape[1]
        else:
            raise ScanArgumentError(
                f"{name}: expected shape ({batch}, {state}, {length}) or ({batch}, groups, {state}, {length}), "
                f"got {_shape(t)}"
            )
        if dim % g:
            raise ScanArgumentError(f"{name}: {g} groups do not divide dim {dim} (shape {_shape(t)})")
        if groups is not None and g != groups:
            raise ScanArgumentError(f"C: {g} groups but B has {groups} (shape {_shape(t)})")
        groups = g
    for name, t, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("z", z, tuple(u.shape))):
        if t is None:
            continue
        _check_float(name, t)
        if tuple(t.shape) != shape:
            raise ScanArgumentError(f"{name}: expected shape {shape}, got {_shape(t)}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and t.device != u.device:
            raise ScanArgumentError(f"{name}: on {t.device}, but u is on {u.device}")
    if direction not in DIRECTIONS:
        raise ScanArgumentError(f"direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ScanArgumentError(f"window: expected a positive int, got {window!r}")
        window = int(window)
        if direction != "local_bidirectional":
            raise ScanArgumentError(f"window: only used by direction='local_bidirectional', got window={window} "
                                    f"with direction={direction!r}")
    _check_seq_idx(seq_idx, batch, length, u.device, direction, window)
    if direction == "local_bidirectional" and window is None:
        window = default_window(length)
    if return_last_state and direction != "forward":
        raise ScanArgumentError(f"return_last_state: only for direction='forward', got direction={direction!r}")
    return _Sizes(batch, dim, length, state, groups, window)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _discretised_delta(delta, delta_bias, delta_softplus, dtype):
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _as_grouped(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, state, length) or (batch, groups, state, length) → (batch, groups, state, length)."""
    t = t.to(dtype)
    return t.unsqueeze(1) if t.dim() == 3 else t


# --------------------------------------------------------------------------------------------------
# the naive oracle


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         direction="forward", window=None, return_last_state=False, seq_idx=None):
    """The selective scan written as literally as possible: one Python step per token.

    Materialises (batch, dim, length, state); for tests (the oracle) and tiny inputs only.
    Shapes and arguments as :func:`selective_scan`; returns out (batch, dim, length) in u's dtype, and
    with ``return_last_state`` also the last state (batch, dim, state) in the compute dtype.
    """
    sizes = _check_args(u, delta, A, B, C, D, z, delta_bias, direction, window, return_last_state, seq_idx)
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dt = _discretised_delta(delta, delta_bias, delta_softplus, dtype)  # (b, d, l)
    per_channel = sizes.dim // sizes.groups
    Bd = _as_grouped(B, dtype).repeat_interleave(per_channel, dim=1)  # (b, d, n, l)
    Cd = _as_grouped(C, dtype).repeat_interleave(per_channel, dim=1)
    uc = u.to(dtype)
    decay = torch.exp(dt[..., None] * A.to(dtype)[:, None, :])  # (b, d, l, n)
    inp = (dt * uc)[..., None] * Bd.transpose(-1, -2)  # (b, d, l, n)
    L = sizes.length

    # unbind, not indexing per step: one backward node per tensor instead of one full-size gradient per step
    decay_t, inp_t, C_t = decay.unbind(2), inp.unbind(2), Cd.unbind(3)

    starts = ends = local_ends = None
    if seq_idx is not None:
        starts, ends, local_ends = (None if m is None else m.to(dtype)[:, :, None, None]  # 1 where the carry drops
                                    for m in _segment_resets(seq_idx, sizes.window if direction == "local_bidirectional" else None))

    def states(order, drops=None):
        h = torch.zeros_like(inp_t[0])
        out = [None] * L
        for t in order:
            if drops is not None:
                h = h * (1 - drops[:, t])  # the first token of a packed sequence along the travel
            h = decay_t[t] * h + inp_t[t]
            out[t] = h
        return out, h

    def read(hs):
        return torch.stack([(hs[t] * C_t[t]).sum(-1) for t in range(L)], dim=-1)

    skip = uc * D.to(dtype)[:, None] if D is not None else torch.zeros_like(uc)
    last = None
    if direction in ("forward", "bidirectional", "local_bidirectional"):
        fwd, last = states(range(L), starts)
    if direction in ("reverse", "bidirectional"):
        rev, _ = states(reversed(range(L)), ends)
    if direction == "forward":
        y = read(fwd) + skip
    elif direction == "reverse":
        y = read(rev) + skip
    elif direction == "bidirectional":
        y = read(fwd) + skip + read(rev) + skip
    elif seq_idx is not None:
        H = [None] * L
        g_next = torch.zeros_like(inp_t[0])
        for t in reversed(range(L)):
            g_next = g_next * (1 - local_ends[:, t])  # nothing crosses back over a window's or a sequence's end
            carried = decay_t[t] * g_next
            H[t] = fwd[t] + carried
            g_next = carried + inp_t[t]
        y = read(H) + skip
    else:
        H = [None] * L
        for start in range(0, L, sizes.window):
            g_next = torch.zeros_like(inp_t[0])  # g past the window end
            for t in reversed(range(start, min(start + sizes.window, L))):
                carried = decay_t[t] * g_next
                H[t] = fwd[t] + carried
                g_next = carried + inp_t[t]
        y = read(H) + skip
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


# --------------------------------------------------------------------------------------------------
# the chunked reference


def _scan_chunk(dt, dtu, B, C, A, h_in, *, reverse, exclude_input, resets=None):
    """One chunk of the linear recurrence, read out through C.

    dt, dtu: (batch, dim, m) Δ and Δ·u; B, C: (batch, groups, state, m); A: (dim, state);
    h_in: (batch, dim, state), the state carried into the chunk along the direction of travel, which
    runs backwards when ``reverse``. With ``resets`` ((batch, m) bool, in sequence order), the carry into
    every position marked True (from the position before it along the direction of travel) is dropped:
    the local scan's window ends, packed sequences' boundaries (:func:`_segment_resets`).
    With ``exclude_input``, the read-out uses h_t − b_t (= a_t h_{t∓1}) instead of h_t.
    Returns y (batch, dim, m) = Σ_n C_t (h_t or h_t − b_t), and the state leaving the chunk (batch, dim, state).

    The chunk is cut into K sub-chunks of T ≈ sqrt(m/2) tokens, so Python steps number ~2T + K instead
    of m, each acting on all sub-chunks at once. Pass 1 runs every sub-chunk from a zero state to get its
    end state; a loop over K threads the true carries through, using the decay across a whole sub-chunk,
    exp(Σ Δ A), a product of factors ≤ 1 for decaying A; pass 2 reruns every sub-chunk from its true
    starting state and keeps the states. Every step is the plain recurrence: no ratio of decay products
    (which overflows once Σ Δ A passes ~−88 in fp32) is ever formed, whatever the chunk length.
    Memory: a few (batch, dim, m, state) tensors.
    """
    b, d, m = dt.shape
    g, n = B.shape[1], A.shape[1]
    dg = d // g
    if reverse:
        dt, dtu, B, C = dt.flip(-1), dtu.flip(-1), B.flip(-1), C.flip(-1)
    T = max(1, math.isqrt(m // 2))
    K = -(-m // T)
    pad = K * T - m
    if pad:
        # Δ = 0 past the end: decay 1 and input 0, so the state leaving the chunk is the last real one.
        dt, dtu, B, C = (F.pad(t, (0, pad)) for t in (dt, dtu, B, C))
    # travel-major layout: step j of every sub-chunk is one contiguous slice [j]
    dt = dt.reshape(b, g, dg, K, T).permute(4, 0, 1, 2, 3)  # (T, b, g, dg, K)
    dtu = dtu.reshape(b, g, dg, K, T).permute(4, 0, 1, 2, 3)
    B = B.reshape(b, g, n, K, T).permute(4, 0, 1, 3, 2).unsqueeze(3)  # (T, b, g, 1, K, n)
    C = C.reshape(b, g, n, K, T).permute(4, 0, 1, 3, 2).unsqueeze(3)
    dA = dt.unsqueeze(-1) * A.reshape(g, dg, 1, n)  # (T, b, g, dg, K, n)
    if resets is not None:
        r = resets.flip(-1) if reverse else resets  # travel order, like the inputs
        r = F.pad(r, (0, pad)).reshape(b, K, T).permute(2, 0, 1)  # (T, b, K); the pad never resets
        dA = dA.masked_fill(r[:, :, None, None, :, None], float("-inf"))
    # unbind rather than index per step: indexing's backward writes a full-size zero tensor every step
    decay = torch.exp(dA).unbind(0)
    inp = (dtu.unsqueeze(-1) * B).unbind(0)  # T × (b, g, dg, K, n)

    # pass 1: every sub-chunk from a zero state; only the state at its end is needed
    end = inp[0]
    for step in range(1, T):
        end = decay[step] * end + inp[step]
    through = torch.exp(dA.sum(0))  # decay across each whole sub-chunk, (b, g, dg, K, n)
    h = h_in.reshape(b, g, dg, n)
    starts = []
    for through_k, end_k in zip(through.unbind(3), end.unbind(3)):
        starts.append(h)
        h = through_k * h + end_k
    # pass 2: every sub-chunk again, now from its true starting state
    state = torch.stack(starts, dim=-2)  # (b, g, dg, K, n)
    kept = []
    for step in range(T):
        carried = decay[step] * state
        state = carried + inp[step]
        kept.append(carried if exclude_input else state)
    y = (torch.stack(kept) * C).sum(-1)  # (T, b, g, dg, K)
    y = y.permute(1, 2, 3, 4, 0).reshape(b, d, K * T)[..., :m]
    if reverse:
        y = y.flip(-1)
    return y, h.reshape(b, d, n)


def _default_chunk(batch: int, dim: int, state: int) -> int:
    return max(_MIN_CHUNK, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(1, batch * dim * state)))


def _chunk_bounds(length: int, chunk_size: int, reverse: bool) -> list[tuple[int, int]]:
    bounds = [(s, min(s + chunk_size, length)) for s in range(0, length, chunk_size)]
    return bounds[::-1] if reverse else bounds


class _ChunkedScan(torch.autograd.Function):
    """The scan over the whole length in chunks, with each chunk recomputed in backward.

    Forward keeps no chunk's activations: only the inputs and the state entering each chunk
    (n_chunks, batch, dim, state). Backward walks the chunks against the direction of travel, reruns
    each under autograd, and threads the state gradient from chunk to chunk. Autograd memory is
    therefore O(batch·dim·length) plus one chunk's working set, never O(batch·dim·length·state), for
    about one extra forward pass of compute.

    Written out rather than built from torch.utils.checkpoint per chunk, for three measured reasons
    (torch 2.14, CPU): the non-reentrant checkpoint leaves reference cycles that keep every chunk's
    activations alive until Python's cyclic garbage collector runs; the reentrant one rejects
    torch.autograd.grad; and a per-chunk autograd node leaves per-chunk gradients alive between
    per-chunk temporaries, which fragments glibc's heap until RSS grows like length·state. Here output,
    states and input gradients are allocated once at full size, and per-chunk buffers are freed in turn.
    First-order only (backward is not itself differentiable).
    """

    @staticmethod
    def forward(ctx, dt, dtu, A, B, C, options):
        b, d, L = dt.shape
        bounds = _chunk_bounds(L, options["chunk_size"], options["reverse"])
        chunk_options = {k: v for k, v in options.items() if k not in ("chunk_size", "resets")}
        resets = options.get("resets")
        y = dt.new_empty(b, d, L)
        entering = dt.new_empty(len(bounds), b, d, A.shape[1])
        h = dt.new_zeros(b, d, A.shape[1])
        for i, (s, e) in enumerate(bounds):
            entering[i] = h
            y[..., s:e], h = _scan_chunk(dt[..., s:e], dtu[..., s:e], B[..., s:e], C[..., s:e], A, h,
                                         resets=None if resets is None else resets[:, s:e], **chunk_options)
        ctx.save_for_backward(dt, dtu, A, B, C, entering)
        ctx.bounds, ctx.chunk_options, ctx.resets = bounds, chunk_options, resets
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h):
        dt, dtu, A, B, C, entering = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        grads = [torch.zeros_like(t) if need else None for t, need in zip((dt, dtu, A, B, C), needs)]
        for i in reversed(range(len(ctx.bounds))):
            s, e = ctx.bounds[i]
            pieces = [t[..., s:e].detach().requires_grad_(need)
                      for t, need in zip((dt, dtu, B, C), (needs[0], needs[1], needs[3], needs[4]))]
            a = A.detach().requires_grad_(needs[2])
            h_in = entering[i].detach().requires_grad_(i > 0)
            with torch.enable_grad():
                y, h_out = _scan_chunk(*pieces, a, h_in, resets=None if ctx.resets is None else ctx.resets[:, s:e],
                                       **ctx.chunk_options)
            outputs, seeds = [y], [grad_y[..., s:e] if grad_y is not None else torch.zeros_like(y)]
            if grad_h is not None:
                outputs.append(h_out)
                seeds.append(grad_h)
            wanted = [t for t in (*pieces, a, h_in) if t.requires_grad]
            if not wanted:
                continue
            found = dict(zip(map(id, wanted), torch.autograd.grad(outputs, wanted, seeds, allow_unused=True)))
            for j, t in zip((0, 1, 3, 4), pieces):
                if needs[j] and found.get(id(t)) is not None:
                    grads[j][..., s:e] = found[id(t)]
            if needs[2] and found.get(id(a)) is not None:
                grads[2] += found[id(a)]
            grad_h = found.get(id(h_in)) if i > 0 else None
        return (*grads, None)


def _chunked_scan(dt, dtu, A, B, C, *, reverse, exclude_input=False, chunk_size, resets=None):
    """y = Σ_n C_t h_t over the whole length (see :func:`_scan_chunk`), and the last state."""
    options = dict(reverse=reverse, exclude_input=exclude_input, chunk_size=chunk_size, resets=resets)
    return _ChunkedScan.apply(dt, dtu, A, B, C, options)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             direction="forward", window=None, return_last_state=False, chunk_size=None,
                             seq_idx=None):
    """The reference backend: chunked, differentiable, any device, every direction.

    Shapes and arguments as :func:`selective_scan`. ``chunk_size`` (tokens per chunk) defaults to a length
    that keeps each (batch, dim, chunk, state) working tensor near 8 MiB; (batch, dim, length, state) is
    never formed, and under autograd each chunk is recomputed in backward instead of stored.
    Returns out (batch, dim, length) in u's dtype; with ``return_last_state`` also (batch, dim, state).
    """
    sizes = _check_args(u, delta, A, B, C, D, z, delta_bias, direction, window, return_last_state, seq_idx)
    if chunk_size is None:
        chunk_size = _default_chunk(sizes.batch, sizes.dim, sizes.state)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScanArgumentError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dt = _discretised_delta(delta, delta_bias, delta_softplus, dtype)
    uc = u.to(dtype)
    dtu = dt * uc
    Ac = A.to(dtype)
    Bg, Cg = _as_grouped(B, dtype), _as_grouped(C, dtype)
    scan = functools.partial(_chunked_scan, dt, dtu, Ac, Bg, Cg, chunk_size=chunk_size)

    starts = ends = local_ends = None
    local = direction == "local_bidirectional"
    if seq_idx is not None or local:
        # unpacked, one sequence: every window counted from position 0
        ids = seq_idx if seq_idx is not None else torch.zeros(sizes.batch, sizes.length, dtype=torch.long,
                                                              device=u.device)
        starts, ends, local_ends = _segment_resets(ids, sizes.window if local else None)
        if seq_idx is None:
            starts = ends = None  # no carry dropped by the global scans
    last = None
    if direction == "forward":
        y, last = scan(reverse=False, resets=starts)
    elif direction == "reverse":
        y, _ = scan(reverse=True, resets=ends)
    elif direction == "bidirectional":
        y = scan(reverse=False, resets=starts)[0] + scan(reverse=True, resets=ends)[0]
    else:
        # h_t + a_t g_{t+1} = h_t + (g_t − b_t): the windowed reverse scan read out without its input
        y = scan(reverse=False, resets=starts)[0] + scan(reverse=True, exclude_input=True, resets=local_ends)[0]
    if D is not None:
        skip = uc * D.to(dtype)[:, None]
        y = y + (2 * skip if direction == "bidirectional" else skip)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


# --------------------------------------------------------------------------------------------------
# backends and dispatch


@dataclass(frozen=True)
class _Backend:
    name: str
    fn: Callable
    directions: frozenset
    device_types: frozenset  # empty: any device
    refusals: tuple = ()  # exception types meaning "these inputs are not for me" (auto then uses the reference)
    packs: bool = False  # fn takes seq_idx= (packed sequences)


_REGISTERED: dict[str, _Backend] = {}
_TRITON_MODULE = "wsimamba.kernels.selective_scan"


def register_backend(name: str, fn: Callable, *, directions, device_types=("cuda",), refusals=()) -> None:
    """Makes ``fn`` the implementation of backend ``name`` ("triton" or "mamba_ssm"), overriding lazy loading.

    ``fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, window, return_last_state)``
    receives validated arguments (``window`` resolved for ``local_bidirectional``, else None) and returns
    out, or (out, last_state) with ``return_last_state``. ``fn`` raises one of ``refusals`` for inputs it
    does not take (dtype, sizes): ``backend="auto"`` then falls back to the reference, and an explicit
    request gets a :class:`ScanBackendError` with the backend's message.
    """
    if name not in ("triton", "mamba_ssm"):
        raise ScanArgumentError(f"name: only 'triton' and 'mamba_ssm' can be registered, got {name!r}")
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ScanArgumentError(f"directions: unknown {sorted(unknown)}, expected a subset of {DIRECTIONS}")
    _REGISTERED[name] = _Backend(name, fn, frozenset(directions), frozenset(device_types), tuple(refusals))


def _load_triton() -> _Backend:
    if "triton" in _REGISTERED:
        return _REGISTERED["triton"]
    try:
        module = importlib.import_module(_TRITON_MODULE)
    except ModuleNotFoundError as err:
        if err.name in (_TRITON_MODULE, "triton"):
            raise ScanBackendError(
                f"backend='triton': the Triton selective-scan kernel is not available ({err.name} is not "
                f"installed or not written yet); use backend='reference'"
            ) from None
        raise
    refusal = getattr(module, "TritonScanError", None)
    return _Backend("triton", module.selective_scan, frozenset(module.DIRECTIONS), frozenset({"cuda"}),
                    (refusal,) if refusal is not None else (),
                    packs="seq_idx" in inspect.signature(module.selective_scan).parameters)


def _mamba_ssm_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, window, return_last_state):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    def run(u_, dt_, B_, C_, z_, last=False):
        return selective_scan_fn(u_, dt_, A, B_, C_, D, z_, delta_bias, delta_softplus, last)

    def flipped(*seq):
        return tuple(None if t is None else t.flip(-1).contiguous() for t in seq)

    seq = (u, delta, B, C, z)
    if direction == "forward":
        return run(*seq, last=return_last_state)
    backward = run(*flipped(*seq)).flip(-1)
    if direction == "reverse":
        return backward
    return run(*seq) + backward


def _load_mamba_ssm() -> _Backend:
    if "mamba_ssm" in _REGISTERED:
        return _REGISTERED["mamba_ssm"]
    try:
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except ImportError as err:
        raise ScanBackendError(
            f"backend='mamba_ssm': mamba-ssm does not import ({err}); install the 'cuda' extra or use "
            f"backend='reference'"
        ) from None
    return _Backend("mamba_ssm", _mamba_ssm_scan, frozenset({"forward", "reverse", "bidirectional"}),
                    frozenset({"cuda"}))


def _reference_backend() -> _Backend:
    return _Backend("reference", selective_scan_reference, frozenset(DIRECTIONS), frozenset())


_LOADERS = {"reference": _reference_backend, "triton": _load_triton, "mamba_ssm": _load_mamba_ssm}


def list_backends() -> dict[str, tuple[str, ...]]:
    """The backends that load in this environment, each with the directions it supports."""
    found = {}
    for name, load in _LOADERS.items():
        try:
            backend = load()
        except ScanBackendError:
            continue
        found[name] = tuple(d for d in DIRECTIONS if d in backend.directions)
    return found


def _why_not(backend: _Backend, device: torch.device, direction: str, explicit: bool) -> str | None:
    """None when the backend can run; else why not."""
    devices = set(backend.device_types)
    if explicit and backend.name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        devices.add("cpu")  # Triton's interpreter runs kernels on CPU tensors: for tests, never chosen by auto
    if devices and device.type not in devices:
        return f"needs a {'/'.join(sorted(devices))} device, got tensors on {device}"
    if direction not in backend.directions:
        return f"does not support direction={direction!r} (it supports {', '.join(sorted(backend.directions))})"
    return None


def _select(backend: str, device: torch.device, direction: str) -> _Backend:
    if backend not in _BACKEND_NAMES:
        raise ScanArgumentError(f"backend: expected one of {', '.join(_BACKEND_NAMES)}, got {backend!r}")
    if backend == "auto":
        # only a registered kernel can claim non-CUDA devices, so CPU calls skip the import attempt
        if device.type == "cuda" or "triton" in _REGISTERED:
            try:
                triton = _load_triton()
            except ScanBackendError:
                triton = None
            if triton is not None and _why_not(triton, device, direction, explicit=False) is None:
                return triton
        return _reference_backend()
    chosen = _LOADERS[backend]()
    why = _why_not(chosen, device, direction, explicit=True)
    if why is not None:
        raise ScanBackendError(f"backend={backend!r} {why}")
    return chosen


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   direction="forward", window=None, backend="auto", *, return_last_state=False, seq_idx=None):
    """Selective scan (S6) in mamba-ssm's layout, in one of four directions.

    Args:
        u: (batch, dim, length) input, fp32/fp16/bf16.
        delta: (batch, dim, length) step sizes before bias and softplus.
        A: (dim, state) real state matrix (diagonal per channel), fp32.
        B, C: (batch, state, length) or (batch, groups, state, length); channel d uses group d // (dim // groups).
        D: (dim,) skip weight, optional.
        z: (batch, dim, length) gate, optional: out = y · silu(z).
        delta_bias: (dim,) added to delta, optional.
        delta_softplus: apply softplus to delta + delta_bias.
        direction: "forward", "reverse", "bidirectional" or "local_bidirectional" (module docstring).
        window: tokens per window for "local_bidirectional"; None picks :func:`default_window` (length).
        backend: "auto", "reference", "triton" or "mamba_ssm" (module docstring).
        return_last_state: also return the final state (batch, dim, state); direction "forward" only.
        seq_idx: (batch, length) int32/int64, nondecreasing: several sequences packed into one, each
            scanned as if alone (module docstring); local_bidirectional then needs ``window``. The reference
            and the Triton kernels take it (Triton: its sequential kernels, state ≤ 64; local_bidirectional
            only where every sequence starts at a multiple of the window); ``auto`` runs the reference where
            Triton does not; mamba_ssm refuses it.

    Returns:
        out (batch, dim, length) in u's dtype, or (out, last_state) with ``return_last_state``.

    Raises:
        ScanArgumentError: a bad shape, dtype or value (names the argument).
        ScanBackendError: the requested backend cannot run here (not installed, wrong device, direction,
            or inputs it refuses).
    """
    sizes = _check_args(u, delta, A, B, C, D, z, delta_bias, direction, window, return_last_state, seq_idx)
    chosen = _select(backend, u.device, direction)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, sizes.window, return_last_state)
    packed = {} if seq_idx is None else {"seq_idx": seq_idx}
    if chosen.name == "reference":
        return selective_scan_reference(*args, **packed)
    if packed and not chosen.packs:
        if backend == "auto":
            return selective_scan_reference(*args, **packed)
        raise ScanBackendError(f"backend={backend!r} does not take seq_idx (packed sequences); "
                               "use backend='reference', 'triton' or 'auto'")
    try:
        return chosen.fn(*args, **packed)
    except chosen.refusals as err:
        if backend == "auto":
            return selective_scan_reference(*args, **packed)
        raise ScanBackendError(f"backend={chosen.name!r}: {err}") from err
