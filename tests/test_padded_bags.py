"""Bags padded at their ends (``pad=`` on the Mamba blocks, ``lengths=`` on the MIL models) and bags packed
into one sequence (``pad=PackedBags``, ``forward_bags``) against the same bags run one by one: outputs at
real tokens, input gradients and every parameter gradient (wsimamba/nn/padding.py). The padding holds
large random values, so any leak shows."""

from __future__ import annotations

import pytest
import torch

import wsimamba.nn as wnn
from wsimamba.errors import WsimambaError
from wsimamba.models.mil import create_model

BLOCKS = {
    "mamba": lambda impl: wnn.Mamba(12, d_state=4, impl=impl, bias=True),
    "mamba-reverse": lambda impl: wnn.Mamba(12, d_state=4, direction="reverse", impl=impl),
    "mamba-bidirectional": lambda impl: wnn.Mamba(12, d_state=4, direction="bidirectional", impl=impl),
    "lbmamba": lambda impl: wnn.LBMamba(12, d_state=4, d_conv=3, window=4, impl=impl),
    "bimamba": lambda impl: wnn.BiMamba(12, d_state=4, impl=impl),
    "srmamba": lambda impl: wnn.SRMamba(12, d_state=4, rate=3, impl=impl),
    "lb-alternating": lambda impl: wnn.AlternatingFlip(
        [wnn.LBMamba(12, d_state=4, window=4, impl=impl) for _ in range(3)], restore_order=True),
}


def _bags(seed, lengths, dim, total):
    g = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, dim, generator=g) for n in lengths]
    x = 30 * torch.randn(len(bags), total, dim, generator=g)  # the padding: large, so a leak cannot hide
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
    return bags, x


def _grads(module):
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _close(a, b, what, tol=1e-5):
    if b.abs().max() < 1e-6:  # zero up to rounding (the attention-logit bias under the fp32 softmax)
        assert a.abs().max() < 1e-6, what
        return
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def _block_matches_bags_alone(block, x, out, bags, places, seed):
    """out = block(x, pad=…), bag i's tokens at x[row, start : start + len] for places[i] = (row, start): each
    bag's output, its input gradient (0 at every other position) and every parameter gradient, under random
    output weights, as when the bag runs alone."""
    g = torch.Generator().manual_seed(seed + 1)
    r = [torch.randn(len(bag), x.shape[-1], generator=g, dtype=torch.float64) for bag in bags]
    assert out.shape == x.shape and torch.isfinite(out).all()
    sum((out[row, s:s + len(bag)] * r[i]).sum() for i, (bag, (row, s)) in enumerate(zip(bags, places))).backward()
    batch_grads = _grads(block)
    block.zero_grad(set_to_none=True)
    real = torch.zeros(x.shape[:2], dtype=torch.bool)
    for bag, (row, s) in zip(bags, places):
        real[row, s:s + len(bag)] = True
    assert (x.grad[~real] == 0).all(), "the padding got a gradient"
    for i, (bag, (row, s)) in enumerate(zip(bags, places)):
        xi = bag[None].requires_grad_(True)
        alone = block(xi)
        _close(out[row, s:s + len(bag)].detach(), alone[0].detach(), f"bag {i} output")
        (alone[0] * r[i]).sum().backward()
        _close(x.grad[row, s:s + len(bag)], xi.grad[0], f"bag {i} input gradient")
    alone_grads = _grads(block)
    assert batch_grads.keys() == alone_grads.keys() and len(alone_grads) > 5
    for key in alone_grads:
        _close(batch_grads[key], alone_grads[key], key)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_a_padded_batch_matches_its_bags_run_alone(name, impl, seed):
    """Odd lengths (windows and SRMamba's reordering end mid-way), one bag filling the whole length;
    forward at real tokens, input gradient (0 at padding) and every parameter gradient, fp64."""
    torch.manual_seed(seed)
    block = BLOCKS[name](impl).double()
    lengths = [13, 5, 21, 1]
    bags, x = _bags(seed, lengths, 12, 21)
    x = x.double().requires_grad_(True)
    out = block(x, pad=wnn.PaddedBags(torch.tensor(lengths), 21))
    _block_matches_bags_alone(block, x, out, [b.double() for b in bags], [(i, 0) for i in range(len(bags))], seed)


def test_without_the_padding_masks_the_padding_leaks(seed):
    """The check above can fail: a whole-row flip or an unmasked Δ lets the padding reach real tokens."""
    torch.manual_seed(seed)
    block = wnn.LBMamba(12, d_state=4, window=4, impl="reference").double()
    bags, x = _bags(seed, [5, 9], 12, 9)
    x = x.double()
    pad = wnn.PaddedBags(torch.tensor([5, 9]), 9)
    alone = block(bags[0].double()[None])[0]
    assert torch.allclose(block(x, pad=pad)[0, :5], alone)
    pad.mask_delta = lambda dt: dt  # the padding's scan steps are no longer the identity
    assert not torch.allclose(block(x, pad=pad)[0, :5], alone)
    flip = wnn.AlternatingFlip([wnn.Mamba(12, d_state=4, direction="forward").double() for _ in range(2)])
    lone = flip(bags[0].double()[None])[0]
    assert torch.allclose(flip(x, pad=wnn.PaddedBags(torch.tensor([5, 9]), 9))[0, :5], lone)
    assert not torch.allclose(flip(x)[0, :5], lone)  # whole rows flipped: the padding comes first in layer 2


def _matches_bags_alone(model, out, bags):
    """`out` (a batch's MILOutput): each bag's logits and attention (0 past its end), and the gradients of the
    summed logits, as when each bag runs alone."""
    out.logits.sum().backward()
    batch_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    for i, bag in enumerate(bags):
        alone = model(bag[None])
        _close(out.logits[i].detach(), alone.logits[0].detach(), f"bag {i} logits")
        _close(out.attention[i, : len(bag)].detach(), alone.attention[0].detach(), f"bag {i} attention")
        assert (out.attention[i, len(bag):] == 0).all()
        alone.logits.sum().backward()
    alone_grads = _grads(model)
    for key in alone_grads:
        _close(batch_grads[key], alone_grads[key], key)


@pytest.mark.parametrize("name,kwargs", [
    ("lbmambamil", {"window": 4}), ("mambamil", {"rate": 4}), ("bimambamil", {}),
    ("abmil", {}), ("meanpool", {}), ("maxpool", {}),
])
def test_mil_models_give_each_padded_bag_its_own_logits_and_gradients(name, kwargs, seed):
    """Logits, attention (0 at padding) and parameter gradients of a padded batch equal the bags' own."""
    torch.manual_seed(seed)
    extra = {"d_state": 4, "layers": 3} if "mamba" in name else {}
    model = create_model(name, 8, 3, d_model=16, dropout=0.0, **extra, **kwargs).double().eval()
    lengths = [7, 19, 2]
    bags, x = _bags(seed, lengths, 8, 19)
    out = model(x.double(), torch.tensor(lengths))
    assert out.logits.shape == (3, 3) and out.attention.shape == (3, 19)
    _matches_bags_alone(model, out, [b.double() for b in bags])


def test_lengths_are_checked_and_models_without_padding_refuse_them():
    x = torch.randn(2, 6, 8)
    with pytest.raises(WsimambaError, match=r"lengths: TransMIL does not take padded bags"):
        create_model("transmil", 8, 2, d_model=16)(x, torch.tensor([3, 6]))
    with pytest.raises(WsimambaError, match=r"lengths: expected an integer tensor of shape \(2,\), got \(3,\)"):
        create_model("abmil", 8, 2, d_model=16)(x, torch.tensor([3, 6, 1]))
    with pytest.raises(WsimambaError, match=r"lengths: expected an integer tensor"):
        create_model("abmil", 8, 2, d_model=16)(x, torch.tensor([3.0, 6.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["lbmambamil", "mambamil", "bimambamil"])
def test_padded_bags_on_the_gpu_match_their_lone_runs(name, seed):
    """CUDA, fast layers (Triton convolution and scan), fp32: two bags of 3,001 and 4,999 patches padded to
    5,120 give their lone logits and gradients within 1e-4."""
    torch.manual_seed(seed)
    model = create_model(name, 64, 2, d_model=128, dropout=0.0).cuda().eval()
    lengths = [3001, 4999]
    bags, x = _bags(seed, lengths, 64, 5120)
    out = model(x.cuda(), torch.tensor(lengths, device="cuda"))
    out.logits.sum().backward()
    padded_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    for i, bag in enumerate(bags):
        alone = model(bag.cuda()[None])
        _close(out.logits[i].detach(), alone.logits[0].detach(), f"bag {i} logits", 1e-4)
        alone.logits.sum().backward()
    for key, grad in _grads(model).items():
        _close(padded_grads[key], grad, key, 1e-4)


# ---- packed bags: several bags in one sequence, each in a slot aligned to `align`


def _packed(seed, lengths, dim, align):
    """The bags, and the packed sequence (1, length, dim) with large random values in the slots' padding."""
    g = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in lengths]
    x, pack = wnn.PackedBags.pack(bags, align)
    noise = 30 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return bags, torch.where(pack.valid[..., None], x, noise), pack


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_packed_bags_match_their_bags_run_alone(name, impl, seed):
    """Five bags of odd lengths (one of a single token) in slots aligned to the window: each bag's output,
    input gradient (0 at padding) and every parameter gradient as when it runs alone, fp64."""
    torch.manual_seed(seed)
    block = BLOCKS[name](impl).double()
    lengths = [13, 5, 21, 1, 8]
    bags, x, pack = _packed(seed, lengths, 12, 4)
    assert pack.starts == [0, 16, 24, 48, 52] and x.shape[1] == 60
    x.requires_grad_(True)
    out = block(x, pad=pack)
    _block_matches_bags_alone(block, x, out, bags, [(0, s) for s in pack.starts], seed)


def test_without_the_slot_ids_packed_bags_leak(seed):
    """The check above can fail: without seq_idx the convolution and the scan carry one bag into the next."""
    torch.manual_seed(seed)
    block = wnn.Mamba(12, d_state=4, impl="reference").double()
    bags, x, pack = _packed(seed, [6, 7], 12, 1)
    alone = block(bags[1][None])[0]
    assert torch.allclose(block(x, pad=pack)[0, 6:], alone)
    pack.seq_idx = None
    assert not torch.allclose(block(x, pad=pack)[0, 6:], alone)


@pytest.mark.parametrize("name,kwargs", [
    ("lbmambamil", {}), ("lbmambamil", {"window": 8}), ("mambamil", {"rate": 4}), ("bimambamil", {}),
    ("abmil", {}), ("meanpool", {}), ("maxpool", {}),
])
def test_mil_models_give_each_packed_bag_its_own_logits_and_gradients(name, kwargs, seed):
    """forward_bags: logits, attention (0 past each bag's end) and parameter gradients equal the bags' own.
    Lengths span LBMamba's three window classes (≤ 128, ≤ 256, longer), so its rule packs them apart."""
    torch.manual_seed(seed)
    extra = {"d_state": 4, "layers": 3} if "mamba" in name else {}
    model = create_model(name, 8, 3, d_model=16, dropout=0.0, **extra, **kwargs).double().eval()
    assert model.takes_packs
    lengths = [130, 7, 300, 1, 257, 90]
    g = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in lengths]
    out = model.forward_bags(bags)
    assert out.logits.shape == (6, 3) and out.attention.shape == (6, 300)
    _matches_bags_alone(model, out, bags)


def test_lbmamba_packs_by_window_class_and_models_without_packing_run_bags_one_by_one():
    model = create_model("lbmambamil", 8, 2, d_model=16, d_state=4)
    assert model.pack_groups([300, 7, 200, 129, 500, 128]) == [([0, 4], 16), ([1, 5], 4), ([2, 3], 8)]
    assert create_model("lbmambamil", 8, 2, d_model=16, window=32).pack_groups([7, 300]) == [([0, 1], 32)]
    assert create_model("mambamil", 8, 2, d_model=16).pack_groups([7, 300]) == [([0, 1], 1)]
    transmil = create_model("transmil", 8, 2, d_model=16, dropout=0.0).eval()
    assert not transmil.takes_packs
    bags = [torch.randn(n, 8) for n in (5, 11)]
    out = transmil.forward_bags(bags)
    for i, bag in enumerate(bags):
        alone = transmil(bag[None])
        assert torch.allclose(out.logits[i], alone.logits[0], atol=1e-6)
        assert torch.allclose(out.attention[i, : len(bag)], alone.attention[0], atol=1e-6)
    with pytest.raises(WsimambaError, match=r"bag 1: expected shape \(instances >= 1, 8\), got \(4, 6\)"):
        transmil.forward_bags([torch.randn(3, 8), torch.randn(4, 6)])
    with pytest.raises(WsimambaError, match=r"bags: expected a non-empty list"):
        transmil.forward_bags([])


def test_packed_layouts_and_their_errors():
    pack = wnn.PackedBags([5, 16, 1], align=8)
    assert pack.starts == [0, 8, 24] and pack.length == 25
    assert pack.seq_idx.tolist() == [[0] * 8 + [1] * 16 + [2]]
    assert pack.valid[0].tolist() == [True] * 5 + [False] * 3 + [True] * 17
    assert pack.lb_window(None) == 4 and pack.lb_window(8) == 8
    with pytest.raises(WsimambaError, match=r"window 16: the packed slots start at multiples of 8, not of the "
                                            r"window; pack with align=16"):
        pack.lb_window(16)
    with pytest.raises(WsimambaError, match=r"window=None: these packed bags \(5 to 300 tokens\) fall in different "
                                            r"LBMamba window classes \[4, 16\]"):
        wnn.PackedBags([5, 300], align=16).lb_window(None)
    with pytest.raises(WsimambaError, match=r"sizes: expected one or more bags of at least 1 token, got \[3, 0\]"):
        wnn.PackedBags([3, 0])
    with pytest.raises(WsimambaError, match=r"align: expected a positive int, got 0"):
        wnn.PackedBags([3], align=0)
    with pytest.raises(WsimambaError, match=r"bag 1: expected shape \(instances >= 1, 4\), got \(2, 5\)"):
        wnn.PackedBags.pack([torch.zeros(3, 4), torch.zeros(2, 5)])
    # a block refuses a pack whose slots do not fit its window
    block = wnn.LBMamba(4, d_state=2, window=8, impl="reference")
    x, pack = wnn.PackedBags.pack([torch.randn(3, 4), torch.randn(3, 4)], align=4)
    with pytest.raises(WsimambaError, match=r"window 8: the packed slots start at multiples of 4"):
        block(x, pad=pack)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["lbmambamil", "mambamil", "bimambamil"])
def test_packed_bags_on_the_gpu_match_their_lone_runs(name, seed):
    """CUDA, fast layers (Triton convolution and scan with seq_idx), fp32: bags of 3,001, 4,999 and 700
    patches packed into one sequence give their lone logits, attention and gradients within 1e-4."""
    torch.manual_seed(seed)
    model = create_model(name, 64, 2, d_model=128, dropout=0.0).cuda().eval()
    g = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, 64, generator=g).cuda() for n in (3001, 4999, 700)]
    out = model.forward_bags(bags)
    out.logits.sum().backward()
    packed_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    for i, bag in enumerate(bags):
        alone = model(bag[None])
        _close(out.logits[i].detach(), alone.logits[0].detach(), f"bag {i} logits", 1e-4)
        _close(out.attention[i, : len(bag)].detach(), alone.attention[0].detach(), f"bag {i} attention", 1e-4)
        alone.logits.sum().backward()
    for key, grad in _grads(model).items():
        _close(packed_grads[key], grad, key, 1e-4)
