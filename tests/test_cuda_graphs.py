"""CUDA graphs of MIL training steps (wsimamba/train/graphs.py, ``train.cuda_graphs``).

On CPU: the length buckets, the padded function a graph records (against the model run on the bag
alone), and the option's decisions and errors. On CUDA: graphed steps against eager ones (logits and
every parameter gradient, over bags that capture, replay and fall back), and whole training runs with
and without graphs.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_train import read_csv, train_args
from wsimamba.errors import ConfigError
from wsimamba.ops.selective_scan import default_window
from wsimamba.train.graphs import MIN_BUCKET, BagGraphs, _Padded, bucket_length
from wsimamba.train.module import MILModule, graphs_unavailable

CUDA = torch.cuda.is_available()


def test_buckets_cover_each_length_with_at_most_a_quarter_of_padding():
    previous = MIN_BUCKET
    buckets = set()
    for n in range(1, 70_000):
        b = bucket_length(n)
        assert b >= n and b >= previous and b % 32 == 0 or b == MIN_BUCKET
        assert b <= max(MIN_BUCKET, 1.25 * n + 1e-9), n
        # a bag and its padded run pick the same default LBMamba window
        assert default_window(b) == default_window(n), n
        previous = b
        buckets.add(b)
    assert {128, 160, 192, 224, 256, 8192, 10240, 12288, 14336, 16384} <= buckets
    assert bucket_length(10_000) == 10240 and bucket_length(50_000) == 57344
    assert len([b for b in buckets if 8192 < b <= 16384]) == 4


@pytest.mark.parametrize("name", ["lbmambamil", "abmil"])
def test_the_recorded_function_is_the_bag_alone(name, seed):
    """What a graph records (`_Padded`: standardise, run padded with the bag's length) gives the module's own
    logits for the bag, whatever the padding holds."""
    extra = {"d_state": 4, "layers": 2} if name != "abmil" else {}
    module = MILModule(name, 8, 2, {"d_model": 16, "dropout": 0.0, **extra}).eval()
    module.set_feature_stats(torch.randn(8), torch.rand(8) + 0.5)
    for n in (5, 130, 300):
        x = torch.randn(1, n, 8)
        padded = 50 * torch.randn(1, bucket_length(n), 8)
        padded[:, :n] = x
        recorded = _Padded(module.model, module.feature_mean, module.feature_std, True)
        got = recorded(padded, torch.tensor([n]))
        torch.testing.assert_close(got, module(x).logits, rtol=1e-5, atol=1e-6)


def _fit(bag_cohort, tmp_path, *extra):
    from wsimamba.cli import main

    _, feats, labels = bag_cohort
    return main(train_args(feats, labels, tmp_path, "g", "train.folds=2", "train.max_epochs=1", *extra))


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
def test_cuda_graphs_true_without_a_gpu_is_a_named_error(bag_cohort, tmp_path, capsys):
    assert _fit(bag_cohort, tmp_path, "train.cuda_graphs=true", "train.accelerator=cpu") != 0
    err = capsys.readouterr().err
    assert "train.cuda_graphs=true, but the model trains on cpu, not a CUDA device; set it to auto or false" in err
    # auto trains eagerly where graphs cannot run
    assert _fit(bag_cohort, tmp_path / "auto", "train.cuda_graphs=auto", "train.accelerator=cpu") == 0


def test_graphs_are_refused_where_they_would_be_wrong():
    from wsimamba.models.mil import create_model

    lb, tm = create_model("lbmambamil", 8, 2, d_model=16), create_model("transmil", 8, 2, d_model=16)
    assert graphs_unavailable("cuda", 1, lb, 1, False) is None
    assert "trains on cpu" in graphs_unavailable("cpu", 1, lb, 1, False)
    assert "2 devices" in graphs_unavailable("cuda", 2, lb, 1, False)
    assert "TransMIL does not take padded bags" in graphs_unavailable("cuda", 1, tm, 1, False)
    assert "train.accumulate > 1" in graphs_unavailable("cuda", 1, lb, 2, False)
    assert "train.deterministic" in graphs_unavailable("cuda", 1, lb, 1, True)


def test_the_option_is_checked(tmp_path):
    from wsimamba.config import load_train_config

    base = ["name=x", f"data.features={tmp_path}", f"data.labels={tmp_path / 'l.csv'}"]
    assert load_train_config(None, base).train.cuda_graphs == "auto"
    assert load_train_config(None, [*base, "train.cuda_graphs=false"]).train.cuda_graphs is False
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        load_train_config(None, [*base, "train.cuda_graphs=sometimes"])


# ------------------------------------------------------------------------------------------------- CUDA


def _step(model, run, x, y):
    """logits and parameter gradients of one cross-entropy step through `run(x)`."""
    model.zero_grad(set_to_none=True)
    logits = run(x)
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    return logits.detach().clone(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _rel_norm(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name,bf16", [("lbmambamil", False), ("lbmambamil", True), ("mambamil", False),
                                       ("abmil", False)])
def test_graphed_steps_match_eager_ones(name, bf16, seed):
    """Bags of lengths that fall back (first of a bucket), capture (second) and replay (later, other lengths of
    the bucket, after a longer bag left its values in the padding): logits and every gradient as eager."""
    from wsimamba.models.mil import create_model

    torch.manual_seed(seed)
    model = create_model(name, 64, 2, d_model=128, dropout=0.0).cuda()
    mean, std = torch.randn(64, device="cuda"), torch.rand(64, device="cuda") + 0.5
    graphs = BagGraphs(model, mean, std, normalize=True)
    eager = _Padded(model, mean, std, True)
    y = torch.ones(1, dtype=torch.long, device="cuda")
    # buckets 3072: eager, capture, replay; 2560: eager; 3072: replay; 2560: capture; 5120: eager; 2560: replay
    lengths = [2900, 3000, 3071, 2500, 3072, 2400, 5000, 2401]
    tol = 1e-2 if bf16 else 1e-4
    replayed = 0
    for n in lengths:
        x = torch.randn(1, n, 64, device="cuda")
        def alone(v):
            return eager.model((v - mean) / std).logits

        def graphed(v):
            out = graphs.logits(v)
            return alone(v) if out is None else out

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):  # one context a step, as in training
            ref_logits, ref_grads = _step(model, alone, x, y)
        before = graphs.replays
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits, grads = _step(model, graphed, x, y)
        replayed += graphs.replays - before
        assert _rel_norm(logits, ref_logits) < tol, n
        scale = max(g.norm() for g in ref_grads.values())
        for k in ref_grads:
            if k.endswith("pool.w.bias"):  # 0 but for rounding: softmax does not see a shift of every score
                assert grads[k].norm() < 1e-3 * scale, (n, k)
            else:
                assert _rel_norm(grads[k], ref_grads[k]) < tol, (n, k)
    assert sorted(graphs.graphs) == [2560, 3072] and replayed == 5  # 3000, 3071, 3072, 2400, 2401
    graphs.clear()
    assert not graphs.graphs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_training_with_graphs_follows_the_eager_run(bag_cohort, tmp_path):
    """Two folds of lbmambamil on the GPU with and without graphs (no dropout): the same training losses and
    predictions within rounding, and the graphed run replayed graphs."""
    from wsimamba.train import graphs as graphs_module

    replays = []
    real = graphs_module.BagGraphs.logits

    def counting(self, x):
        out = real(self, x)
        replays.append(out is not None)
        return out

    common = ["model.name=lbmambamil", "model.d_state=4", "model.layers=2", "model.dropout=0", "train.max_epochs=4",
              "train.precision=32-true", "train.accelerator=gpu", "train.devices=1"]
    _, feats, labels = bag_cohort
    from wsimamba.cli import main

    assert main(train_args(feats, labels, tmp_path, "eager", *common, "train.cuda_graphs=false")) == 0
    graphs_module.BagGraphs.logits = counting
    try:
        assert main(train_args(feats, labels, tmp_path, "graphs", *common, "train.cuda_graphs=true")) == 0
    finally:
        graphs_module.BagGraphs.logits = real
    assert sum(replays) > len(replays) // 2
    for fold in range(3):
        eager = read_csv(tmp_path / "eager" / f"fold_{fold}" / "predictions.csv")
        graphed = read_csv(tmp_path / "graphs" / f"fold_{fold}" / "predictions.csv")
        for a, b in zip(eager, graphed):
            assert abs(float(a["prob_tumor"]) - float(b["prob_tumor"])) < 1e-3
