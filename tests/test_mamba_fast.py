"""The Mamba blocks' fast layers (impl="fast") against their reference layers: same parameters, same
function, forward and every parameter gradient (wsimamba/nn/mamba.py, module docstring).

On CPU the fast layers run with the reference convolution and scan, so these tests check the layout
work (batched products into channel-first rows, the fused convolution's contract, views passed to the
scan); the `gpu` tests run the Triton convolution and scan at a bag's length.
"""

from __future__ import annotations

import pytest
import torch

import wsimamba.nn as wnn
from wsimamba.models.mil import create_model
from wsimamba.ops.selective_scan import ScanArgumentError

CUDA = torch.cuda.is_available()


def _pair(make, seed):
    """The same block twice, reference and fast layers, with equal parameters (made from `seed`)."""
    torch.manual_seed(seed)
    ref = make("reference")
    fast = make("fast")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(module, x, seed):
    """Output and every parameter's gradient for the loss ⟨out, r⟩ with r random from `seed`."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out = out.logits if hasattr(out, "logits") else out
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    (out.float() * r.float()).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def _rel(a, b):
    """Largest error relative to the largest reference value."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _rel_norm(a, b):
    """‖a − b‖ / ‖b‖: for bf16, where single elements carry rounding of 2⁻⁸ of their own size."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _compare(ref, fast, x, seed, tol):
    out_r, dx_r, g_r = _run(ref, x, seed)
    out_f, dx_f, g_f = _run(fast, x, seed)
    assert out_f.dtype == out_r.dtype and out_f.shape == out_r.shape
    assert _rel(out_f, out_r) < tol, f"output: relative error {_rel(out_f, out_r):.2e}"
    assert _rel(dx_f, dx_r) < tol, f"input gradient: relative error {_rel(dx_f, dx_r):.2e}"
    assert g_f.keys() == g_r.keys() and len(g_r) > 5
    for name in g_r:
        if g_r[name].abs().max() < 1e-6:  # zero up to rounding (an attention-logit bias under softmax)
            assert g_f[name].abs().max() < 1e-6, name
            continue
        assert _rel(g_f[name], g_r[name]) < tol, f"{name}: relative error {_rel(g_f[name], g_r[name]):.2e}"


BLOCKS = {
    "mamba": lambda impl: wnn.Mamba(12, d_state=4, impl=impl, bias=True),
    "mamba-reverse": lambda impl: wnn.Mamba(12, d_state=4, direction="reverse", impl=impl),
    "lbmamba": lambda impl: wnn.LBMamba(12, d_state=4, d_conv=3, window=4, impl=impl),
    "bimamba": lambda impl: wnn.BiMamba(12, d_state=4, impl=impl),
    "srmamba": lambda impl: wnn.SRMamba(12, d_state=4, rate=3, impl=impl),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fast_layers_match_the_reference_layers(name, seed):
    """fp32: output, input gradient and every parameter gradient within 1e-4 relative, batch 2 of an odd
    length (so the SRMamba reordering pads and the LB windows end mid-block)."""
    ref, fast = _pair(BLOCKS[name], seed)
    x = torch.randn(2, 37, 12, generator=torch.Generator().manual_seed(seed))
    _compare(ref, fast, x, seed, 1e-4)


def test_the_fast_path_is_what_runs(monkeypatch, seed):
    """impl="fast" goes through the fused convolution op (a reference block never calls it), and "auto"
    keeps the reference layers on CPU tensors."""
    import wsimamba.nn.mamba as mamba

    calls = []
    real = mamba.causal_conv1d

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mamba, "causal_conv1d", spy)
    x = torch.randn(1, 9, 8)
    wnn.Mamba(8, d_state=4, impl="reference")(x)
    wnn.Mamba(8, d_state=4)(x)  # auto, on CPU
    assert calls == []
    wnn.SRMamba(8, d_state=4, rate=2, impl="fast")(x)
    # the forward branch, then the reordered one: x itself (the convolution reorders it, padded to 10, inside)
    assert calls == [(1, 16, 9), (1, 16, 9)]


def test_a_mil_model_with_fast_layers_matches_and_a_bad_impl_is_named(seed):
    def make(impl):
        return create_model("lbmambamil", 16, 2, d_model=8, d_state=4, layers=2, dropout=0.0, impl=impl)

    ref, fast = _pair(make, seed)
    x = torch.randn(1, 29, 16, generator=torch.Generator().manual_seed(seed))
    _compare(ref.eval(), fast.eval(), x, seed, 1e-4)
    with pytest.raises(ScanArgumentError, match="impl: expected one of auto, fast, reference, got 'fused'"):
        wnn.Mamba(8, impl="fused")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", ["lbmamba", "srmamba", "bimamba"])
def test_fast_layers_on_the_gpu_match_at_a_bags_length(name, seed):
    """CUDA, Triton convolution and scan in both; a 10,003-patch bag at the papers' width (d_model 512, so
    d_inner 1024); fp32 within 1e-4 relative. Under bf16 autocast the fast layers are within 1e-2 of the fp32
    reference (norm-relative), or no further from it than 1.5 times the reference layers' own bf16 run: two bf16
    runs each carry their own rounding (a seed put them 1.03e-2 apart in dt_proj_b's gradient, each within
    rounding of fp32)."""
    makers = {
        "lbmamba": lambda impl: wnn.LBMamba(512, impl=impl),
        "srmamba": lambda impl: wnn.SRMamba(512, impl=impl),
        "bimamba": lambda impl: wnn.BiMamba(512, impl=impl),
    }
    ref, fast = _pair(makers[name], seed)
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(1, 10_003, 512, generator=torch.Generator().manual_seed(seed)).cuda()
    _compare(ref, fast, x, seed, 1e-4)
    out_32, dx_32, g_32 = _run(ref, x, seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_r, dx_r, g_r = _run(ref, x, seed)
        out_f, dx_f, g_f = _run(fast, x, seed)
    assert out_f.dtype == out_r.dtype == torch.bfloat16
    pairs = [("output", out_f, out_r, out_32), ("input gradient", dx_f, dx_r, dx_32)]
    pairs += [(n, g_f[n], g_r[n], g_32[n]) for n in g_32]
    for what, fast_bf16, ref_bf16, truth in pairs:
        err, ref_err = _rel_norm(fast_bf16, truth), _rel_norm(ref_bf16, truth)
        assert err < max(1e-2, 1.5 * ref_err), f"{what}: bf16 error {err:.2e} against the reference layers' {ref_err:.2e}"


@pytest.mark.parametrize("name", ["lbmambamil", "mambamil"])
def test_training_curves_match_the_reference_layers(name, seed):
    """Eight planted-witness bags of odd lengths, four epochs of AdamW, one bag per step as MILModule
    trains: the fast layers' loss curve is the reference layers' to rounding, and both learn."""
    from wsimamba.data.synthetic import witness_bags

    data = witness_bags(8, dim=16, instances=(21, 47), seed=seed % 1000)
    bags = [(torch.from_numpy(x)[None], torch.tensor([int(y)])) for x, y in zip(data.bags, data.labels)]
    curves = {}
    for impl in ("reference", "fast"):
        torch.manual_seed(seed)
        model = create_model(name, 16, 2, d_model=16, d_state=4, dropout=0.0, impl=impl)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(4):
            total = 0.0
            for x, y in bags:
                loss = torch.nn.functional.cross_entropy(model(x).logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item()
            losses.append(total / len(bags))
        curves[impl] = torch.tensor(losses)
    assert torch.allclose(curves["fast"], curves["reference"], rtol=1e-4, atol=1e-6), curves
    assert curves["fast"][-1] < curves["fast"][0], curves


def test_the_config_key_reaches_the_model_and_a_bad_value_is_named():
    from pydantic import ValidationError

    from wsimamba.config import TrainModelConfig
    from wsimamba.errors import ConfigError

    cfg = TrainModelConfig(name="lbmambamil", d_model=8, d_state=4, impl="reference")
    model = create_model(cfg.name, 16, 2, **cfg.kwargs())
    assert {m.impl for m in model.modules() if isinstance(m, wnn.Mamba)} == {"reference"}
    with pytest.raises(ValidationError, match="impl"):
        TrainModelConfig(name="lbmambamil", impl="fused")
    with pytest.raises(ConfigError, match="model.impl does not apply to 'abmil'"):
        create_model("abmil", 16, 2, **TrainModelConfig(name="abmil", impl="fast").kwargs())
