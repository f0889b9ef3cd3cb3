"""Bags padded at their ends (``pad=`` on the Mamba blocks, ``lengths=`` on the MIL models) against the
same bags run one by one: outputs at real tokens, input gradients and every parameter gradient
(wsimamba/nn/padding.py). The padding holds large random values, so any leak shows."""

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
    g = torch.Generator().manual_seed(seed + 1)
    r = [torch.randn(n, 12, generator=g, dtype=torch.float64) for n in lengths]

    out = block(x, pad=wnn.PaddedBags(torch.tensor(lengths), 21))
    assert out.shape == x.shape and torch.isfinite(out).all()
    sum((out[i, :n] * r[i]).sum() for i, n in enumerate(lengths)).backward()
    padded_grads = _grads(block)
    block.zero_grad(set_to_none=True)

    total = 0
    for i, bag in enumerate(bags):
        xi = bag.double()[None].requires_grad_(True)
        alone = block(xi)
        _close(out[i, : lengths[i]].detach(), alone[0].detach(), f"bag {i} output")
        total = total + (alone[0] * r[i]).sum()
        (alone[0] * r[i]).sum().backward()
        _close(x.grad[i, : lengths[i]], xi.grad[0], f"bag {i} input gradient")
        assert (x.grad[i, lengths[i]:] == 0).all(), f"bag {i}: the padding got a gradient"
    alone_grads = _grads(block)
    assert padded_grads.keys() == alone_grads.keys() and len(alone_grads) > 5
    for key in alone_grads:
        _close(padded_grads[key], alone_grads[key], key)


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
    out.logits.sum().backward()
    padded_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    for i, bag in enumerate(bags):
        alone = model(bag.double()[None])
        _close(out.logits[i].detach(), alone.logits[0].detach(), f"bag {i} logits")
        _close(out.attention[i, : lengths[i]].detach(), alone.attention[0].detach(), f"bag {i} attention")
        assert (out.attention[i, lengths[i]:] == 0).all()
        alone.logits.sum().backward()
    alone_grads = _grads(model)
    for key in alone_grads:
        _close(padded_grads[key], alone_grads[key], key)


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
