"""Segmentation networks (LightM-UNet, MSVM-UNet, VM-UNet with the multi-head scan): shapes, sizes,
the MHS scan routes and route gate, parameter counts, and overfitting a few synthetic image/mask pairs."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.errors import ConfigError
from wsimamba.models.seg import create_segmenter, list_segmenters, segmenter_kwargs
from wsimamba.nn.mamba import Mamba
from wsimamba.nn.mhs import ROUTE_PAIRS, ROUTES, MultiHeadScan, RouteAttentionGate, route, route_inverse, routes_for
from wsimamba.nn.ss2d import SS2D

NAMES = ("lightm_unet", "msvm_unet", "mhs_vmunet")
# the settings handed to the training task (/tmp/handoff/seg_small.md): fast on CPU at 32×32 / 16³
TINY = {
    "lightm_unet": dict(channels=(8, 16, 32, 64), blocks=(1, 1, 1, 1), d_state=4),
    "msvm_unet": dict(dims=16, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1), d_state=2, patch_size=2,
                      mlp_ratio=2.0, decoder_mlp_ratio=2.0, drop_path_rate=0.0),
    "mhs_vmunet": dict(dims=16, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1), heads=4, d_state=4, patch_size=2,
                       drop_path_rate=0.0),
}
# the defaults' sizes stated in the docstrings, for 3 input channels and 2 classes
DEFAULT_PARAMS = {("lightm_unet", 2): 5_011_765, ("lightm_unet", 3): 5_015_851, ("msvm_unet", 2): 35_938_274,
                  ("mhs_vmunet", 2): 11_119_586}


def tiny(name, spatial_dims=2, **kw):
    return create_segmenter(name, 3, 2, spatial_dims=spatial_dims, **{**TINY[name], **kw})


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_the_three_and_rejects_foreign_keys():
    assert set(NAMES) <= set(list_segmenters())
    for name in NAMES:
        assert {"pad", "backend", "d_state"} <= set(segmenter_kwargs(name))
    with pytest.raises(ConfigError, match="model.heads does not apply to 'lightm_unet'"):
        create_segmenter("lightm_unet", 3, 2, heads=4)
    for name in ("msvm_unet", "mhs_vmunet"):
        with pytest.raises(ConfigError, match=f"{name} is a 2D network"):
            create_segmenter(name, 1, 2, spatial_dims=3)
    with pytest.raises(ConfigError, match="divisible by heads=3"):
        create_segmenter("mhs_vmunet", 3, 2, dims=16, heads=3)


@pytest.mark.parametrize("name", NAMES)
def test_2d_shapes_odd_sizes_and_padding(name):
    torch.manual_seed(0)
    net = tiny(name).eval()
    assert net.spatial_dims == 2 and net.reduction == (8 if name == "lightm_unet" else 16)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 48, 80))  # 3·16 × 5·16: non-square, odd multiples
    assert out.shape == (2, 2, 48, 80) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=r"input size 50×70: .* reduction"):
        net(torch.randn(1, 3, 50, 70))
    with pytest.raises(ConfigError, match=r"expected \(batch, 3, H, W\), got shape \(1, 1, 48, 48\)"):
        net(torch.randn(1, 1, 48, 48))
    padded = tiny(name, pad=True).eval()
    assert padded.reduction == 1
    with torch.no_grad():
        assert padded(torch.randn(1, 3, 50, 70)).shape == (1, 2, 50, 70)
        # an input already of a multiple size passes through unpadded: same result as without pad
        padded.load_state_dict(net.state_dict())
        x = torch.randn(1, 3, 32, 48)
        torch.testing.assert_close(padded(x), net(x))


def test_lightm_unet_3d_shapes():
    torch.manual_seed(0)
    net = tiny("lightm_unet", spatial_dims=3).eval()
    assert net.spatial_dims == 3 and net.reduction == 8
    with torch.no_grad():
        out = net(torch.randn(1, 3, 16, 24, 32))
        assert out.shape == (1, 2, 16, 24, 32) and torch.isfinite(out).all()
        with pytest.raises(ConfigError, match="input size 12×24×32"):
            net(torch.randn(1, 3, 12, 24, 32))
        assert tiny("lightm_unet", spatial_dims=3, pad=True)(torch.randn(1, 3, 12, 20, 9)).shape == (1, 2, 12, 20, 9)


@pytest.mark.parametrize("name,spatial_dims", sorted(DEFAULT_PARAMS))
def test_default_parameter_counts_match_docstrings(name, spatial_dims):
    with torch.device("meta"):
        net = create_segmenter(name, 3, 2, spatial_dims=spatial_dims)
    assert n_params(net) == DEFAULT_PARAMS[(name, spatial_dims)]
    doc = type(net).__module__
    text = __import__(doc, fromlist=["_"]).__doc__
    assert f"{DEFAULT_PARAMS[(name, spatial_dims)]:,}" in text


def test_lightm_unet_matches_the_released_size_not_the_papers():
    # the released code's layout is ~5M; the paper's ~1M needs smaller widths (module docstring)
    assert 4.9e6 < DEFAULT_PARAMS[("lightm_unet", 2)] < 5.1e6
    with torch.device("meta"):
        assert 1.2e6 < n_params(create_segmenter("lightm_unet", 3, 2, channels=(16, 32, 64, 128))) < 1.4e6


def test_backend_reaches_every_scan():
    for name in NAMES:
        net = tiny(name, backend="reference")
        scans = [m for m in net.modules() if isinstance(m, (Mamba, SS2D, MultiHeadScan))]
        assert scans and all(m.backend == "reference" for m in scans), name


# ---------------------------------------------------------------------------------------------- MHS

SIZES = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 4), (4, 3), (5, 6), (7, 7), (6, 11), (2, 13)]


@pytest.mark.parametrize("h,w", SIZES)
def test_routes_are_permutations_and_restore_inverts_them(h, w):
    for name in ROUTES:
        p = route(name, h, w)
        assert p.dtype == torch.long and p.shape == (h * w,)
        assert torch.equal(p.sort().values, torch.arange(h * w)), (name, h, w)
        inv = route_inverse(p)
        assert torch.equal(p[inv], torch.arange(h * w)) and torch.equal(inv[p], torch.arange(h * w))
        if name.startswith(("snake", "spiral", "zigzag")):
            # consecutive tokens are neighbours on the grid (diagonal ones for the zigzags)
            i, j = p // w, p % w
            step = torch.maximum((i[1:] - i[:-1]).abs(), (j[1:] - j[:-1]).abs())
            assert (step <= 1).all(), (name, h, w)
            if not name.startswith("zigzag"):
                assert ((i[1:] - i[:-1]).abs() + (j[1:] - j[:-1]).abs() == 1).all(), (name, h, w)
    x = torch.randn(2, 3, h * w)
    scan, restore = routes_for(list(ROUTE_PAIRS), h, w, x.device)
    assert scan.shape == restore.shape == (len(ROUTE_PAIRS), 4, h * w)
    for k in range(len(ROUTE_PAIRS)):
        for s in range(4):
            assert torch.equal(x[..., scan[k, s]][..., restore[k, s]], x)
        assert torch.equal(scan[k, 1], scan[k, 0].flip(0)) and torch.equal(scan[k, 3], scan[k, 2].flip(0))


def test_route_shapes_on_a_known_grid():
    # 3 × 4 grid, pixel index i·4 + j
    assert route("snake_rows", 3, 4).tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert route("snake_cols", 3, 4).tolist() == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]
    assert route("spiral_cw", 3, 4).tolist() == [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6]
    assert route("spiral_ccw", 3, 4).tolist() == [0, 4, 8, 9, 10, 11, 7, 3, 2, 1, 5, 6]
    assert route("zigzag_diag", 3, 4).tolist() == [0, 1, 4, 8, 5, 2, 3, 6, 9, 10, 7, 11]
    assert route("raster_cols", 3, 4).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    with pytest.raises(ConfigError, match="unknown scan route 'hilbert'"):
        route("hilbert", 3, 4)


def test_route_attention_gate_shape_and_behaviour():
    gate = RouteAttentionGate()
    ys = torch.randn(2, 3, 4, 5, 6)
    g = gate.gate(ys)
    assert g.shape == (2, 3, 1, 5, 6) and (g >= 0).all()
    assert gate(ys).shape == (2, 3, 5, 6)
    torch.testing.assert_close(gate(ys), ys.sum(2) * g.squeeze(2))
    same = torch.randn(2, 3, 1, 5, 6).expand(2, 3, 4, 5, 6)
    assert gate.gate(same).abs().max() == 0  # routes that agree close the gate
    assert (RouteAttentionGate(threshold=10.0).gate(ys) == 0).all()


def test_multi_head_scan_shapes_gradients_and_route_dependence():
    torch.manual_seed(0)
    mhs = MultiHeadScan(16, heads=4, d_state=4)
    assert mhs.routes == ["snake", "zigzag", "spiral", "raster"]
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    y = mhs(x)
    assert y.shape == (2, 5, 7, 16) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mhs.parameters())
    # the same weights scanning other routes give another function of the map
    other = MultiHeadScan(16, heads=4, d_state=4, routes=["raster"] * 4)
    other.load_state_dict(mhs.state_dict())
    assert not torch.allclose(other(x), y, atol=1e-4)
    with pytest.raises(ConfigError, match="routes"):
        MultiHeadScan(16, heads=2, routes=["snake", "peano"])


def test_routes_cached_under_inference_mode_still_serve_training():
    mhs = MultiHeadScan(8, heads=2, d_state=2, routes=["spiral", "zigzag"])
    x = torch.randn(1, 3, 17, 8)  # a size no other test uses, so the first use fills the cache here
    with torch.inference_mode():
        mhs(x)
    mhs(x).sum().backward()  # the cached indices are saved for backward: they must be normal tensors
    assert mhs.in_proj.weight.grad is not None


# ------------------------------------------------------------------------------------------ overfit


def blobs(n: int, size: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n RGB images (n, 3, *size) of two round blobs on a noisy background, masks (n, *size) int64."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")
    images, masks = [], []
    for _ in range(n):
        m = torch.zeros(size, dtype=torch.bool)
        for _ in range(2):
            centre = [torch.randint(s // 5, s - s // 5, (1,), generator=g).item() for s in size]
            radius = size[0] * (0.12 + 0.12 * torch.rand(1, generator=g).item())
            m |= sum((grid - c) ** 2 for grid, c in zip(grids, centre)) < radius**2
        texture = 0.3 * torch.randn((3, *size), generator=g)
        images.append(texture + torch.stack([m * 1.0, m * -0.6, m * 0.4]) + 0.2)
        masks.append(m.long())
    return torch.stack(images), torch.stack(masks)


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    inter = ((pred == 1) & (target == 1)).sum()
    return (2 * inter / ((pred == 1).sum() + (target == 1).sum())).item()


@pytest.mark.parametrize("name,spatial_dims", [("lightm_unet", 2), ("lightm_unet", 3), ("msvm_unet", 2),
                                               ("mhs_vmunet", 2)])
def test_overfits_a_handful_of_blob_images(name, spatial_dims):
    torch.manual_seed(0)
    x, y = blobs(4, (32, 32) if spatial_dims == 2 else (16, 16, 16))
    net = tiny(name, spatial_dims=spatial_dims)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2 if name == "lightm_unet" else 3e-3)
    start, scores = time.perf_counter(), []
    with torch.no_grad():
        scores.append(dice(net.eval()(x).argmax(1), y))
    for step in range(1, 121):
        net.train()
        logits = net(x)
        p = logits.softmax(1)[:, 1]
        loss = F.cross_entropy(logits, y) + 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            with torch.no_grad():
                scores.append(dice(net.eval()(x).argmax(1), y))
            if scores[-1] >= 0.9:
                break
    assert scores[0] < 0.9, scores  # the untrained net does not already pass
    assert scores[-1] >= 0.9, (name, scores, f"{time.perf_counter() - start:.1f}s")
