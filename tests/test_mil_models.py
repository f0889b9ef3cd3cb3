"""MIL aggregators: the registry, shapes, Nyström attention against exact attention, and learning.

Learning tests train each model with a plain loop on equal-length bags batched together (fast on
CPU); the Lightning path is covered by test_train.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from wsimamba.data.synthetic import order_bags, witness_bags
from wsimamba.errors import ConfigError, WsimambaError
from wsimamba.models.mil import create_model, list_models
from wsimamba.models.mil.transmil import iterative_pinv, nystrom_attention, segment_means, softmax_attention

ALL = ["meanpool", "maxpool", "abmil", "transmil", "mambamil", "bimambamil", "lbmambamil"]
ATTENTION_POOLING = ["abmil", "mambamil", "bimambamil", "lbmambamil"]
# small but not degenerate: d_state 4 and expand 1 keep the reference scan cheap on CPU
TINY = {"meanpool": {}, "maxpool": {}, "abmil": {}, "transmil": {"heads": 4, "landmarks": 32},
        "mambamil": {"d_state": 4, "expand": 1, "rate": 5}, "bimambamil": {"d_state": 4, "expand": 1},
        "lbmambamil": {"d_state": 4, "expand": 1}}


def tiny(name: str, in_dim: int, n_classes: int = 2, d_model: int = 32, **kw):
    return create_model(name, in_dim, n_classes, d_model=d_model, **{**TINY[name], **kw})


def test_registry_lists_every_model_and_rejects_unknown():
    assert list(list_models()) == ALL
    with pytest.raises(ConfigError, match="unknown MIL model 'nope'.*abmil"):
        create_model("nope", 8, 2)
    with pytest.raises(ConfigError, match=r"model.rate does not apply to 'abmil' \(it takes: d_model"):
        create_model("abmil", 8, 2, rate=3)
    with pytest.raises(ConfigError, match="n_classes must be >= 2"):
        create_model("abmil", 8, 1)


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_attention(name, one_thread):
    torch.manual_seed(0)
    model = tiny(name, 12, n_classes=3).eval()
    for n in (1, 7, 40):
        x = torch.randn(2, n, 12)
        out = model(x)
        assert out.logits.shape == (2, 3) and out.attention.shape == (2, n)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.attention).all()
        if name in ATTENTION_POOLING:
            torch.testing.assert_close(out.attention.sum(1), torch.ones(2))
        # bags of a batch are independent
        torch.testing.assert_close(model(x[1:]).logits, out.logits[1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(WsimambaError, match=r"expected bags of shape \(batch, instances >= 1, 12\)"):
        model(torch.randn(2, 5, 11))
    # gradients reach the first layer
    model.train()
    model(torch.randn(1, 9, 12)).logits.sum().backward()
    first = next(p for p in model.parameters() if p.dim() == 2)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_nystrom_with_one_landmark_per_token_is_exact_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 24, 8, dtype=torch.float64).unbind(0)
    ref, probs = softmax_attention(q, k, v)
    out, rows = nystrom_attention(q, k, v, landmarks=24, pinv_iters=0, query_rows=slice(0, 1))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rows[:, :, 0], probs[:, :, 0])
    # the iterative pseudo-inverse (the fast path) converges to the SVD one
    a = torch.softmax(torch.randn(3, 16, 16, dtype=torch.float64), -1)
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), rtol=1e-6, atol=1e-8)
    out6, _ = nystrom_attention(q, k, v, landmarks=24, pinv_iters=30)
    torch.testing.assert_close(out6, ref, rtol=1e-5, atol=1e-7)


def test_segment_means_cover_every_token_once():
    x = torch.arange(10, dtype=torch.float64).reshape(1, 1, 10, 1)
    means = segment_means(x, 4)  # segments of 3, 2, 3, 2 tokens (floor(i·4/10))
    seg = (torch.arange(10) * 4) // 10
    expect = torch.stack([x[0, 0, seg == s, 0].mean() for s in range(4)])
    torch.testing.assert_close(means.flatten(), expect)


def test_transmil_attention_folds_repeated_tokens_back():
    torch.manual_seed(0)
    model = tiny("transmil", 6, landmarks=4).eval()  # 10 patches → 16 tokens (6 repeated), Nyström path
    x = torch.randn(1, 10, 6)
    out = model(x)
    h = model.embed(x)
    side = 4
    src = torch.arange(16) % 10
    seq = torch.cat([model.cls_token, h[:, src]], 1)
    seq, _ = model.layer1(seq)
    seq = model.ppeg(seq, side)
    _, cls_attn = model.layer2.attn(model.layer2.norm(seq))
    expect = torch.zeros(10).index_add(0, src, cls_attn[0, 1:])
    torch.testing.assert_close(out.attention[0], expect)
    assert expect[:6].gt(0).all() and torch.allclose(out.attention.sum(), cls_attn[0, 1:].sum())


def test_bf16_autocast_runs(one_thread):
    for name in ("abmil", "transmil", "lbmambamil"):
        model = tiny(name, 8, landmarks=4) if name == "transmil" else tiny(name, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(1, 30, 8))
        assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.attention.float()).all()


def _fit(model, x, y, epochs: int, lr: float, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i: i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def witness_data():
    """256 bags of 200 instances (32-d): 3-6 % witnesses from N(5u, I) in positives. 192 train, 64 test."""
    d = witness_bags(256, dim=32, instances=(200, 200), witness_fraction=(0.03, 0.06), shift=5.0, seed=1)
    x, y = torch.from_numpy(np.stack(d.bags)), torch.from_numpy(d.labels)
    return x[:192], y[:192], x[192:], y[192:], np.stack(d.witness[192:])


# epochs and learning rates per model (TransMIL needs a gentler schedule to stop memorising bags)
SCHEDULE = {"meanpool": (15, 1e-3), "maxpool": (30, 1e-3), "abmil": (10, 1e-3), "transmil": (9, 5e-4),
            "mambamil": (5, 1e-3), "bimambamil": (5, 1e-3), "lbmambamil": (6, 1e-3)}


@pytest.mark.parametrize("name", ALL)
def test_every_aggregator_learns_planted_witnesses(name, witness_data, one_thread):
    xtr, ytr, xte, yte, witness = witness_data
    torch.manual_seed(0)
    kw = {"dropout": 0.1} if name == "transmil" else {}
    epochs, lr = SCHEDULE[name]
    model = _fit(tiny(name, 32, **kw), xtr, ytr, epochs, lr, batch=8)
    with torch.no_grad():
        out = model(xte)
    auc = roc_auc_score(yte.numpy(), torch.softmax(out.logits, -1)[:, 1].numpy())
    assert auc >= 0.95, f"{name}: held-out AUC {auc:.3f}"
    if name in ATTENTION_POOLING:
        # attention points at the witnesses: heatmaps depend on scores lining up with patches
        pos = yte.numpy() == 1
        a = out.attention.numpy()[pos]
        top = np.argsort(-a, 1)[:, :3]
        hit = np.take_along_axis(witness[pos], top, 1).mean()
        assert hit >= 0.8, f"{name}: only {hit:.0%} of the top-3 attended instances are witnesses"


def test_lbmambamil_beats_meanpool_where_order_matters(one_thread):
    """The A-B-A task (wsimamba.data.synthetic.order_bags): both classes hold the same multiset of
    instance distributions, so order-invariant pooling is at chance; LBMamba's local backward scan
    gives each token its right-hand context as the forward scan gives its left."""
    d = order_bags(384, dim=16, length=48, shift=4.0, seed=1)
    x, y = torch.from_numpy(np.stack(d.bags)), torch.from_numpy(d.labels)
    aucs = {}
    for name in ("meanpool", "lbmambamil"):
        torch.manual_seed(0)
        model = _fit(tiny(name, 16), x[:256], y[:256], epochs=14, lr=3e-3, batch=16)
        with torch.no_grad():
            p = torch.softmax(model(x[256:]).logits, -1)[:, 1].numpy()
        aucs[name] = roc_auc_score(y[256:].numpy(), p)
    assert aucs["meanpool"] < 0.65, aucs
    assert aucs["lbmambamil"] >= 0.85, aucs
    assert aucs["lbmambamil"] > aucs["meanpool"] + 0.25, aucs
