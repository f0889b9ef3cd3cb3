"""Vision backbones (Vim, LBVim, VMamba, Res-VMamba): shapes, sizes, SS2D's cross-scan, LBVim's flips,
the scan backends, and the backbones as extraction encoders."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.vision import backbone_kwargs, create_backbone, list_backbones
from wsimamba.nn.ss2d import SS2D, cross_merge, cross_scan
from wsimamba.ops import selective_scan

NAMES = ("vim_tiny", "lbvim_tiny", "vmamba_tiny", "resvmamba_small")
TINY = {
    "vim_tiny": dict(img_size=32, patch_size=8, embed_dim=16, depth=3, d_state=4),
    "lbvim_tiny": dict(img_size=32, patch_size=8, embed_dim=16, depth=3, d_state=4),
    "vmamba_tiny": dict(dims=8, depths=(1, 1, 2, 1), d_state=2),
    "resvmamba_small": dict(dims=8, depths=(1, 1, 2, 1), d_state=2),
}
# full-size parameter counts with the 1000-class head: the papers' figures (Vim-Ti 7M, LBVim-Ti 6.4M,
# VMamba-T 30M) and Res-VMamba on the VMamba paper's VMamba-S (50M) plus its skips (49.4M here)
PAPER_PARAMS = {"vim_tiny": 7.0e6, "lbvim_tiny": 6.4e6, "vmamba_tiny": 30e6, "resvmamba_small": 49.4e6}


def tiny(name, **kw):
    return create_backbone(name, **{**TINY[name], "num_classes": 5, **kw})


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_every_backbone_and_rejects_unknown_keys():
    assert set(NAMES) <= set(list_backbones())
    for name in NAMES:
        assert {"num_classes", "backend", "img_size", "patch_size", "in_chans"} <= set(backbone_kwargs(name))
    with pytest.raises(ConfigError, match="model.depth does not apply to 'vmamba_tiny'"):
        create_backbone("vmamba_tiny", depth=3)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_square_and_non_square(name):
    torch.manual_seed(0)
    net = tiny(name).eval()
    r = net.reduction
    for h, w in ((32, 32), (2 * r if r > 8 else 48, r)):  # a non-square size, multiple of the reduction
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            logits, feats, maps = net(x), net.forward_features(x), net.forward_pyramid(x)
        assert logits.shape == (2, 5)
        assert feats.shape == (2, net.num_features)
        assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
        if name in ("vim_tiny", "lbvim_tiny"):
            assert [m.shape for m in maps] == [(2, 16, h // 8, w // 8)] * len(net.pyramid_layers)
            assert net.pyramid_layers == [1, 2, 3]  # quarters of depth 3
        else:
            assert [tuple(m.shape) for m in maps] == [(2, 8 * 2**i, h // (4 * 2**i), w // (4 * 2**i)) for i in range(4)]
    headless = tiny(name, num_classes=0).eval()
    with torch.no_grad():
        assert headless(x).shape == (2, headless.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_input_not_divisible_by_the_reduction_is_a_config_error(name):
    net = tiny(name)
    with pytest.raises(ConfigError, match=f"input size 36×32: .*reduction {net.reduction}"):
        net(torch.randn(1, 3, 36, 32))
    with pytest.raises(ConfigError, match="expected images"):
        net(torch.randn(1, 1, 32, 32))


def test_bad_sizes_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match="model.dims: expected 4 values"):
        create_backbone("vmamba_tiny", dims=(8, 16), depths=(1, 1, 1, 1))
    with pytest.raises(ConfigError, match="model.patch_size: VMamba's stem needs a power of two, got 3"):
        create_backbone("vmamba_tiny", patch_size=3)
    with pytest.raises(ConfigError, match="model.img_size: 30 is not a multiple of patch_size 8"):
        create_backbone("vim_tiny", img_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="model.depth: expected a positive int, got 0"):
        create_backbone("lbvim_tiny", depth=0)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_parameter_counts_match_the_papers(name):
    with torch.device("meta"):
        net = create_backbone(name)
        headless = create_backbone(name, num_classes=0)
    total = n_params(net)
    assert abs(total - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.05, total
    assert total - n_params(headless) == net.num_features * 1000 + 1000
    assert net.num_features == (192 if "vim" in name else 768)
    assert net.reduction == (16 if "vim" in name else 32)
    if name == "resvmamba_small":
        skips = n_params(net.skips)
        assert skips == 96 * 192 + 192 + 192 * 384 + 384 + 384 * 768 + 768
        assert abs(total - skips - 50e6) / 50e6 < 0.05  # the VMamba paper's VMamba-S


def test_every_parameter_gets_a_gradient():
    # an unused parameter would stall DDP and is dead weight; Res-VMamba's skips must train
    for name in NAMES:
        net = tiny(name)
        # 64 px: VMamba's last stage is then 2 × 2 (a 1-token scan has no gradient for A)
        net(torch.randn(2, 3, 64, 64)).square().mean().backward()
        unused = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not unused, (name, unused)


def test_backend_reaches_every_scan():
    for name in NAMES:
        net = tiny(name, backend="reference")
        scanners = [m for m in net.modules() if hasattr(m, "backend")]
        assert scanners and all(m.backend == "reference" for m in scanners), name


def test_resvmamba_skip_is_a_trained_layer_and_forward_is_deterministic():
    torch.manual_seed(0)
    net = tiny("resvmamba_small").eval()
    assert {f"skips.{i}.{k}" for i in range(3) for k in ("weight", "bias")} <= set(net.state_dict())
    assert [tuple(s.weight.shape) for s in net.skips] == [(16, 8, 1, 1), (32, 16, 1, 1), (64, 32, 1, 1)]
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        a, b = net(x), net(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # upstream's fresh random conv made these differ
        for s in net.skips:
            s.weight.zero_()
            s.bias.zero_()
        assert not torch.allclose(net(x), a)  # the skip contributes
        # with zero skips it is plain VMamba with the same weights
        plain = tiny("vmamba_tiny").eval()
        plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("skips.")})
        torch.testing.assert_close(plain(x), net(x))


# ---------------------------------------------------------------------------------------------
# SS2D


def test_cross_scan_orders_and_merge_round_trip(seed):
    b, c, h, w = 2, 3, 4, 6
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    xs = cross_scan(x)
    assert xs.shape == (b, 4, c, h * w)
    k = torch.arange(h * w)
    torch.testing.assert_close(xs[:, 0], x[:, :, k // w, k % w])  # row-major
    torch.testing.assert_close(xs[:, 1], x[:, :, k % h, k // h])  # column-major
    torch.testing.assert_close(xs[:, 2:], xs[:, :2].flip(-1))  # both reversed
    torch.testing.assert_close(cross_merge(xs, h, w), 4 * x, rtol=0, atol=0)
    # merge is scan's adjoint: <scan(x), y> = <x, merge(y)>
    y = torch.randn(b, 4, c, h * w, dtype=torch.float64)
    torch.testing.assert_close((xs * y).sum(), (x * cross_merge(y, h, w)).sum())


def test_ss2d_one_grouped_scan_equals_four_separate_scans(seed):
    m = SS2D(6, d_state=3, ssm_ratio=2.0, backend="reference")
    with torch.no_grad():
        for p in (m.A_logs, m.Ds, m.dt_projs_bias):
            p.add_(torch.randn_like(p) * 0.3)  # directions' parameters differ, so a mixed-up group shows
    x = torch.randn(2, m.d_inner, 3, 5)
    got = m.scan(x)
    di, n, r = m.d_inner, m.d_state, m.dt_rank
    xs, ys = cross_scan(x), []
    for k in range(4):
        dt, B, C = torch.einsum("bdl,cd->bcl", xs[:, k], m.x_proj_weight[k]).split([r, n, n], dim=1)
        ys.append(selective_scan(xs[:, k], torch.einsum("brl,dr->bdl", dt, m.dt_projs_weight[k]),
                                 -torch.exp(m.A_logs[k * di:(k + 1) * di]), B, C, m.Ds[k * di:(k + 1) * di],
                                 delta_bias=m.dt_projs_bias[k], delta_softplus=True, backend="reference"))
    torch.testing.assert_close(got, cross_merge(torch.stack(ys, 1), 3, 5), rtol=1e-5, atol=1e-5)


def test_ss2d_gate_and_sizes():
    assert n_params(SS2D(8, gate=True).in_proj) == 2 * n_params(SS2D(8, gate=False).in_proj)
    m = SS2D(8, gate=True)
    assert m(torch.randn(1, 2, 3, 8)).shape == (1, 2, 3, 8)
    with pytest.raises(ConfigError, match=r"SS2D input: expected \(batch, H, W, 8\)"):
        m(torch.randn(1, 8, 2, 3))


def test_ss2d_triton_matches_reference(seed):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest.py)
    m = SS2D(4, d_state=2, gate=True, backend="reference").to(dev)
    x = torch.randn(1, 3, 5, 4, device=dev, requires_grad=True)
    params = [x, *m.parameters()]
    ref = m(x)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    m.backend = "triton"
    out = m(x)
    g_tri = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["x", *dict(m.named_parameters())], g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# the flip schedule: what order does each layer see?


class _Marker(nn.Module):
    """Stands in for the patch embedding: token i (row-major) is (i + 1, 1, 1, …), which RMSNorm keeps
    recognisable as the ratio of its first two features."""

    def __init__(self, dim, patch):
        super().__init__()
        self.dim, self.patch = dim, patch

    def forward(self, x):
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        out = torch.ones(b, self.dim, gh, gw)
        out[:, 0] = torch.arange(1, gh * gw + 1, dtype=torch.float32).reshape(gh, gw)
        return out


class _Probe(nn.Module):
    """An identity mixer that records the token order it is given."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, hidden):
        self.seen.append((hidden[0, :, 0] / hidden[0, :, 1]).round().long() - 1)
        return hidden


def _probe(name, depth):
    net = tiny(name, depth=depth, embed_dim=4)
    seen = []
    net.patch_embed.proj = _Marker(4, 8)
    with torch.no_grad():
        net.pos_embed.zero_()
        if net.cls_token is not None:
            net.cls_token.copy_(torch.tensor([100.0, 1, 1, 1]))  # shows up as token 99
    for block in net.layers:
        block.mixer = _Probe(seen)
    return net, seen


def test_lbvim_flips_sequence_and_residual_after_every_layer():
    net, seen = _probe("lbvim_tiny", depth=5)
    with torch.no_grad():
        maps = net.forward_pyramid(torch.zeros(1, 3, 32, 16))  # 4 × 2 patches
    forward, backward = torch.arange(8), torch.arange(8).flip(0)
    # layer l sees the sequence reversed l times; with an identity mixer the residual carries the same
    # token as the hidden state only if it was flipped with it, else the ratios would mix tokens i and 7 − i
    assert [s.tolist() for s in seen] == [forward.tolist(), backward.tolist()] * 2 + [forward.tolist()]
    # every pyramid map is back in the input's order (taps after 1, 2, 4, 5 blocks: odd and even flips)
    assert net.pyramid_layers == [1, 2, 4, 5]
    for m in maps:
        assert ((m[0, 0] / m[0, 1]).round() - 1).flatten().tolist() == forward.tolist()


def test_vim_keeps_order_with_the_class_token_in_the_middle():
    net, seen = _probe("vim_tiny", depth=2)
    with torch.no_grad():
        maps = net.forward_pyramid(torch.zeros(1, 3, 16, 32))  # 2 × 4 patches
        feats = net.forward_features(torch.zeros(1, 3, 16, 32))
    expected = [0, 1, 2, 3, 99, 4, 5, 6, 7]
    assert [s.tolist() for s in seen[:2]] == [expected, expected]
    assert (feats[0, 0] / feats[0, 1]).round().item() == 100  # pooled by the class token
    assert ((maps[-1][0, 0] / maps[-1][0, 1]).round() - 1).flatten().tolist() == list(range(8))


def test_vim_position_embedding_interpolates_for_other_grids():
    net = tiny("vim_tiny")
    pe = net._pos_embed(4, 4)
    assert pe is net.pos_embed  # the trained grid uses the table as is
    other = net._pos_embed(6, 2)
    assert other.shape == (1, 6 * 2 + 1, 16)
    torch.testing.assert_close(other[:, 6], net.pos_embed[:, 8])  # the class token's entry moves to the middle


# ---------------------------------------------------------------------------------------------
# backbones as patch encoders


def test_registered_as_encoders_with_the_full_backbones():
    from wsimamba.features import encoders

    listed = encoders.list_encoders()
    for name in NAMES:
        assert name in listed
        with torch.device("meta"):
            model, dim, size, mean, std = encoders._REGISTRY[name]()
        assert isinstance(model.head, nn.Identity) and dim == model.num_features
        assert size == 224 and mean == encoders.IMAGENET_MEAN and std == encoders.IMAGENET_STD
        assert size % model.reduction == 0


@pytest.fixture
def tiny_lbvim_encoder(monkeypatch):
    """The `lbvim_tiny` encoder at test size (the full one runs ~2 s per 224-px patch on this CPU)."""
    from wsimamba.features import encoders

    def build():
        model = create_backbone("lbvim_tiny", **{**TINY["lbvim_tiny"], "num_classes": 0})
        return model, model.num_features, 32, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD

    monkeypatch.setitem(encoders._REGISTRY, "lbvim_tiny", build)
    return build


def test_extract_with_a_backbone_encoder_records_it(cohort, tmp_path, tiny_lbvim_encoder):
    from wsimamba.cli import main
    from wsimamba.features.encoders import create_encoder
    from wsimamba.features.store import read_features

    root, slides = cohort
    common = ["--target-mpp", "2.0", "--patch-size", "64", "--device", "cpu", "--batch-size", "16",
              "--workers", "0", "--no-qc"]
    out = tmp_path / "random"
    assert main(["extract", str(root / "slides"), "--out", str(out), "--encoder", "lbvim_tiny", "--random-init",
                 *common]) == 0
    s = slides[0]
    with h5py.File(out / f"{s.slide_id}.h5", "r") as f:
        assert f.attrs["encoder"] == "lbvim_tiny"
        assert f.attrs["encoder_weights_sha256"] == "random-init"
        feats = f["features"][:]
    assert feats.shape[1] == 16 and np.isfinite(feats).all() and feats.std(axis=0).mean() > 0

    # --weights: a state dict of the backbone (with a classifier head, which is ignored) loads and is recorded
    trained = create_backbone("lbvim_tiny", **{**TINY["lbvim_tiny"], "num_classes": 3})
    wfile = tmp_path / "lbvim.pt"
    torch.save(trained.state_dict(), wfile)
    enc = create_encoder("lbvim_tiny", weights=wfile)
    torch.testing.assert_close(enc.model.pos_embed, trained.pos_embed)
    out_w = tmp_path / "weights"
    (tmp_path / "one.txt").write_text(s.slide_id + "\n")
    assert main(["extract", str(root / "slides"), "--out", str(out_w), "--encoder", "lbvim_tiny", "--weights",
                 str(wfile), "--slide-list", str(tmp_path / "one.txt"), *common]) == 0
    feats_w, _, _, fattrs = read_features(out_w / f"{s.slide_id}.h5")
    assert fattrs["encoder"] == "lbvim_tiny" and fattrs["encoder_weights_sha256"] == enc.weights_sha256
    assert not np.allclose(feats_w, feats)  # other weights, other features
