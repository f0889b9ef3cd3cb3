"""MambaMIL's sequence reordering without reordered copies: the reorder ops, the convolution that reads x
in place (``causal_conv1d(reorder=r)``), the fused restore + add + gate, and SRMamba's fast layers built
on them, each against its reference, forward and every gradient.

On a machine without CUDA the Triton kernels run in the interpreter (conftest.py) at small sizes and
small tiles, with every load and store bounds-checked; the `gpu` tests run them compiled at a bag's length.
"""

from __future__ import annotations

import functools

import pytest
import torch

import wsimamba.nn as wnn
from tests import triton_bounds
from wsimamba.kernels import conv1d as kc
from wsimamba.kernels import reorder as kr
from wsimamba.ops import (
    ConvArgumentError,
    ConvBackendError,
    ReorderArgumentError,
    ReorderBags,
    causal_conv1d,
    causal_conv1d_reference,
    restore_add_gate,
    restore_add_gate_reference,
    stride_reorder,
    stride_restore,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_and_bounds(monkeypatch):
    """Outputs start as NaN (an unwritten element shows); in the interpreter a load or store outside the
    launch's tensors fails the test."""
    monkeypatch.setattr(kc, "POISON_OUTPUTS", True)
    monkeypatch.setattr(kr, "POISON_OUTPUTS", True)
    if DEV != "cpu" or not triton_bounds.available():
        yield
        return
    with triton_bounds.BoundsCheck("reorder") as check:
        yield
    assert not check.violations, "\n".join(check.violations)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# the reordering itself


@pytest.mark.parametrize("length,rate", [(1, 1), (7, 3), (12, 4), (5, 10), (31, 10)])
def test_reorder_takes_each_phase_in_turn_and_restore_inverts_it(length, rate, seed):
    x = torch.randn(2, 3, length, generator=_gen(seed))
    r = stride_reorder(x, rate)
    k = -(-length // rate)
    assert r.shape == (2, 3, k * rate)
    for o in range(rate):
        for j in range(k):
            t = j * rate + o  # phase o, its j-th token
            expected = x[..., t] if t < length else torch.zeros(2, 3)
            assert torch.equal(r[..., o * k + j], expected)
    assert torch.equal(stride_restore(r, rate, length), x)


# ----------------------------------------------------------------------------------------------
# the convolution over the reordered sequence, read from x in place

CONV_CASES = [
    # (batch, dim, length, width, rate, bias, activation, dtype, tiles)
    # small tiles (steps TK, HALO steps before the own ones, and after them in the backward): first, interior
    # and last tiles, whose taps or dp(k + j) cross a phase border or not
    (2, 5, 53, 4, 3, True, "silu", torch.float32, {"rfwd": {"BLOCK_D": 4, "TK": 8}, "rbwd": {"BLOCK_D": 4, "TK": 8}}),
    (1, 3, 201, 3, 5, False, "silu", torch.float32, {"rfwd": {"BLOCK_D": 2, "TK": 8, "HALO": 3},
                                                      "rbwd": {"BLOCK_D": 2, "TK": 16, "HALO": 4}}),
    (1, 4, 97, 4, 10, True, None, torch.float32, {"rfwd": {"BLOCK_D": 4, "TK": 8}, "rbwd": {"BLOCK_D": 4, "TK": 8}}),
    (2, 4, 5, 4, 10, True, "silu", torch.float32, None),  # shorter than one phase step: K = 1
    (1, 3, 7, 4, 3, True, "silu", torch.float16, None),  # K = 3 ≤ width − 1: taps cross two phases
    (2, 6, 150, 4, 7, True, "silu", torch.bfloat16, {"rfwd": {"BLOCK_D": 4, "TK": 8}, "rbwd": {"BLOCK_D": 2, "TK": 16}}),
    (1, 2, 31, 2, 1, True, "silu", torch.float32, None),  # rate 1: no reordering
    (1, 3, 50, 1, 3, True, "silu", torch.float32, {"rbwd": {"BLOCK_D": 4, "TK": 8}}),  # width 1: no taps cross
    # width 8 with own steps shorter than the taps: several first tiles gather (both launches' tile lists)
    (1, 2, 400, 8, 5, True, "silu", torch.float32, {"rfwd": {"BLOCK_D": 2, "TK": 8}, "rbwd": {"BLOCK_D": 2, "TK": 16}}),
]


def _conv_grads(fn, x, w, b, g, dim, activation, dtype=None):
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in (x, w, b) if t is not None]
    out = fn(leaves[0][:, :dim], leaves[1], leaves[2] if b is not None else None, activation=activation)
    (out.float() * g).sum().backward()
    assert (leaves[0].grad[:, dim:] == 0).all()
    return [out.float(), leaves[0].grad[:, :dim].float()] + [t.grad.float() for t in leaves[1:]]


@pytest.mark.parametrize("batch,dim,length,width,rate,bias,activation,dtype,tiles", CONV_CASES)
def test_reordered_conv_matches_the_conv_of_the_reordered_copy(batch, dim, length, width, rate, bias, activation,
                                                               dtype, tiles, seed, monkeypatch):
    """The kernel with ``reorder`` against the reference conv of ``stride_reorder(x)`` (fp32): output (in the
    reordered order), dx (in x's order), dweight, dbias; x a channel slice of a wider buffer."""
    if DEV == "cpu":
        monkeypatch.setattr(kc, "TILE_OVERRIDE", tiles)
    gen = _gen(seed)
    x = torch.randn(batch, 2 * dim, length, generator=gen).to(dtype).to(DEV)
    w = (torch.randn(dim, width, generator=gen) / width ** 0.5).to(DEV)
    b = torch.randn(dim, generator=gen).to(DEV) if bias else None
    padded = -(-length // rate) * rate
    g = torch.randn(batch, dim, padded, generator=gen).to(dtype).float().to(DEV)
    got = _conv_grads(functools.partial(causal_conv1d, backend="triton", reorder=rate), x, w, b, g, dim, activation)
    ref = _conv_grads(lambda xv, *a, **k: causal_conv1d_reference(stride_reorder(xv, rate), *a, **k),
                      x, w, b, g, dim, activation, dtype=torch.float32)
    assert got[0].shape == (batch, dim, padded)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten elements"
        assert _rel(a, e) < tol, (name, _rel(a, e))
    if length > rate > 1 and width > 1:  # the reordering matters: the plain conv of x is another function
        plain = causal_conv1d_reference(x[:, :dim].float(), w, b, activation=activation)
        assert _rel(stride_restore(got[0], rate, length), plain) > 1e-3


@pytest.mark.parametrize("needs", ["x", "weights"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_reordered_conv_computes_only_the_gradients_asked_for(needs, activation, seed, monkeypatch):
    """Frozen conv weights (only dx) or an x without a gradient (only dweight, dbias): each gradient the
    backward is asked for still matches the reference, in the border tiles and the interior ones."""
    if DEV == "cpu":
        monkeypatch.setattr(kc, "TILE_OVERRIDE", {"rfwd": {"BLOCK_D": 4, "TK": 8}, "rbwd": {"BLOCK_D": 4, "TK": 8}})
    gen = _gen(seed)
    dim, length, rate = 5, 61, 4
    x = torch.randn(1, dim, length, generator=gen).to(DEV)
    w = (torch.randn(dim, 4, generator=gen) / 2).to(DEV)
    b = torch.randn(dim, generator=gen).to(DEV)
    g = torch.randn(1, dim, -(-length // rate) * rate, generator=gen).to(DEV)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(want) for t, want in
                  ((x, needs == "x"), (w, needs == "weights"), (b, needs == "weights"))]
        (fn(*leaves, activation=activation) * g).sum().backward()
        return [t.grad for t in leaves if t.requires_grad]

    got = grads(functools.partial(causal_conv1d, backend="triton", reorder=rate))
    ref = grads(lambda xv, *a, **k: causal_conv1d_reference(stride_reorder(xv, rate), *a, **k))
    assert len(got) == len(ref) == (1 if needs == "x" else 2)
    for a, e in zip(got, ref):
        assert torch.isfinite(a).all() and _rel(a, e) < 1e-5, _rel(a, e)


def test_reordered_conv_dispatch_and_errors(monkeypatch):
    x, w = torch.randn(1, 4, 9), torch.randn(4, 4)
    # the reference backend and auto on the CPU compute the conv of the reordered copy
    expected = causal_conv1d_reference(stride_reorder(x, 3), w)
    assert torch.equal(causal_conv1d(x, w, reorder=3), expected)
    assert torch.equal(causal_conv1d(x, w, reorder=3, backend="reference"), expected)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ConvArgumentError, match=f"reorder: expected a positive int, got {bad!r}"):
            causal_conv1d(x, w, reorder=bad)
    with pytest.raises(ConvArgumentError, match="reorder: cannot be combined with seq_idx"):
        causal_conv1d(x, w, reorder=2, seq_idx=torch.zeros(1, 9, dtype=torch.int64))
    # a rate past the kernel's limit: refused by name on triton, the reference under auto
    rate = kc.MAX_REORDER_RATE + 1
    with pytest.raises(ConvBackendError, match=f"reorder {rate} exceeds the kernel's limit {kc.MAX_REORDER_RATE}"):
        causal_conv1d(x.to(DEV), w.to(DEV), reorder=rate, backend="triton")
    far = causal_conv1d(x.to(DEV), w.to(DEV), reorder=rate)
    assert _rel(far, causal_conv1d_reference(stride_reorder(x, rate), w).to(DEV)) < 1e-6


# ----------------------------------------------------------------------------------------------
# restore + add + gate in one pass

GATE_CASES = [
    # (batch, dim, length, rate, dtype)
    (2, 5, 53, 3, torch.float32),
    (1, 6, 7, 10, torch.float32),  # one token per phase at most
    (1, 3, 40, 4, torch.bfloat16),
    (2, 3, 9, 1, torch.float16),
    (1, 37, 101, 10, torch.float32),
]


def _gate_grads(y, yr, zz, g, rate):
    """[out, dy, dy_reordered, dz] of the triton backend (inputs as given) and of the fp32 reference, z the
    second half of zz's channels (the first half gets no gradient), g the incoming gradient."""
    dim = y.shape[1]
    results = []
    for fn, as_dtype in ((functools.partial(restore_add_gate, backend="triton"), None),
                         (restore_add_gate_reference, torch.float32)):
        leaves = [t.detach().clone().to(as_dtype or t.dtype).requires_grad_(True) for t in (y, yr, zz)]
        out = fn(leaves[0], leaves[1], leaves[2][:, dim:], rate)
        out.backward(g.to(out.dtype))
        assert (leaves[2].grad[:, :dim] == 0).all()
        results.append([out, leaves[0].grad, leaves[1].grad, leaves[2].grad[:, dim:]])
    return results


@pytest.mark.parametrize("batch,dim,length,rate,dtype", GATE_CASES)
def test_restore_add_gate_matches_the_reference(batch, dim, length, rate, dtype, seed, monkeypatch):
    """Output and the three gradients against the fp32 reference; z a channel slice of a wider buffer and the
    incoming gradient laid out as out_proj gives it (unit stride along the channels)."""
    if DEV == "cpu":
        monkeypatch.setattr(kr, "TILE_OVERRIDE", {"fwd": {"BLOCK_D": 4, "TK": 4},
                                                  "bwd": {"BLOCK_D": 8, "TK": 2}})
    gen = _gen(seed)
    padded = -(-length // rate) * rate
    y = torch.randn(batch, dim, length, generator=gen).to(dtype).to(DEV)
    yr = torch.randn(batch, dim, padded, generator=gen).to(dtype).to(DEV)
    zz = torch.randn(batch, 2 * dim, length, generator=gen).to(dtype).to(DEV)
    g = torch.randn(batch, length, dim, generator=gen).to(dtype).to(DEV).transpose(1, 2)
    got, ref = _gate_grads(y, yr, zz, g, rate)
    assert got[0].dtype == dtype and got[0].is_contiguous()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for name, a, e in zip(("out", "dy", "dy_reordered", "dz"), got, ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten elements"
        assert _rel(a, e) < tol, (name, _rel(a, e))
    # the reordering's padding gets no gradient
    pad_idx = [o * (padded // rate) + padded // rate - 1 for o in range(rate) if (padded // rate - 1) * rate + o >= length]
    if pad_idx:
        assert (got[2][..., pad_idx] == 0).all()


def test_restore_add_gate_is_the_sum_of_the_gated_branches(seed):
    """The fused form is what SRMamba computed before: y·silu(z) + restore(y_r · silu(reorder(z)))."""
    gen = _gen(seed)
    y, z = torch.randn(2, 4, 23, generator=gen, dtype=torch.float64), torch.randn(2, 4, 23, generator=gen, dtype=torch.float64)
    yr = torch.randn(2, 4, 24, generator=gen, dtype=torch.float64)
    silu = torch.nn.functional.silu
    two = y * silu(z) + stride_restore(yr * silu(stride_reorder(z, 6)), 6, 23)
    assert _rel(restore_add_gate(y, yr, z, 6), two) < 1e-14


def test_restore_add_gate_errors_name_the_argument():
    y, yr, z = torch.randn(1, 4, 9), torch.randn(1, 4, 12), torch.randn(1, 4, 9)
    bad = [
        (dict(rate=0), "rate: expected a positive int, got 0"),
        (dict(y_reordered=torch.randn(1, 4, 9)), r"y_reordered: expected shape \(1, 4, 12\) \(length 9 reordered with "
                                                 r"rate 4\), got \(1, 4, 9\)"),
        (dict(z=torch.randn(1, 4, 8)), r"z: expected shape \(1, 4, 9\) like y, got \(1, 4, 8\)"),
        (dict(y=torch.randn(4, 9)), r"y: expected shape \(batch, channels, length\)"),
        (dict(z=torch.zeros(1, 4, 9, dtype=torch.int64)), "z: expected a float16/bfloat16/float32/float64 tensor"),
        (dict(backend="cuda"), "backend: expected one of auto, reference, triton, got 'cuda'"),
    ]
    for change, message in bad:
        args = {**dict(y=y, y_reordered=yr, z=z, rate=4), **change}
        with pytest.raises(ReorderArgumentError, match=message):
            restore_add_gate(**args)


# ----------------------------------------------------------------------------------------------
# SRMamba's fast layers on these kernels


def _srmamba_on_kernels(monkeypatch, seed, record):
    """The reference SRMamba(12, rate 3) and a fast one with its parameters, whose convolution and restore-add-
    gate run the Triton backend (small tiles on the CPU; the scan on its reference: the kernels here are the
    point); `calls` gets record(name, kwargs) for each of their calls."""
    import wsimamba.nn.mamba as mamba

    if DEV == "cpu":
        monkeypatch.setattr(kc, "TILE_OVERRIDE", {"fwd": {"BLOCK_D": 8, "BLOCK_L": 64},
                                                  "bwd": {"BLOCK_D": 8, "BLOCK_L": 64},
                                                  "rfwd": {"BLOCK_D": 8, "TK": 8}, "rbwd": {"BLOCK_D": 8, "TK": 8}})
        monkeypatch.setattr(kr, "TILE_OVERRIDE", {"fwd": {"BLOCK_D": 8, "TK": 4}, "bwd": {"BLOCK_D": 8, "TK": 2}})
    calls = []

    def spy(fn, name):
        def call(*args, **kwargs):
            calls.append(record(name, kwargs))
            return fn(*args, **kwargs, backend="triton")
        return call

    monkeypatch.setattr(mamba, "causal_conv1d", spy(causal_conv1d, "conv"))
    monkeypatch.setattr(mamba, "restore_add_gate", spy(restore_add_gate, "gate"))
    torch.manual_seed(seed)
    ref = wnn.SRMamba(12, d_state=4, rate=3, impl="reference").to(DEV)
    fast = wnn.SRMamba(12, d_state=4, rate=3, impl="fast").to(DEV)
    fast.load_state_dict(ref.state_dict())
    return ref, fast, calls


def test_srmamba_fast_layers_on_the_kernels_match_the_reference_layers(seed, monkeypatch):
    """SRMamba with impl="fast" running the Triton convolution (reorder) and restore-add-gate (the scan on its
    reference: the kernels here are the point) against the reference layers, which reorder by copies:
    fp32, output, input gradient and every parameter gradient within 1e-4, batch 2 of an odd length."""
    ref, fast, calls = _srmamba_on_kernels(monkeypatch, seed, lambda name, kw: (name, kw.get("reorder")))
    x = torch.randn(2, 41, 12, generator=_gen(seed)).to(DEV)
    r = torch.randn(2, 41, 12, generator=_gen(seed + 1)).to(DEV)
    results = []
    for module in (ref, fast):
        xl = x.clone().requires_grad_(True)
        out = module(xl)
        (out * r).sum().backward()
        results.append((out.detach(), xl.grad, {n: p.grad for n, p in module.named_parameters()}))
    assert calls == [("conv", None), ("conv", 3), ("gate", None)]
    (out_r, dx_r, g_r), (out_f, dx_f, g_f) = results
    assert _rel(out_f, out_r) < 1e-4 and _rel(dx_f, dx_r) < 1e-4
    assert g_f.keys() == g_r.keys() and len(g_r) == 16
    for name in g_r:
        assert _rel(g_f[name], g_r[name]) < 1e-4, (name, _rel(g_f[name], g_r[name]))


# ----------------------------------------------------------------------------------------------
# bags: padded (a length per row) and packed (ReorderBags, several in one row)

# (name, batch, length, bags): row lengths with a full row, an odd one and a single token; packed bags with
# padding between them, a single-token bag, and bags long enough for interior tiles at the small tiles below
BAG_LAYOUTS = [
    ("padded", 3, 67, lambda dev: torch.tensor([67, 30, 1], device=dev)),
    ("packed", 1, 90, lambda dev: ReorderBags([0, 8, 9, 48], [5, 1, 37, 40])),
    ("packed-tight", 1, 61, lambda dev: ReorderBags([0, 17, 18], [17, 1, 43])),
]
BAG_TILES = {"rfwd": {"BLOCK_D": 4, "TK": 8}, "rbwd": {"BLOCK_D": 4, "TK": 8}}


def _bag_spans(bags, batch, length, rate):
    """(row, start, size, reordered start) of each bag (the layouts ReorderBags describes)."""
    if isinstance(bags, ReorderBags):
        return list(zip([0] * len(bags.sizes), bags.starts, bags.sizes, bags.reordered_starts(rate)))
    return [(b, 0, n, 0) for b, n in enumerate(bags.tolist())]


def test_bags_are_reordered_and_restored_each_alone(seed):
    """The references with bags: each bag's conv is the conv of its own reordered sequence, and each bag's
    restore-add-gate its own; 0 outside the bags. (The kernels are tested against these below.)"""
    gen = _gen(seed)
    rate = 4
    for _, batch, length, make in BAG_LAYOUTS:
        bags = make("cpu")
        x = torch.randn(batch, 3, length, generator=gen, dtype=torch.float64)
        w, b = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
        out = causal_conv1d(x, w, b, reorder=rate, bags=bags)
        covered = torch.zeros(out.shape, dtype=torch.bool)
        y = torch.randn(batch, 3, length, generator=gen, dtype=torch.float64)
        z = torch.randn(batch, 3, length, generator=gen, dtype=torch.float64)
        gate = restore_add_gate(y, out, z, rate, bags=bags)
        inside = torch.zeros(y.shape, dtype=torch.bool)
        for row, a, n, r in _bag_spans(bags, batch, length, rate):
            alone = causal_conv1d(x[row:row + 1, :, a:a + n], w, b, reorder=rate)
            span = alone.shape[-1]
            assert torch.equal(out[row:row + 1, :, r:r + span], alone)
            covered[row, :, r:r + span] = True
            expected = restore_add_gate(y[row:row + 1, :, a:a + n], alone, z[row:row + 1, :, a:a + n], rate)
            assert torch.allclose(gate[row:row + 1, :, a:a + n], expected, rtol=0, atol=1e-12)
            inside[row, :, a:a + n] = True
        assert (out[~covered] == 0).all() and (gate[~inside] == 0).all()


def _bag_conv_grads(fn, x, w, b, g, bags, rate):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    out = fn(*leaves, reorder=rate, bags=bags)
    (out.float() * g).sum().backward()
    return [out.float()] + [t.grad.float() for t in leaves]


@pytest.mark.parametrize("layout", [c[0] for c in BAG_LAYOUTS])
@pytest.mark.parametrize("rate", [3, 10])
def test_reordered_conv_of_bags_matches_the_reference(layout, rate, seed, monkeypatch):
    """The kernels with padded and packed bags against the reference (each bag alone): output, dx (0 outside
    the bags), dweight, dbias; small tiles on the CPU, so bags have first, interior and last tiles."""
    _, batch, length, make = next(c for c in BAG_LAYOUTS if c[0] == layout)
    if DEV == "cpu":
        monkeypatch.setattr(kc, "TILE_OVERRIDE", BAG_TILES)
    gen = _gen(seed)
    bags = make(DEV)
    x = torch.randn(batch, 5, length, generator=gen).to(DEV)
    w = (torch.randn(5, 4, generator=gen) / 2).to(DEV)
    b = torch.randn(5, generator=gen).to(DEV)
    out_len = bags.reordered_length(rate) if isinstance(bags, ReorderBags) else -(-length // rate) * rate
    g = torch.randn(batch, 5, out_len, generator=gen).to(DEV)
    got = _bag_conv_grads(functools.partial(causal_conv1d, backend="triton"), x, w, b, g, bags, rate)
    ref = _bag_conv_grads(functools.partial(causal_conv1d, backend="reference"), x, w, b, g, bags, rate)
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten elements"
        assert _rel(a, e) < 1e-5, (name, _rel(a, e))
    outside = torch.ones(batch, length, dtype=torch.bool)
    for row, a, n, _ in _bag_spans(bags, batch, length, rate):
        outside[row, a:a + n] = False
    assert (got[1].permute(0, 2, 1)[outside.to(DEV)] == 0).all(), "x outside the bags got a gradient"


@pytest.mark.parametrize("layout", [c[0] for c in BAG_LAYOUTS])
def test_restore_add_gate_of_bags_matches_the_reference(layout, seed, monkeypatch):
    """restore_add_gate with padded and packed bags: output and the three gradients against the reference."""
    _, batch, length, make = next(c for c in BAG_LAYOUTS if c[0] == layout)
    if DEV == "cpu":
        monkeypatch.setattr(kr, "TILE_OVERRIDE", {"fwd": {"BLOCK_D": 4, "TK": 4}, "bwd": {"BLOCK_D": 4, "TK": 2}})
    gen, rate = _gen(seed), 3
    bags = make(DEV)
    out_len = bags.reordered_length(rate) if isinstance(bags, ReorderBags) else -(-length // rate) * rate
    y = torch.randn(batch, 4, length, generator=gen).to(DEV)
    yr = torch.randn(batch, 4, out_len, generator=gen).to(DEV)
    zz = torch.randn(batch, 8, length, generator=gen).to(DEV)
    g = torch.randn(batch, length, 4, generator=gen).to(DEV).transpose(1, 2)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (y, yr, zz)]
        out = restore_add_gate(leaves[0], leaves[1], leaves[2][:, 4:], rate, backend=backend, bags=bags)
        out.backward(g)
        results.append([out, leaves[0].grad, leaves[1].grad, leaves[2].grad[:, 4:]])
    for name, a, e in zip(("out", "dy", "dy_reordered", "dz"), *results):
        assert torch.isfinite(a).all(), f"{name}: unwritten elements"
        assert _rel(a, e) < 1e-6, (name, _rel(a, e))


def test_the_kernels_clamp_lengths_they_do_not_read_on_the_host(monkeypatch):
    """The triton backend does not read lengths on the host (CUDA graphs): a length past the row acts as the
    row's length, with every access inside the tensors (bounds-checked in the interpreter)."""
    if DEV == "cpu":
        monkeypatch.setattr(kc, "TILE_OVERRIDE", BAG_TILES)
    gen = _gen(5)
    x, w = torch.randn(2, 3, 29, generator=gen).to(DEV), torch.randn(3, 4, generator=gen).to(DEV)
    got = causal_conv1d(x, w, reorder=4, bags=torch.tensor([40, 11], device=DEV), backend="triton")
    assert torch.allclose(got, causal_conv1d(x, w, reorder=4, bags=torch.tensor([29, 11], device=DEV),
                                             backend="reference"), atol=1e-6)


def test_bags_errors_name_the_argument():
    x, w = torch.randn(2, 4, 9), torch.randn(4, 4)
    with pytest.raises(ConvArgumentError, match="bags: only with reorder"):
        causal_conv1d(x, w, bags=torch.tensor([9, 3]))
    with pytest.raises(ConvArgumentError, match=r"bags: lengths must have shape \(2,\)"):
        causal_conv1d(x, w, reorder=3, bags=torch.tensor([9]))
    with pytest.raises(ConvArgumentError, match="bags: length 10 of row 1 is outside"):
        causal_conv1d(x, w, reorder=3, bags=torch.tensor([9, 10]))
    with pytest.raises(ConvArgumentError, match="bags: packed bags take one row"):
        causal_conv1d(x, w, reorder=3, bags=ReorderBags([0], [4]))
    with pytest.raises(ConvArgumentError, match="bags: the last bag ends at 12, past the length 9"):
        causal_conv1d(x[:1], w, reorder=3, bags=ReorderBags([0, 5], [4, 7]))
    with pytest.raises(ReorderArgumentError, match="bags: bag 1 .start 2, size 3. must"):
        ReorderBags([0, 2], [4, 3])
    with pytest.raises(ReorderArgumentError, match=r"y_reordered: expected shape \(1, 4, 9\)"):
        restore_add_gate(x[:1], torch.randn(1, 4, 12), x[:1], 3, bags=ReorderBags([0, 5], [4, 2]))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_srmamba_fast_layers_with_bags_on_the_kernels_match_the_reference_layers(layout, seed, monkeypatch):
    """SRMamba on padded (PaddedBags) and packed (PackedBags) bags, impl="fast" with the Triton convolution and
    restore-add-gate reading the bags in place, against the reference layers (index gathers): output at the
    bags' tokens, the input gradient, every parameter gradient, fp32."""
    ref, fast, calls = _srmamba_on_kernels(
        monkeypatch, seed, lambda name, kw: (name, kw.get("reorder"), type(kw.get("bags")).__name__))
    gen = _gen(seed)
    if layout == "padded":
        lengths = [41, 17, 1]
        x = torch.randn(3, 41, 12, generator=gen).to(DEV)
        pad = wnn.PaddedBags(torch.tensor(lengths, device=DEV), 41)
        real = wnn.padding.valid_mask(torch.tensor(lengths), 41).to(DEV)
    else:
        x, pad = wnn.PackedBags.pack([torch.randn(n, 12, generator=gen).to(DEV) for n in (20, 1, 33)], align=4)
        real = pad.valid
    r = torch.randn(x.shape, generator=_gen(seed + 1)).to(DEV) * real[..., None]
    results = []
    for module in (ref, fast):
        xl = x.clone().requires_grad_(True)
        out = module(xl, pad=pad)
        (out * r).sum().backward()
        results.append((out.detach() * real[..., None], xl.grad, {n: p.grad for n, p in module.named_parameters()}))
    kind = "Tensor" if layout == "padded" else "ReorderBags"
    assert calls == [("conv", None, "NoneType"), ("conv", 3, kind), ("gate", None, kind)]
    (out_r, dx_r, g_r), (out_f, dx_f, g_f) = results
    assert _rel(out_f, out_r) < 1e-4 and _rel(dx_f, dx_r) < 1e-4
    assert (dx_f[~real] == 0).all(), "the padding got a gradient"
    assert g_f.keys() == g_r.keys() and len(g_r) == 16
    for name in g_r:
        assert _rel(g_f[name], g_r[name]) < 1e-4, (name, _rel(g_f[name], g_r[name]))


# ----------------------------------------------------------------------------------------------
# full sizes, compiled, on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("length,rate", [(100_003, 10), (4_999, 7)])
def test_gpu_reordered_conv_and_gate_at_a_bags_length(length, rate, seed):
    """bf16 at d_inner 1024: the reordered conv and the restore-add-gate against their fp32 references."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dim = 1024
    padded = -(-length // rate) * rate
    x = torch.randn(1, 2 * dim, length, device="cuda", generator=gen).bfloat16()
    w = torch.randn(dim, 4, device="cuda", generator=gen) / 2
    b = torch.randn(dim, device="cuda", generator=gen)
    g = torch.randn(1, dim, padded, device="cuda", generator=gen).bfloat16().float()
    got = _conv_grads(functools.partial(causal_conv1d, backend="triton", reorder=rate), x, w, b, g, dim, "silu")
    ref = _conv_grads(lambda xv, *a, **k: causal_conv1d_reference(stride_reorder(xv, rate), *a, **k),
                      x, w, b, g, dim, "silu", dtype=torch.float32)
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, ref):
        assert torch.isfinite(a).all() and _rel(a, e) < 1e-2, (name, _rel(a, e))
    y = torch.randn(1, dim, length, device="cuda", generator=gen).bfloat16()
    yr = torch.randn(1, dim, padded, device="cuda", generator=gen).bfloat16()
    gg = torch.randn(1, length, dim, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    for name, a, e in zip(("out", "dy", "dy_reordered", "dz"), *_gate_grads(y, yr, x, gg, rate)):
        assert torch.isfinite(a).all() and _rel(a, e) < 1e-2, (name, _rel(a, e))


@pytest.mark.gpu
def test_gpu_reordered_conv_and_gate_of_bags():
    """bf16 at d_inner 1024, compiled: padded bags of 60,001 and 20,000 patches and five packed bags of 1 to
    30,000 (aligned to 16), the reordered conv and the restore-add-gate against their fp32 references."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    dim, rate = 1024, 10
    packed = ReorderBags([0, 10_016, 10_032, 17_040, 47_040], [10_007, 1, 7_003, 30_000, 2_999])
    for batch, length, bags in ((2, 60_001, torch.tensor([60_001, 20_000], device="cuda")), (1, 50_039, packed)):
        out_len = bags.reordered_length(rate) if isinstance(bags, ReorderBags) else -(-length // rate) * rate
        x = torch.randn(batch, dim, length, device="cuda", generator=gen).bfloat16()
        w = torch.randn(dim, 4, device="cuda", generator=gen) / 2
        b = torch.randn(dim, device="cuda", generator=gen)
        g = torch.randn(batch, dim, out_len, device="cuda", generator=gen).bfloat16().float()
        got = _bag_conv_grads(functools.partial(causal_conv1d, backend="triton"), x, w, b, g, bags, rate)
        ref = _bag_conv_grads(functools.partial(causal_conv1d, backend="reference"), x.float(), w, b, g, bags, rate)
        for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, ref):
            assert torch.isfinite(a).all() and _rel(a, e) < 1e-2, (name, _rel(a, e))
        y = torch.randn(batch, dim, length, device="cuda", generator=gen).bfloat16()
        yr = torch.randn(batch, dim, out_len, device="cuda", generator=gen).bfloat16()
        gg = torch.randn(batch, dim, length, device="cuda", generator=gen).bfloat16()
        results = []
        for backend, dtype in (("triton", torch.bfloat16), ("reference", torch.float32)):
            leaves = [t.detach().to(dtype).requires_grad_(True) for t in (y, yr, x)]
            out = restore_add_gate(leaves[0], leaves[1], leaves[2], rate, backend=backend, bags=bags)
            out.backward(gg.to(dtype))
            results.append([out, leaves[0].grad, leaves[1].grad, leaves[2].grad])
        for name, a, e in zip(("out", "dy", "dy_reordered", "dz"), *results):
            assert torch.isfinite(a).all() and _rel(a, e) < 1e-2, (name, _rel(a, e))
