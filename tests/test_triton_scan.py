"""The Triton selective scan against the reference, forward and every gradient.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py before Triton is imported) at small sizes; the `gpu` tests run the compiled kernels at
full sizes on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tests import triton_bounds
from wsimamba.kernels import selective_scan as ks
from wsimamba.ops.selective_scan import selective_scan_naive, selective_scan_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


SMALL_TILES = {"fwd": {"BLOCK_D": 4, "T": 16, "CPS": 2}, "bwd": {"BLOCK_D": 2, "CPS": 3},
               "seq": {"BLOCK_D": 4, "TB": 4, "SEG": 1}, "bwd_seq": {"TB": 8, "SUB": 3, "SEG": 2}}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ks, "POISON_OUTPUTS", True)
    _SEEDS.clear()  # each test's failure message names its own input seeds


@pytest.fixture(autouse=True)
def _in_bounds(request):
    """In the interpreter, every test fails if a kernel loads or stores outside the tensors it was
    given (a read past a buffer returns garbage, now and then a NaN: a flaky gradient otherwise)."""
    if DEV != "cpu" or not triton_bounds.available() or "bounds_check" in request.node.name:
        yield
        return
    with triton_bounds.BoundsCheck("selective_scan") as check:
        yield
    assert not check.violations, "\n".join(check.violations)


@triton.jit
def _read_one_past(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs + 1, mask=offs < n)  # lane n - 1 reads one element past x
    tl.store(y_ptr + offs, v, mask=offs < n)


@pytest.mark.skipif(DEV != "cpu", reason="the bounds check runs in Triton's interpreter")
def test_bounds_check_catches_a_read_past_a_tensor():
    """The check above is live: this Triton's interpreter has the hooks it patches, and a kernel that
    reads one element past its input is reported (and one that stays inside is not)."""
    assert triton_bounds.available(), "Triton's interpreter changed: tests/triton_bounds.py needs updating"
    x, y = torch.arange(6.0), torch.empty(6)
    with triton_bounds.BoundsCheck("test_triton_scan") as check:
        _read_one_past[(1,)](x, y, 5, BLOCK=8)
    assert check.violations == [] and torch.equal(y[:5], x[1:])  # x has 6 elements: lane 4 reads x[5]
    with triton_bounds.BoundsCheck("test_triton_scan") as check:
        _read_one_past[(1,)](x, y, 6, BLOCK=8)
    assert len(check.violations) == 1 and "load of 1 of 6 lanes" in check.violations[0], check.violations


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 channels × 16 positions in segments of 1-3 chunks (sequential forward: blocks of 4
    positions or one window): many tiles, blocks and segments at sizes the interpreter runs fast."""
    if DEV == "cpu":
        monkeypatch.setattr(ks, "TILE_OVERRIDE", SMALL_TILES)


_SEEDS = []  # the seeds of the inputs made so far in this test (failure messages name them)


def _inputs(batch, dim, length, state, groups=None, z=True, D=True, bias=True, dtype=torch.float32, seed=None, device=DEV):
    seed = seed if seed is not None else torch.seed() % 2**31
    _SEEDS.append(seed)
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    bshape = (batch, state, length) if groups is None else (batch, groups, state, length)
    return dict(
        u=r(batch, dim, length).to(dtype),
        delta=r(batch, dim, length, scale=0.5).to(dtype),
        A=(-(torch.rand(dim, state, generator=g) * 2 + 0.05)).to(device),
        B=r(*bshape),
        C=r(*bshape),
        D=r(dim) if D else None,
        z=r(batch, dim, length).to(dtype) if z else None,
        delta_bias=r(dim, scale=0.3) if bias else None,
    )


def _run(fn, args, grad_out, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items() if v is not None}
    call = {k: leaves.get(k) for k in args}
    out = fn(**call, **kw)
    wide = torch.float64 if out.dtype == torch.float64 else torch.float32
    (out.to(wide) * grad_out).sum().backward()
    return out.to(wide), {k: v.grad.to(wide) for k, v in leaves.items()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(args, tol, loose=None, **kw):
    """Kernel against the fp32 reference, output and every gradient, relative error under `tol`.
    Returns the kernel's output and gradients.

    A gradient that is a sum of a few terms of opposite sign (a 1-element sequence's dΔ, say) has
    no fp32 answer good to 1e-5: then both are judged against a float64 reference, and the kernel
    must be within `tol` of it or no worse than twice the fp32 reference's own error. `loose`
    ({name: tolerance}): gradients judged against float64 within that tolerance instead, for a test
    whose gradient is one long cancelling sum (its fp32 value depends on the order of the additions)."""
    loose = loose or {}
    ref_args = {k: (v.float() if v is not None else None) for k, v in args.items()}
    out_ref, g_ref = _run(selective_scan_reference, ref_args, _grad_like(args), **kw)
    out, g = _run(ks.selective_scan, args, _grad_like(args), **kw)
    assert torch.isfinite(out).all(), "an output element was not written"
    got, ref = {"out": out, **g}, {"out": out_ref, **g_ref}
    for k in ref:
        assert torch.isfinite(got[k]).all(), f"{k}: unwritten elements"
    failing = [k for k in ref if _rel(got[k], ref[k]) >= tol]
    if not failing:
        return out, g
    f64_args = {k: (v.double() if v is not None else None) for k, v in args.items()}
    out64, g64 = _run(selective_scan_reference, f64_args, _grad_like(args).double(), **kw)
    truth = {"out": out64, **g64}
    for k in failing:
        err, ref_err = _rel(got[k].double(), truth[k]), _rel(ref[k].double(), truth[k])
        if k == "out":
            # an output that is a sum of terms of opposite sign is judged against the size of its terms:
            # one element of 0.01 made of terms of ~0.5 had no fp32 answer good to 1e-5 of itself
            err = min(err, ((got[k].double() - truth[k]).norm() / _term_sizes(f64_args, kw).norm()).item())
        assert err < max(tol, 2 * ref_err, loose.get(k, 0.0)), (
            k, "kernel vs float64", err, "fp32 reference vs float64", ref_err, "input seeds", _SEEDS)
    return out, g


def _term_sizes(args, kw):
    """Per output element, the sum of the absolute values of the terms the scan adds up (float64): the
    reference on |u|, |B|, |C|, |D| (every decay and Δ is positive already), times |silu(z)|."""
    bare = {k: (v.abs() if k in ("u", "B", "C", "D") and v is not None else v) for k, v in args.items()}
    bare["z"] = None
    sizes = selective_scan_reference(**bare, **kw)
    z = args.get("z")
    return sizes if z is None else sizes * torch.nn.functional.silu(z).abs()


_GRAD = {}


def _grad_like(args):
    u = args["u"]
    key = (tuple(u.shape), u.device.type)
    if key not in _GRAD:
        _GRAD.clear()
        _GRAD[key] = torch.randn(u.shape, device=u.device)
    return _GRAD[key]


CASES = [
    # (batch, dim, length, state, groups)
    (1, 1, 1, 4, None),
    (2, 5, 7, 4, None),
    (1, 3, 70, 3, None),  # length past one tile, odd state (padded to a power of two)
    (2, 11, 40, 4, None),  # dim not a multiple of the channel tile, length over several tiles
    (1, 8, 65, 4, 2),  # grouped B / C
]


@pytest.mark.parametrize("batch,dim,length,state,groups", CASES)
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 4), ("local_bidirectional", 3)])
def test_matches_reference_fp32(batch, dim, length, state, groups, direction, window, small_tiles):
    args = _inputs(batch, dim, length, state, groups)
    _compare(args, 1e-5, delta_softplus=True, direction=direction, window=window)


@pytest.mark.parametrize("z,D,bias,softplus", [(False, False, False, False), (True, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 2), ("reverse", None), ("bidirectional", None)])
def test_optional_inputs_and_directions(z, D, bias, softplus, direction, window, small_tiles):
    args = _inputs(2, 6, 41, 4, z=z, D=D, bias=bias)
    if not softplus:
        # Δ is a step size: without softplus the caller passes positive values (negative ones make
        # exp(Δ A) > 1 and the state explode, where no two summation orders agree to 1e-5)
        args["delta"] = args["delta"].abs()
        if bias:
            args["delta_bias"] = args["delta_bias"].abs()
    _compare(args, 1e-5, delta_softplus=softplus, direction=direction, window=window)


@pytest.mark.parametrize("window", [1, 16, 64])
def test_window_edge_cases_default_tiles(window):
    # the shipped tile sizes; window 1 is the plain forward scan, window 64 fills a whole tile
    args = _inputs(1, 4, 150, 4)
    _compare(args, 1e-5, delta_softplus=True, direction="local_bidirectional", window=window)


def test_bf16_inputs_within_bf16_tolerance_of_fp32(small_tiles):
    args = _inputs(1, 6, 90, 8, dtype=torch.bfloat16)
    _compare(args, 2e-2, delta_softplus=True, direction="local_bidirectional", window=8)


def test_last_state_matches_the_naive_loop(small_tiles):
    args = _inputs(2, 5, 75, 4, z=False)
    out, last = ks.selective_scan(**args, delta_softplus=True, direction="forward", return_last_state=True)
    out_ref, last_ref = selective_scan_naive(**args, delta_softplus=True, direction="forward", return_last_state=True)
    assert _rel(out, out_ref) < 1e-5 and _rel(last, last_ref) < 1e-5


def test_large_state(small_tiles):
    args = _inputs(1, 2, 20, 64)
    _compare(args, 1e-5, delta_softplus=True, direction="local_bidirectional", window=4)


def test_rejects_what_it_cannot_take():
    args = _inputs(1, 4, 8, 4)
    with pytest.raises(ks.TritonScanError, match="dtype"):
        ks.selective_scan(**{**args, "u": args["u"].double()})
    with pytest.raises(ks.TritonScanError, match="A must be fp32"):
        ks.selective_scan(**{**args, "A": args["A"].half()})
    with pytest.raises(ks.TritonScanError, match="window"):
        ks.selective_scan(**args, direction="local_bidirectional", window=0)
    with pytest.raises(ks.TritonScanError, match="return_last_state"):
        ks.selective_scan(**args, direction="reverse", return_last_state=True)


def test_non_contiguous_inputs(small_tiles):
    args = _inputs(2, 6, 33, 4)
    # a (batch, length, dim) buffer viewed as (batch, dim, length): stride 1 along dim, not length
    args["u"] = args["u"].transpose(1, 2).contiguous().transpose(1, 2)
    args["B"] = args["B"].transpose(1, 2).contiguous().transpose(1, 2)
    _compare(args, 1e-5, delta_softplus=True, direction="local_bidirectional", window=4)


@pytest.mark.parametrize("backward", ["auto", "scan"])
def test_inputs_sliced_along_the_length(backward, small_tiles, monkeypatch):
    """u, Δ and z cut from wider buffers (unit stride along the length, rows longer than it): the
    kernels take them as they are, and must write du, dΔ, dz at the gradients' own strides."""
    monkeypatch.setattr(ks, "BACKWARD", backward)
    args = _inputs(2, 5, 37, 4)
    kw = dict(delta_softplus=True, direction="local_bidirectional", window=4)
    _, g_ref = _run(selective_scan_reference, args, _grad_like(args), **kw)
    wide = {}
    for k in ("u", "delta", "z"):
        wide[k] = torch.zeros(2, 5, 50, device=args[k].device, dtype=args[k].dtype)
        wide[k][:, :, :37] = args[k]
        wide[k].requires_grad_(True)
    others = {k: v.detach().clone().requires_grad_(True) for k, v in args.items() if k not in wide and v is not None}
    sliced = {k: v[:, :, :37] for k, v in wide.items()}
    assert sliced["u"].stride(-1) == 1 and not sliced["u"].is_contiguous()
    out = ks.selective_scan(**sliced, **others, **kw)
    (out * _grad_like(args)).sum().backward()
    for k in wide:
        assert _rel(wide[k].grad[:, :, :37], g_ref[k]) < 1e-5, k
        assert (wide[k].grad[:, :, 37:] == 0).all(), k
    for k in others:
        assert _rel(others[k].grad, g_ref[k]) < 1e-5, k


@pytest.mark.parametrize("direction,window,prefetch", [("forward", None, (False, True)), ("forward", None, (True, False)),
                                                      ("local_bidirectional", 4, (True, True)),
                                                      ("local_bidirectional", 5, (False, False))])
def test_sequential_and_scan_forwards_agree(direction, window, prefetch, small_tiles, monkeypatch):
    # both forwards against the reference, each with the backward its saved states are laid out for
    # (sequential / scan); the sequential one with and without each of its prefetches
    args = _inputs(2, 7, 83, 8, groups=None)
    tiles = {**ks.TILE_OVERRIDE} if ks.TILE_OVERRIDE else {}
    tiles["seq"] = {**tiles.get("seq", {}), "PREFETCH": prefetch[0], "PREFETCH_BC": prefetch[1]}
    monkeypatch.setattr(ks, "TILE_OVERRIDE", tiles)
    results = {}
    for impl in ("seq", "scan"):
        monkeypatch.setattr(ks, "FORWARD", impl)
        results[impl] = _compare(args, 1e-5, delta_softplus=True, direction=direction, window=window)
    out_seq, out_scan = results["seq"][0], results["scan"][0]
    assert _rel(out_seq, out_scan) < 1e-5


@pytest.mark.parametrize("direction,window,tb", [("forward", None, 16), ("forward", None, 4), ("local_bidirectional", 16, None),
                                                 ("local_bidirectional", 5, None)])
@pytest.mark.parametrize("sums_after", [False, True])
def test_sequential_forward_adds_position_sums_during_or_after_the_walks(direction, window, tb, sums_after, monkeypatch):
    """The sequential forward adds each position's sum over states (C_t·h_t, and for LB C_t·r_t) into
    the output tile as the walks make it, or keeps the sums and adds them after both walks (the
    default for 16-position blocks): either way, the reference's output, for plain blocks of 16 and 4
    and LB windows of 16 and 5 (a block of 8 with 3 positions unused)."""
    seq = {"BLOCK_D": 4, "SEG": 2, "SUMS_AFTER": sums_after, **({"TB": tb} if tb else {})}
    monkeypatch.setattr(ks, "TILE_OVERRIDE", {"seq": seq})
    monkeypatch.setattr(ks, "FORWARD", "seq")
    args = _inputs(2, 7, 83, 8)
    ref = {k: (v.float() if v is not None else None) for k, v in args.items()}
    out = ks.selective_scan(**args, delta_softplus=True, direction=direction, window=window)
    expected = selective_scan_reference(**ref, delta_softplus=True, direction=direction, window=window)
    assert torch.isfinite(out).all(), "an output element was not written"
    assert _rel(out, expected) < 1e-5, _SEEDS


@pytest.mark.parametrize("direction,window,sub", [("forward", None, 8), ("forward", None, 5), ("local_bidirectional", 16, 8),
                                                  ("local_bidirectional", 5, 5), ("local_bidirectional", 3, 3)])
@pytest.mark.parametrize("scatter", [True, False])
def test_sequential_backward_sums_dB_dC_over_channels_by_reduce_scatter_or_tl_sum(direction, window, sub, scatter,
                                                                                 monkeypatch):
    """dB and dC summed over the tile's 8 channels either by `tl.sum` per position or by the
    reduce-scatter over a sub-block's positions (`_fold`; in the interpreter its lane swaps are
    `tl.gather`s): both give the reference's gradients, with sub-blocks of 8 positions and of fewer
    (the reduce-scatter's missing positions are zeros), and 13 channels (the second tile is part empty)."""
    bwd = {"SUB": sub, "SEG": 2, "SCATTER": scatter}
    assert ks._bwd_seq_config(13, 1, 8, window, bwd)["SCATTER"] is scatter  # the path under test is the one taken
    monkeypatch.setattr(ks, "TILE_OVERRIDE", {"bwd_seq": bwd})
    args = _inputs(2, 13, 45, 8)
    _compare(args, 1e-5, delta_softplus=True, direction=direction, window=window)


@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 4), ("local_bidirectional", 16)])
@pytest.mark.parametrize("bwd", [{"TB": 16, "SUB": 8, "SEG": 1}, {"TB": 8, "SUB": 8, "SEG": 3}, {"TB": 6, "SUB": 4, "SEG": 2},
                                 {"TB": 16, "SUB": 5, "SEG": 2, "BLOCK_D": 2}])
def test_sequential_backward_blocks_sub_blocks_and_segments(direction, window, bwd, monkeypatch):
    """The sequential backward walks blocks (the forward's saved states) in sub-blocks from the last, each
    needing a walk from its block's start, and segments chained by summaries: every split of the
    length gives the reference's gradients. Plain blocks of 16/8/6 positions, sub-blocks that do and
    do not divide them; LB windows of 4 (inside a sub-block) and 16 (two sub-blocks of 8 or 5)."""
    monkeypatch.setattr(ks, "TILE_OVERRIDE", {"bwd_seq": bwd})
    args = _inputs(2, 5, 77, 8)
    _compare(args, 1e-5, delta_softplus=True, direction=direction, window=window)


@pytest.mark.parametrize("programs,num_warps,chunks,expected", [
    (16, 1, 1000, 4),   # an exact fit: the 64 warps asked (16 per SM on the CPU's nominal 4 SMs)
    (24, 1, 1000, 2),   # 48 of 64 warps: rounding up (3 segments, 72) would leave 8 programs for a second wave
    (12, 2, 1000, 2),   # the same with two-warp programs
    (20, 1, 1000, 3),   # 60 of 64
    (40, 1, 1000, 2),   # 1 segment would fill 40 of 64 warps (under 3/4): rounded up
    (100, 1, 1000, 1),  # more programs than warps asked
    (16, 1, 3, 3),      # never more segments than chunks
])
def test_segment_count_keeps_programs_in_the_warps_asked(programs, num_warps, chunks, expected):
    """`_segments` splits the length so that the programs fill the warps asked per SM without a sliver
    left for another wave (at batch > 1 that sliver cost 1.2-1.35x on an H200), unless staying within
    them leaves more than a quarter of the warps idle."""
    cps, n_seg = ks._segments(chunks, programs, num_warps, torch.device("cpu"), None, warps_per_sm=16)
    assert n_seg == expected
    assert cps * n_seg >= chunks > cps * (n_seg - 1)


@pytest.mark.parametrize("direction,window,bwd,copies", [("forward", None, {"TB": 16, "SUB": 8, "SEG": 2}, 1),
                                                         ("local_bidirectional", 5, {"SUB": 5, "SEG": 3}, 1),
                                                         ("forward", None, {"TB": 16, "SUB": 5, "SEG": 2}, 2)])
def test_backward_reuses_the_forward_row_copies(direction, window, bwd, copies, monkeypatch):
    """The sequential backward reads B and C rows from the forward's transposed copies when their zero rows
    past the end cover its sub-blocks (one copy per step), and makes its own when they do not (blocks of 16
    in sub-blocks of 5 read 4 rows past a 16-row pad): the reference's gradients either way."""
    made = []
    rows = ks._transposed_rows
    monkeypatch.setattr(ks, "_transposed_rows", lambda *a, **k: made.append(a[2]) or rows(*a, **k))
    monkeypatch.setattr(ks, "TILE_OVERRIDE", {"bwd_seq": bwd})
    _compare(_inputs(2, 6, 61, 8), 1e-5, delta_softplus=True, direction=direction, window=window)
    assert len(made) == copies, made


@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 4)])
def test_sequential_forward_feeds_the_scan_backward(direction, window, small_tiles, monkeypatch):
    # BACKWARD = "scan": the sequential forward saves states at the scan kernels' chunks instead
    monkeypatch.setattr(ks, "BACKWARD", "scan")
    calls = []
    monkeypatch.setattr(ks, "_bwd_seq", lambda *a, **k: calls.append(1))
    args = _inputs(2, 6, 50, 4)
    _compare(args, 1e-5, delta_softplus=True, direction=direction, window=window)
    assert not calls


def test_backward_summaries_wait_for_the_slowest_state(monkeypatch):
    """The backward's segment summary walks forward from the segment's start and stops once every
    decay product is below 2^-64. One barely-decaying state among fast ones must hold it: its
    adjoint carries gradient from the later segments back across every boundary."""
    monkeypatch.setattr(ks, "TILE_OVERRIDE", {"bwd_seq": {"TB": 4, "SUB": 4, "SEG": 2, "BLOCK_D": 4}})
    args = _inputs(1, 6, 160, 4, z=False, D=False)
    args["A"] = torch.full_like(args["A"], -60.0)
    args["A"][4, 2] = -1e-3
    args["delta"] = args["delta"].abs() + 0.5
    # dA is, to within 1e-20, the slow state's one entry: a sum over 160 positions of terms of both signs,
    # whose fp32 value depends on the order of the additions (CI: 5e-4 from float64 once, where the
    # reference's order gave 1.7e-5). A summary that stopped early would be wrong by > 1e-2 (below).
    _, g = _compare(args, 1e-5, loose={"A": 2e-3}, delta_softplus=True, direction="forward")
    # the slow state really carries gradient across segments: without it, its channel's gradients change
    cut = {**args, "A": args["A"].clamp(max=-60.0)}
    _, g_cut = _run(ks.selective_scan, cut, _grad_like(cut), delta_softplus=True, direction="forward")
    assert _rel(g_cut["u"][:, 4], g["u"][:, 4]) > 1e-2


@pytest.mark.parametrize("seg", [1, 2])
def test_segment_summaries_wait_for_the_slowest_state(seg, monkeypatch):
    """A segment's summary walks back from its end and stops once every decay product is below 2^-64.

    Here most states decay so fast that they reach 0 within a few positions, and one state of one
    channel barely decays at all: stopping on the fast ones would drop that state's memory of the
    previous segments, and the outputs after each segment boundary would be wrong."""
    monkeypatch.setattr(ks, "FORWARD", "seq")
    monkeypatch.setattr(ks, "TILE_OVERRIDE", {"fwd": {"T": 16}, "seq": {"BLOCK_D": 4, "TB": 4, "SEG": seg}})
    args = _inputs(1, 6, 160, 4, z=False, D=False)
    args["A"] = torch.full_like(args["A"], -60.0)
    args["A"][4, 2] = -1e-3  # channel 4 (second tile), state 2 keeps everything
    args["delta"] = args["delta"].abs() + 0.5
    out = ks.selective_scan(**args, delta_softplus=True, direction="forward")
    ref = selective_scan_reference(**args, delta_softplus=True, direction="forward")
    assert _rel(out, ref) < 1e-5
    # the slow channel really carries state across the boundaries: cut it off and the output changes
    cut = ks.selective_scan(**{**args, "A": args["A"].clamp(max=-60.0)}, delta_softplus=True, direction="forward")
    assert _rel(cut[:, 4], ref[:, 4]) > 1e-2


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, ks._softplus(x), mask=offs < n)


def _softplus_error(device):
    """The kernels' softplus on a dense fp32 grid over [-80, 30] (below, softplus(x) ≈ e^x is subnormal in
    fp32): the largest relative error against float64, divided by max(1, |x|). e^x computed as
    2^(x·log2 e) carries the rounding of the product, a relative error of about |x|·eps (torch's
    expf reduces the range in extended precision); for x < -20 that is still a Δ below 2e-9."""
    x = torch.cat([torch.linspace(-80, 30, 200_003, dtype=torch.float32),
                   torch.tensor([0.0, -0.0, 20.0, 20.000002, 19.999998, -20.0, -1e-8, 1e-8])]).to(device)
    y = torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.nn.functional.softplus(x.double())
    rel = (y.double() - exact).abs() / exact.clamp_min(1e-300)
    return (rel / x.double().abs().clamp_min(1.0)).max().item(), (y[x > 20] == x[x > 20]).all().item()


@pytest.mark.parametrize("batch,groups,state,length,extra", [(1, 1, 16, 131, 16), (2, 3, 8, 77, 6), (3, 2, 64, 40, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_rows_match_padded_transposes(batch, groups, state, length, extra, dtype):
    """The one-launch row copies of B and C the sequential kernels read: the same as padding the transposes
    (PyTorch) for contiguous inputs and for views with other strides, and never a stale value in the pad rows."""
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B4 = torch.randn(batch, groups, state, length, generator=g).to(DEV, dtype)
    C4 = torch.randn(batch, groups, length, state, generator=g).to(DEV, dtype).transpose(2, 3)  # length-major view
    # the second pair: C first (transposed strides), and B sliced along the length (offset, row stride L)
    for B, C in ((B4, C4), (C4[..., 1:], B4[..., 1:])):
        Bt, Ct = ks._transposed_rows(B, C, extra)
        for X, Xt in ((B, Bt), (C, Ct)):
            want = torch.nn.functional.pad(X.transpose(2, 3), (0, 0, 0, extra)).float()
            assert Xt.is_contiguous() and Xt.dtype == torch.float32 and Xt.shape == want.shape, seed
            assert torch.equal(Xt, want), seed


def test_softplus_is_accurate_to_a_few_ulp():
    # the fitted log1p polynomial: a wrong coefficient, or losing the tail below x ≈ -17 (where
    # 1 + e^x rounds to 1 and log(1 + exp(x)), the kernels' softplus before, returns 0), fails here
    err, threshold_exact = _softplus_error(DEV)
    assert err < 4e-7, err
    assert threshold_exact  # above 20, x itself (PyTorch's threshold)


@pytest.mark.gpu
def test_gpu_softplus_is_accurate_to_a_few_ulp():
    # compiled, tl.exp2 is the hardware's approximate exponential (relative error ~2^-22)
    err, threshold_exact = _softplus_error("cuda")
    assert err < 8e-7, err
    assert threshold_exact


_COMPILE_SEQ_KERNELS = """
import json, sys
from wsimamba.kernels import selective_scan as ks
from wsimamba.kernels.sass_check import compile_sm90


def compiled_ttgir(fn, consts, bf16):
    # compiled for sm_90 with the pointers in `bf16` bf16, the others fp32; pointers, lengths and row
    # strides multiples of 16
    return compile_sm90(fn, consts, bf16).asm["ttgir"]


def ttgir(shfl, smem=False):
    # the backward at its GPU tiles: bf16 inputs, state 16, LB window 16
    consts = dict(N=16, BLOCK_D=8, TB=16, STEP=16, SUB=8, SUBP=8, WINDOW=16, VEC=4, PREFETCH_L1=True, PF=16,
                  SCATTER=shfl, SHFL=shfl, SMEM_ROWS=smem, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
    return compiled_ttgir(ks._bwd_seq_kernel, consts, {"u_ptr", "dt_ptr", "z_ptr", "dout_ptr", "du_ptr", "ddt_ptr", "dz_ptr"})


def fwd_ttgir(window, smem=False):
    # the forward at its GPU tiles, PTX picks on (plain, and LB window 16), or the rows from shared memory
    consts = dict(N=16, BLOCK_D=16, TB=16, STEP=16, WINDOW=window, SAVE_EVERY=1, PREFETCH=bool(window),
                  PREFETCH_BC=not window and not smem, PREFETCH_L1=True, IN_AHEAD=1, LATE_NEXT=True,
                  SUMS_AFTER=True, SHFL_PICK=not smem,
                  SMEM_ROWS=smem, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, SAVE_STATES=True,
                  SAVE_LAST=False)
    return compiled_ttgir(ks._fwd_seq_kernel, consts, {"u_ptr", "dt_ptr", "z_ptr", "out_ptr"})


with_shfl = ttgir(True)
fwd = fwd_ttgir(0)
smem = {w: fwd_ttgir(w, smem=True) for w in (0, 16)}
bwd_smem = ttgir(True, smem=True)
json.dump({"ok": ks._shuffle_layouts_ok(with_shfl), "layout_seen": "threadsPerWarp = [8, 4]" in with_shfl,
           "other_layout_ok": ks._shuffle_layouts_ok(with_shfl.replace("threadsPerWarp = [8, 4]", "threadsPerWarp = [16, 2]")),
           "no_shuffles_ok": ks._shuffle_layouts_ok(ttgir(False)),
           "fwd_ok": ks._shuffle_layouts_ok(fwd, ks.FWD_SHFL_LAYOUT),
           "fwd_lb_ok": ks._shuffle_layouts_ok(fwd_ttgir(16), ks.FWD_SHFL_LAYOUT),
           "fwd_as_bwd_ok": ks._shuffle_layouts_ok(fwd),
           "smem_ok": [ks._shuffle_layouts_ok(smem[w], ks.FWD_SHFL_LAYOUT, ("ld.volatile.shared",)) for w in (0, 16)],
           "smem_other_layout_ok": ks._shuffle_layouts_ok(smem[16].replace("threadsPerWarp = [16, 2]",
                                                                            "threadsPerWarp = [8, 4]"),
                                                          ks.FWD_SHFL_LAYOUT, ("ld.volatile.shared",)),
           "smem_reads": [t.count("ld.volatile.shared") for t in (smem[0], smem[16], fwd)],
           "bwd_smem_ok": ks._shuffle_layouts_ok(bwd_smem, ks.BWD_SHFL_LAYOUT, ("ld.volatile.shared",)),
           "bwd_smem_reads": [t.count("ld.volatile.shared") for t in (bwd_smem, with_shfl)]}, sys.stdout)
"""


def test_shuffle_layout_check_reads_the_compiled_kernel():
    """The PTX shuffles of the sequential backward and forward run only where the compiled kernel's
    TTGIR shows the layout they were written for (`_shuffle_layouts_ok`, read before the first launch
    of each specialization). Compiled for sm_90 here (no GPU needed; outside the interpreter, so in a
    subprocess): at the GPU defaults this Triton gives those layouts; another layout, or no shuffles,
    is refused."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SEQ_KERNELS], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    # the rows read from shared memory: both walks of LB read them (16 + 16 rows forward, 15 + 15 back), each
    # read its own assembly (merged reads would keep the rows in registers again), none without SMEM_ROWS; the
    # LB backward reads B and C of 8 positions in each of its three walks (to the sub-block, the sub-block, back)
    assert seen == {"ok": True, "layout_seen": True, "other_layout_ok": False, "no_shuffles_ok": False,
                    "fwd_ok": True, "fwd_lb_ok": True, "fwd_as_bwd_ok": False, "smem_ok": [True, True],
                    "smem_other_layout_ok": False, "smem_reads": [32, 62, 0], "bwd_smem_ok": True,
                    "bwd_smem_reads": [48, 0]}, seen
    # what the check is keyed on: a launch whose rows are not 16-byte aligned is another specialization
    x, y = torch.zeros(32), torch.zeros(33)
    consts = {"SHFL": True}
    assert ks._specialization((x, 16), consts) != ks._specialization((x, 17), consts)
    assert ks._specialization((x, 16), consts) != ks._specialization((y[1:], 16), consts)


# ----------------------------------------------------------------------------------------------
# packed sequences (seq_idx): the sequential kernels' reset at a sequence's first position


def _packed_ids(batch, length, starts_per_row, seed, window=None):
    """(batch, length) int64 sequence ids, nondecreasing; each row's extra starts drawn from `seed` (multiples of
    `window` with one), position 1 and the last position included in row 0 when they qualify."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    step = window or 1
    for row in range(batch):
        cands = torch.arange(step, length, step)
        pick = cands[torch.randperm(len(cands), generator=g)[:starts_per_row]]
        if row == 0 and window is None:
            pick = torch.cat([pick, torch.tensor([1, length - 1])])
        for start in pick.tolist():
            ids[row, start:] += 1
    return ids


@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 4), ("reverse", None),
                                              ("bidirectional", None)])
@pytest.mark.parametrize("length", [37, 8])
def test_packed_sequences_match_the_reference(direction, window, length, small_tiles):
    """Output and every gradient against the reference's packed scan (each sequence alone), with sequence starts
    inside blocks, on block and segment borders, at position 1 and at the last position: small tiles, so the
    forward's and the backward's segment summaries carry across several starts."""
    args = _inputs(2, 5, length, 4)
    seq_idx = _packed_ids(2, length, 5, _SEEDS[-1], window).to(DEV)
    kw = dict(delta_softplus=True, direction=direction, window=window)
    out, _ = _compare(args, 1e-5, seq_idx=seq_idx, **kw)
    if length > 8:  # the packing matters: the unpacked scan differs
        assert not torch.allclose(out, ks.selective_scan(**args, **kw).float(), atol=1e-4)


def test_packed_sequences_refusals():
    """local_bidirectional needs every sequence to start at a window's start; the scan-based kernels (large
    states) take no packing."""
    args = _inputs(1, 4, 16, 4)
    ids = torch.tensor([[0] * 6 + [1] * 10]).to(DEV)
    with pytest.raises(ks.TritonScanError, match=r"multiple of the window \(4\)"):
        ks.selective_scan(**args, delta_softplus=True, direction="local_bidirectional", window=4, seq_idx=ids)
    big = _inputs(1, 4, 16, 80)
    with pytest.raises(ks.TritonScanError, match="sequential kernels only"):
        ks.selective_scan(**big, delta_softplus=True, seq_idx=ids)


# ----------------------------------------------------------------------------------------------
# full sizes, compiled, on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 16)])
def test_gpu_long_sequence_fp32(direction, window):
    args = _inputs(1, 64, 2**17, 16, device="cuda")
    _compare(args, 1e-5, delta_softplus=True, direction=direction, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 16), ("bidirectional", None)])
def test_gpu_packed_sequences(direction, window):
    """Default tiles (shared-memory rows, shuffles), 3 rows of ~20 packed sequences over 20,000 positions."""
    args = _inputs(3, 128, 20_000, 16, device="cuda")
    seq_idx = _packed_ids(3, 20_000, 20, _SEEDS[-1], window).cuda()
    _compare(args, 1e-5, delta_softplus=True, direction=direction, window=window, seq_idx=seq_idx)


def _run_checked(args, tiles, monkeypatch, **kw):
    """The kernel's output and gradients with `TILE_OVERRIDE = tiles`, from an empty cache of layout checks, and
    the checks each sequential kernel made (`_shuffles_fit`: whether its layout-bound assembly could run)."""
    monkeypatch.setattr(ks, "TILE_OVERRIDE", tiles)
    ks._SHUFFLES_CHECKED.clear()
    result = _run(ks.selective_scan, args, _grad_like(args), delta_softplus=True, **kw)
    return result, {name: [ok for key, ok in ks._SHUFFLES_CHECKED.items() if key[0] == name]
                    for name in ("_fwd_seq_kernel", "_bwd_seq_kernel")}


@pytest.mark.gpu
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 5), ("local_bidirectional", 16)])
def test_gpu_prefetch_hints_change_nothing(direction, window, monkeypatch):
    # the L1 prefetches (inline PTX, compiled only) are hints: with them on and off, the output and the
    # gradients written per position are bit for bit the same, the atomically summed ones equal to
    # rounding; odd length and segments, so the clamped addresses past the end are exercised. The same for
    # where the forward asks for the next block's u and Δ (after the walks, the default, or before: LATE_NEXT)
    # and how far ahead its hint for them goes (IN_AHEAD: one block, the default, or two)
    args = _inputs(2, 96, 3001, 16, device="cuda")
    results = []
    for seq in ({"PREFETCH_L1": True}, {"PREFETCH_L1": False}, {"PREFETCH_L1": True, "LATE_NEXT": False, "IN_AHEAD": 2}):
        monkeypatch.setattr(ks, "TILE_OVERRIDE", {"seq": {**seq, "SEG": 7},
                                                  "bwd_seq": {"PREFETCH_L1": seq["PREFETCH_L1"], "SEG": 5}})
        results.append(_run(ks.selective_scan, args, _grad_like(args), delta_softplus=True, direction=direction,
                            window=window))
    out_on, g_on = results[0]
    for out_off, g_off in results[1:]:
        assert torch.equal(out_on, out_off)
        for k in ("u", "delta", "z"):
            assert torch.equal(g_on[k], g_off[k]), k
        for k in ("A", "B", "C", "D", "delta_bias"):
            assert _rel(g_on[k], g_off[k]) < 1e-6, k


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,length", [(torch.float32, 3001), (torch.float32, 3072), (torch.bfloat16, 3001),
                                          (torch.bfloat16, 3072)])
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 5), ("local_bidirectional", 8),
                                              ("local_bidirectional", 16)])
def test_gpu_ptx_shuffles_match_the_tl_path(direction, window, dtype, length, monkeypatch):
    # the PTX shuffles (which assume Triton's tile layout: a wrong lane gives errors of order 1) against
    # the same kernels with `tl` only, to rounding (not bit for bit: sums are taken in another order, and
    # ptxas fuses multiplies and adds differently in the two builds; bf16 results may round the other way).
    # Backward: picks, dB/dC reduce-scatter, sums over states. Forward (blocks of 16: plain, and LB 16,
    # where it is off by default): picks. The layout check must let them run where the rows are 16-byte
    # aligned (the forward only with 16-bit inputs), and must refuse the forward's with fp32 inputs, whose
    # tiles get another layout.
    args = _inputs(2, 96, length, 16, dtype=dtype, device="cuda")
    results = []
    for fast in (True, False):
        bwd = {"SHFL": fast, "SCATTER": fast, "SEG": 5}
        seq = {"SHFL_PICK": fast, "SEG": 7}
        sc = ks._bwd_seq_config(96, 1, 16, window, bwd)
        assert sc["SHFL"] is fast and sc["SCATTER"] is fast
        assert ks._seq_config(96, 1, window, window or 16, seq)["SHFL_PICK"] is (fast and window in (None, 16))
        result, seen = _run_checked(args, {"bwd_seq": bwd, "seq": seq}, monkeypatch, direction=direction, window=window)
        results.append(result)
        if fast:
            checked = seen
    if length % 16 == 0:
        assert checked["_bwd_seq_kernel"] and all(checked["_bwd_seq_kernel"]), checked
    if window in (None, 16) and (length % 16 == 0 or dtype == torch.float32):
        fwd_ok = checked["_fwd_seq_kernel"]
        assert fwd_ok and all(ok is (dtype == torch.bfloat16) for ok in fwd_ok), checked
    (out_fast, g_fast), (out_tl, g_tl) = results
    tol = {torch.float32: 1e-6, torch.bfloat16: 5e-3}
    assert _rel(out_fast, out_tl) < tol[args["u"].dtype]
    for k in g_tl:
        assert _rel(g_fast[k], g_tl[k]) < tol[args[k].dtype], k


@pytest.mark.gpu
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 16)])
@pytest.mark.parametrize("batch,length,groups,dtype", [(2, 3008, None, torch.bfloat16), (1, 4096, None, torch.bfloat16),
                                                       (3, 1008, 2, torch.bfloat16), (2, 3001, None, torch.bfloat16),
                                                       (2, 3008, None, torch.float32)])
def test_gpu_shared_memory_rows_match_loaded_rows(direction, window, batch, length, groups, dtype, monkeypatch):
    # the forward's and the backward's B and C rows staged in shared memory by cp.async (inline PTX, written
    # for one tile layout: a wrong layout reads other states' values, errors of order 1) against the rows
    # loaded into registers: output, and the gradients (the backward starts from the states the forward
    # saved, so both kernels are compared, each with its rows from shared memory or loaded). Several
    # segments (the first block's rows are fetched before the loop, the last block's next rows clamped), groups,
    # a batch. The layout check must let it run where the rows are 16-byte aligned (the forward only with
    # 16-bit inputs) and refuse the forward's with fp32 inputs, falling back to the loads.
    args = _inputs(batch, 96, length, 16, groups=groups, dtype=dtype, device="cuda")
    results = []
    for smem in (True, False):
        assert ks._seq_config(96, groups or 1, window, 16, {"SMEM_ROWS": smem})["SMEM_ROWS"] is smem
        assert ks._bwd_seq_config(96, groups or 1, 16, window, {"SMEM_ROWS": smem})["SMEM_ROWS"] is smem
        tiles = {"seq": {"SMEM_ROWS": smem, "SEG": 7}, "bwd_seq": {"SMEM_ROWS": smem, "SEG": 5}}
        result, seen = _run_checked(args, tiles, monkeypatch, direction=direction, window=window)
        results.append(result)
        if smem:
            used = seen
    # the forward's tiles need 16-bit inputs for that layout; the backward's loads are 4-wide, any dtype (rows
    # not 16-element aligned may or may not get it: the check decides, and the outputs are compared either way)
    assert used["_fwd_seq_kernel"] and used["_bwd_seq_kernel"], used
    if length % 16 == 0 or dtype == torch.float32:
        assert all(ok is (dtype == torch.bfloat16) for ok in used["_fwd_seq_kernel"]), used
    if length % 16 == 0:
        assert all(used["_bwd_seq_kernel"]), used
    (out_smem, g_smem), (out_ld, g_ld) = results
    tol = {torch.float32: 1e-6, torch.bfloat16: 5e-3}
    assert _rel(out_smem, out_ld) < tol[dtype]
    for k in g_ld:
        assert _rel(g_smem[k], g_ld[k]) < tol[args[k].dtype], k


@pytest.mark.gpu
def test_gpu_batched_bf16_through_dispatch():
    from wsimamba.ops import selective_scan

    args = _inputs(4, 192, 3001, 16, groups=None, dtype=torch.bfloat16, device="cuda")
    ref_args = {k: (v.float() if v is not None else None) for k, v in args.items()}
    out_ref, g_ref = _run(selective_scan_reference, ref_args, _grad_like(args), delta_softplus=True,
                          direction="local_bidirectional", window=8)
    out, g = _run(selective_scan, args, _grad_like(args), delta_softplus=True, direction="local_bidirectional",
                  window=8, backend="triton")
    assert _rel(out, out_ref) < 2e-2
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 2e-2, k


@pytest.mark.gpu
@pytest.mark.parametrize("direction,window", [("forward", None), ("local_bidirectional", 16)])
def test_gpu_bf16_B_and_C_take_the_shared_memory_rows(direction, window, monkeypatch):
    # under autocast x_proj hands the scan bf16 B and C; their row copies are fp32 (`_transposed_rows`), so the
    # kernels stage them in shared memory as for fp32 B and C, and the results match the reference on the same values
    args = _inputs(1, 192, 3008, 16, dtype=torch.bfloat16, device="cuda")
    args["B"], args["C"] = args["B"].bfloat16(), args["C"].bfloat16()
    ref_args = {k: (v.float() if v is not None else None) for k, v in args.items()}
    out_ref, g_ref = _run(selective_scan_reference, ref_args, _grad_like(args), delta_softplus=True,
                          direction=direction, window=window)
    smem, fits = {}, ks._shuffles_fit

    def spy(kernel, a, consts, grid, layout):
        ok = fits(kernel, a, consts, grid, layout)
        smem[kernel.fn.__name__] = consts["SMEM_ROWS"] and ok
        return ok

    monkeypatch.setattr(ks, "_shuffles_fit", spy)
    out, g = _run(ks.selective_scan, args, _grad_like(args), delta_softplus=True, direction=direction, window=window)
    assert smem == {"_fwd_seq_kernel": True, "_bwd_seq_kernel": True}, smem
    assert _rel(out, out_ref) < 2e-2
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 2e-2, k
