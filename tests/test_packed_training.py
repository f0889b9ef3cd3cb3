"""Training and prediction with several bags a step (``train.batch_size``): the bags run packed into one
sequence, the loss is the mean of each bag's class-weighted cross-entropy, so a packed step trains as
the same bags accumulated one by one."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_train import read_csv, train_args
from wsimamba.cli import main
from wsimamba.train.datamodule import collate_bags
from wsimamba.train.module import MILModule, graphs_unavailable
from wsimamba.train.run import predict_bags

TINY_MAMBA = {"d_model": 16, "d_state": 4, "layers": 2, "dropout": 0.0, "attn_dim": 8}


def _module(name="lbmambamil", **kwargs):
    module = MILModule(name, 8, 2, dict(TINY_MAMBA) if "mamba" in name else {"d_model": 16, "dropout": 0.0},
                       **kwargs).double()
    g = torch.Generator().manual_seed(5)
    module.set_feature_stats(torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5)
    return module


def _items(seed, lengths, labels):
    g = torch.Generator().manual_seed(seed)
    return [{"features": torch.randn(n, 8, generator=g, dtype=torch.float64), "label": torch.tensor(y), "index": i}
            for i, (n, y) in enumerate(zip(lengths, labels))]


@pytest.mark.parametrize("name", ["lbmambamil", "mambamil", "abmil"])
def test_a_packed_step_trains_as_its_bags_accumulated_one_by_one(name, seed, one_thread):
    """Loss and every parameter gradient of one step over 4 packed bags equal the mean over the bags run one
    a step (class weights on: each bag's loss is weighted by its class, as `accumulate` 4 would give)."""
    torch.manual_seed(seed)
    module = _module(name, class_weights=[0.25, 3.0])
    items = _items(seed, [37, 5, 300, 90], [0, 1, 1, 0])
    batch = collate_bags(items)
    assert isinstance(batch["features"], list) and batch["label"].tolist() == [0, 1, 1, 0]
    packed = module.training_step(batch, 0)
    packed.backward()
    want = {k: p.grad.clone() for k, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    losses = []
    for it in items:
        one = module.training_step({"features": it["features"][None], "label": it["label"][None]}, 0)
        (one / len(items)).backward()
        losses.append(one.detach())
        # one bag: its cross-entropy times its class weight (an unweighted mean would cancel the weight)
        ce = torch.nn.functional.cross_entropy(module(it["features"][None]).logits, it["label"][None])
        assert torch.allclose(one, ce * (0.25 if it["label"] == 0 else 3.0))
    assert torch.allclose(packed, torch.stack(losses).mean(), rtol=1e-10)
    for k, p in module.named_parameters():
        # relative to the gradient's size; the attention logit's bias gets 0 up to rounding (softmax ignores it)
        err = ((p.grad - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-6)).item()
        assert err < 1e-6, f"{k}: relative error {err:.1e}"  # (the blocks cast A, D and Δ's bias to fp32)


def test_predictions_in_batches_equal_one_bag_at_a_time(one_thread):
    module = _module("lbmambamil").eval()
    data = _items(2, [40, 300, 7, 129, 256], [0, 1, 0, 1, 0])
    probs1, attn1 = predict_bags(module, data, [4, 0, 2, 1, 3], torch.device("cpu"))
    probs3, attn3 = predict_bags(module, data, [4, 0, 2, 1, 3], torch.device("cpu"), batch_size=3)
    assert probs3.shape == (5, 2) and abs(probs3 - probs1).max() < 1e-6
    assert [a.shape for a in attn3] == [(256,), (40,), (7,), (300,), (129,)]
    assert max(abs(a - b).max() for a, b in zip(attn1, attn3)) < 1e-6


def test_graphs_are_off_for_packed_batches():
    model = MILModule("lbmambamil", 8, 2, TINY_MAMBA).model
    assert graphs_unavailable("cuda", 1, model, 1, False) is None
    assert graphs_unavailable("cuda", 1, model, 1, False, batch_size=4) == \
        "train.batch_size > 1 (packed batches of bags run eagerly)"


def test_cli_batch_size_trains_as_accumulate(bag_cohort, tmp_path, one_thread):
    """`train.batch_size=4` (packed, lbmambamil) and `train.accumulate=4` (one bag a step) give the same
    test predictions where a fold's training bags fill whole batches: the same bags in the same order, the
    same gradient per optimiser step. (A last, smaller batch differs: its loss is the mean over its bags,
    where Lightning's accumulation divides their sum by 4.)"""
    _, feats, labels = bag_cohort
    common = ["model.name=lbmambamil", "model.d_model=16", "model.d_state=4", "model.dropout=0.0",
              "train.folds=2", "train.max_epochs=3", "train.accelerator=cpu"]  # fp32: same sums, same rounding
    probs = {}
    for key, extra in (("packed", "train.batch_size=4"), ("accumulated", "train.accumulate=4")):
        args = train_args(feats, labels, tmp_path / key, "b", *common, extra)
        assert main([str(a) for a in args]) == 0
        probs[key] = [[float(r["prob_tumor"]) for r in read_csv(tmp_path / key / "b" / f"fold_{k}" / "predictions.csv")]
                      for k in range(2)]
    splits = read_csv(tmp_path / "packed" / "b" / "splits.csv")
    n_train = [sum(r["fold"] == str(k) and r["part"] == "train" for r in splits) for k in range(2)]
    whole = [k for k in range(2) if n_train[k] % 4 == 0]
    assert whole, f"no fold with whole batches: training bags {n_train}"
    for k in whole:
        assert len(probs["packed"][k]) > 10 and len(set(probs["packed"][k])) > 5  # real predictions
        assert max(abs(a - b) for a, b in zip(probs["packed"][k], probs["accumulated"][k])) < 1e-5
    for k in set(range(2)) - set(whole):
        assert max(abs(a - b) for a, b in zip(probs["packed"][k], probs["accumulated"][k])) < 0.05


def test_a_run_written_before_batch_size_existed_resumes(bag_cohort, tmp_path, one_thread, capsys):
    """A run folder whose config.yaml has no train.batch_size trained one bag a step: it resumes as such,
    and another batch size is a changed config."""
    import yaml

    _, feats, labels = bag_cohort
    args = train_args(feats, labels, tmp_path, "old", "train.folds=2", "train.max_epochs=1")
    assert main([str(a) for a in args]) == 0
    saved = tmp_path / "old" / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    assert cfg["train"].pop("batch_size") == 1
    saved.write_text(yaml.safe_dump(cfg))
    (tmp_path / "old" / "fold_1" / "metrics.json").unlink()
    assert main([str(a) for a in args]) == 0
    assert (tmp_path / "old" / "fold_1" / "metrics.json").is_file()
    capsys.readouterr()
    assert main([str(a) for a in [*args[:-1], "train.batch_size=2", "--no-progress"]]) == 1
    assert "train.batch_size: 1 → 2" in capsys.readouterr().err
