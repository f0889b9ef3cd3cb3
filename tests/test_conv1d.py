"""The causal depthwise conv1d (+ SiLU): the reference against nn.Conv1d and against packed segments run
alone, and the Triton kernel against the reference, forward and every gradient.

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py
before Triton is imported) at small sizes and small tiles; the `gpu` tests run the compiled kernel at
full sizes on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests import triton_bounds
from wsimamba.errors import WsimambaError
from wsimamba.kernels import conv1d as kc
from wsimamba.ops import ConvArgumentError, ConvBackendError, causal_conv1d, causal_conv1d_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# several programs along both axes at the interpreter's sizes: 4 channels × 32 positions, of which the halo
# (8 before the program's own in the forward, 8 on each side in the backward) is only read
SMALL_TILES = {"fwd": {"BLOCK_D": 4, "BLOCK_L": 32}, "bwd": {"BLOCK_D": 4, "BLOCK_L": 32}}


@pytest.fixture(autouse=True)
def _poison_and_bounds(monkeypatch):
    """Outputs and dx start as NaN (an unwritten element shows), and in the interpreter a load or store
    outside the tensors of a launch fails the test (a read past a buffer returns garbage on a GPU)."""
    monkeypatch.setattr(kc, "POISON_OUTPUTS", True)
    if DEV != "cpu" or not triton_bounds.available():
        yield
        return
    with triton_bounds.BoundsCheck("conv1d") as check:
        yield
    assert not check.violations, "\n".join(check.violations)


def _conv_silu(x, weight, bias, activation):
    """nn.Conv1d as a Mamba block builds it, then SiLU: the definition."""
    dim, width = weight.shape[0], weight.shape[-1]
    conv = torch.nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1, bias=bias is not None, dtype=x.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(dim, 1, width))
        if bias is not None:
            conv.bias.copy_(bias)
    out = conv(x)[..., : x.shape[-1]]
    return (F.silu(out) if activation == "silu" else out), conv


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _segments(batch, length, lengths_per_row):
    """(batch, length) int64 seq_idx from run lengths per row."""
    rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths_per_row]
    seq = torch.stack(rows)
    assert seq.shape == (batch, length)
    return seq


@pytest.mark.parametrize("activation", ["silu", None])
def test_reference_is_nn_conv1d_then_silu(activation, seed):
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)  # nn.Conv1d's weight shape
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 13, dtype=torch.float64)
    out = causal_conv1d_reference(x, w, b, activation=activation)
    dx, dw, db = torch.autograd.grad((out * g).sum(), (x, w, b))
    xe = x.detach().clone().requires_grad_(True)
    expected, conv = _conv_silu(xe, w.detach(), b.detach(), activation)
    (expected * g).sum().backward()
    assert _rel(out, expected) < 1e-12
    assert _rel(dx, xe.grad) < 1e-12 and _rel(dw, conv.weight.grad) < 1e-12 and _rel(db, conv.bias.grad) < 1e-12
    assert dw.shape == w.shape and dw.dtype == w.dtype
    # the dispatch sends CPU tensors to the reference; a (dim, width) weight and fp32 give the same function
    out32 = causal_conv1d(x.float(), w.float().squeeze(1), None, activation=activation)
    expected32, _ = _conv_silu(x.float(), w.float(), None, activation)
    assert out32.dtype == torch.float32 and _rel(out32, expected32) < 1e-6


def test_reference_with_seq_idx_runs_each_packed_sequence_alone(seed):
    """seq_idx packs several bags into one sequence: the result, and every gradient, is that of each
    segment convolved alone and the outputs concatenated (segments of 1 position included)."""
    runs = [[1, 6, 1, 9, 3], [12, 1, 7]]
    x = torch.randn(2, 3, 20, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 20, dtype=torch.float64)
    seq = _segments(2, 20, runs)
    out = causal_conv1d_reference(x, w, b, seq_idx=seq.to(torch.int32))
    grads = torch.autograd.grad((out * g).sum(), (x, w, b))
    pieces = []
    for row, lengths in enumerate(runs):
        pieces.append(torch.cat([causal_conv1d_reference(part, w, b) for part in x[row:row + 1].split(lengths, dim=-1)], -1))
    alone = torch.cat(pieces)
    grads_alone = torch.autograd.grad((alone * g).sum(), (x, w, b))
    assert _rel(out, alone) < 1e-12
    for got, expected in zip(grads, grads_alone):
        assert _rel(got, expected) < 1e-12
    # the mask matters: without seq_idx the two differ
    assert _rel(causal_conv1d_reference(x, w, b), alone) > 1e-3


CASES = [
    # (batch, dim, length, width, bias, activation, segments, dtype, strided x)
    # 6 channels over tiles of 4, 37 positions over 2-3 tiles; segments of 1 and segments crossing tile borders
    (2, 6, 37, 4, True, "silu", [[1, 10, 1, 1, 9, 15], [16, 1, 20]], torch.float32, True),
    (2, 5, 7, 3, False, None, None, torch.float32, False),
    (2, 3, 1, 1, True, "silu", [[1], [1]], torch.float32, True),  # length 1, width 1
    (1, 5, 19, 8, False, "silu", [[3, 1, 15]], torch.float16, False),
    (2, 6, 29, 4, True, "silu", None, torch.bfloat16, True),
    (2, 7, 26, 3, True, None, [[8, 1, 1, 16], [26]], torch.bfloat16, False),
]


def _inputs(batch, dim, length, width, bias, segments, dtype, strided, device=DEV):
    x = torch.randn(batch, 2 * dim if strided else dim, length, device=device).to(dtype)
    # fp16 runs also take an fp16 weight (its gradient comes back in fp16); the others an fp32 one
    w = (torch.randn(dim, 1, width, device=device) / width ** 0.5).to(dtype if dtype == torch.float16 else torch.float32)
    b = torch.randn(dim, device=device) if bias else None
    seq = _segments(batch, length, segments).to(device) if segments is not None else None
    # dout exact in x's dtype: the kernel (dout in x's dtype) and the fp32 reference get the same values
    g = torch.randn(batch, dim, length, device=device).to(dtype).float()
    return x, w, b, seq, g


def _grads(fn, x, w, b, seq, g, activation, dim, dtype=None):
    """fn's output and gradients (of x's first dim channels, w, b), all fp32, with x given as that view of x."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    xv = leaves[0][:, :dim]
    out = fn(xv, leaves[1], leaves[2] if b is not None else None, activation=activation, seq_idx=seq)
    (out.float() * g).sum().backward()
    if x.shape[1] > dim:
        assert (leaves[0].grad[:, dim:] == 0).all()
    return [out.float(), leaves[0].grad[:, :dim].float()] + [t.grad.float() for t in leaves[1:]]


@pytest.mark.parametrize("batch,dim,length,width,bias,activation,segments,dtype,strided", CASES)
def test_triton_matches_reference(batch, dim, length, width, bias, activation, segments, dtype, strided, seed, monkeypatch):
    """The kernel (through the op's dispatch) against the fp32 reference: output and every gradient, with
    outputs poisoned; x a channel slice of a (batch, 2·dim, length) buffer where `strided`."""
    if DEV == "cpu":
        monkeypatch.setattr(kc, "TILE_OVERRIDE", SMALL_TILES)
    x, w, b, seq, g = _inputs(batch, dim, length, width, bias, segments, dtype, strided)
    if strided:
        assert x[:, :dim].stride(-1) == 1 and not x[:, :dim].is_contiguous()
    if seq is not None and dtype == torch.float32:
        seq = seq.to(torch.int32)
    got = _grads(lambda *a, **k: causal_conv1d(*a, **k, backend="triton"), x, w, b, seq, g, activation, dim)
    ref = _grads(causal_conv1d_reference, x, w, b, seq, g, activation, dim, dtype=torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten elements"
        assert _rel(a, e) < tol, (name, _rel(a, e))


def test_halo_of_width_minus_one(seed, monkeypatch):
    """A halo of exactly width - 1 positions (tiles that start unaligned): the same function, with taps and
    dp(t + j) read right up to the edge of the tile."""
    if DEV == "cpu":
        monkeypatch.setattr(kc, "TILE_OVERRIDE", {k: {"BLOCK_D": 4, "BLOCK_L": 16, "HALO": 3} for k in ("fwd", "bwd")})
    x, w, b, seq, g = _inputs(2, 5, 45, 4, True, [[2, 1, 20, 22], [45]], torch.float32, True)
    got = _grads(lambda *a, **k: causal_conv1d(*a, **k, backend="triton"), x, w, b, seq, g, "silu", 5)
    ref = _grads(causal_conv1d_reference, x, w, b, seq, g, "silu", 5)
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, ref):
        assert torch.isfinite(a).all() and _rel(a, e) < 1e-5, (name, _rel(a, e))
    with pytest.raises(ValueError, match="HALO must be at least width - 1 = 3"):
        monkeypatch.setattr(kc, "TILE_OVERRIDE", {"fwd": {"HALO": 2}})
        causal_conv1d(x[:, :5], w, b, backend="triton")


def test_default_tiles_and_gradients_of_one_input(seed):
    """The shipped tiles (one program along each axis here), and a backward asked only for the weight."""
    x, w, b, seq, g = _inputs(1, 5, 70, 4, True, [[30, 1, 39]], torch.float32, False)
    w.requires_grad_(True)
    out = causal_conv1d(x, w, b, seq_idx=seq, backend="triton")
    (dw,) = torch.autograd.grad((out * g).sum(), (w,))
    wr = w.detach().clone().requires_grad_(True)
    ref = causal_conv1d_reference(x, wr, b, seq_idx=seq)
    (dw_ref,) = torch.autograd.grad((ref * g).sum(), (wr,))
    assert _rel(out, ref) < 1e-5 and _rel(dw, dw_ref) < 1e-5


def test_errors_name_the_argument(monkeypatch):
    x, w, b = torch.randn(2, 4, 9), torch.randn(4, 3), torch.randn(4)
    bad = [
        (dict(x=torch.randn(4, 9)), "x: expected shape"),
        (dict(x=torch.randn(2, 4, 9).long()), "x: expected a float"),
        (dict(weight=torch.randn(5, 3)), r"weight: expected shape \(4, width\)"),
        (dict(weight=torch.randn(4, 2, 3)), "weight: expected shape"),
        (dict(bias=torch.randn(3)), r"bias: expected shape \(4,\), got \(3,\)"),
        (dict(seq_idx=torch.zeros(2, 8, dtype=torch.int64)), r"seq_idx: expected shape \(2, 9\), got \(2, 8\)"),
        (dict(seq_idx=torch.zeros(2, 9)), "seq_idx: expected an int32/int64 tensor, got torch.float32"),
        (dict(activation="relu"), "activation: expected 'silu' or None, got 'relu'"),
        (dict(backend="cuda"), "backend: expected one of auto, reference, triton, got 'cuda'"),
    ]
    for change, message in bad:
        args = {**dict(x=x, weight=w, bias=b), **change}
        with pytest.raises(ConvArgumentError, match=message):
            causal_conv1d(**args)
    assert issubclass(ConvArgumentError, WsimambaError) and issubclass(ConvBackendError, WsimambaError)
    # a width past the kernel's limit: refused by name, the reference under auto
    wide = torch.randn(4, kc.MAX_WIDTH + 1)
    with pytest.raises(ConvBackendError, match=f"backend='triton': width {kc.MAX_WIDTH + 1} not supported"):
        causal_conv1d(x.to(DEV), wide.to(DEV), backend="triton")
    assert _rel(causal_conv1d(x, wide), causal_conv1d_reference(x, wide)) == 0
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ConvBackendError, match="backend='triton' needs a cuda device"):
            causal_conv1d(x, w, b, backend="triton")


# ----------------------------------------------------------------------------------------------
# full sizes, compiled, on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("batch,dim,length,segments", [
    (1, 1024, 100_003, None),
    (3, 96, 5000, [[1, 2000, 1, 2998], [5000], [700] * 7 + [100]]),
])
def test_gpu_long_bf16_against_reference(batch, dim, length, segments, seed):
    x, w, b, seq, g = _inputs(batch, dim, length, 4, True, segments, torch.bfloat16, True, device="cuda")
    got = _grads(lambda *a, **k: causal_conv1d(*a, **k, backend="triton"), x, w, b, seq, g, "silu", dim)
    ref = _grads(causal_conv1d_reference, x, w, b, seq, g, "silu", dim, dtype=torch.float32)
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten elements"
        assert _rel(a, e) < 1e-2, (name, _rel(a, e))
