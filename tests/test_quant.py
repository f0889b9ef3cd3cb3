"""wsimamba.quant: rotations, folding, quantizers, the int8 path, whole-model PTQ and `wsimamba quantize`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import wsimamba.nn as wnn
from tests.fixtures_train import ONE_THREAD, read_csv
from wsimamba.cli import main
from wsimamba.errors import QuantError
from wsimamba.models.mil.mambamil import PreNormResidual
from wsimamba.ops.int8 import int8_linear, int8_linear_reference, quantize_rows, quantize_tensor
from wsimamba.quant import (QuantLinear, hadamard_matrix, hadamard_transform, klt_rotation, quantize_model,
                            random_signs, transform_model)
from wsimamba.quant.quantizers import quantize_weight
from wsimamba.quant.rotation import hadamard_factor, second_moment
from wsimamba.quant.run import load_quantized_checkpoint

MIXERS = {
    "mamba": lambda d: wnn.Mamba(d, d_state=4),
    "lbmamba": lambda d: wnn.LBMamba(d, d_state=4, window=4),
    "bimamba": lambda d: wnn.BiMamba(d, d_state=4),
    "srmamba": lambda d: wnn.SRMamba(d, d_state=4, rate=3),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def stack(kind: str, d: int = 24, layers: int = 2) -> nn.Module:
    """Pre-norm residual layers (norm + mixer, the shape every Mamba model here has), with random norm affines."""
    model = nn.Sequential(*[PreNormResidual(d, MIXERS[kind](d)) for _ in range(layers)]).eval()
    with torch.no_grad():
        for block in model:
            block.norm.weight.uniform_(0.5, 2.0)
            block.norm.bias.normal_()
    return model


# --------------------------------------------------------------------------------------------------
# rotations


@pytest.mark.parametrize("n", [1, 2, 64, 12, 48, 20, 80, 192, 28, 6])
def test_fast_transform_equals_the_explicit_matrix(n, seed):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    h = hadamard_matrix(n)
    torch.testing.assert_close(hadamard_transform(x), x @ h, rtol=0, atol=1e-12)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    m, exact = hadamard_factor(n)
    if exact:  # a true Hadamard matrix: every entry ±1/√n
        torch.testing.assert_close(h.abs(), torch.full_like(h, n ** -0.5), rtol=0, atol=1e-12)
    else:
        assert n in (28, 6) and m in (7, 3)  # no Paley order fits: an orthogonal Kronecker factor


def test_klt_rotation_equalises_channel_variances(seed):
    """Correlated heavy-tailed activations: Hadamard alone leaves channel variances uneven, K·H does not."""
    n = 64
    gen = torch.Generator().manual_seed(seed)
    # a few dominant correlated directions (as Mamba's activations have): their energy lands unevenly
    # on the channels of any fixed rotation, including a Hadamard one
    spectrum = torch.ones(n, dtype=torch.float64)
    spectrum[:3] = torch.tensor([3000.0, 1000.0, 300.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    mix = basis * spectrum.sqrt()[None, :]

    def sample(rows):
        t = torch.distributions.StudentT(5.0).sample((rows, n)).double()  # heavy tails
        return t @ mix.T

    calib, held_out = sample(20000), sample(20000)
    signs = random_signs(n, seed)
    had = signs[:, None] * hadamard_matrix(n)
    klt = klt_rotation(second_moment(calib), signs)

    def spread(x):
        var = x.pow(2).mean(0)
        return (var.max() / var.min()).item()

    s_had, s_klt = spread(held_out @ had), spread(held_out @ klt)
    print(f"max/min channel variance: raw {spread(held_out):.1f}, Hadamard {s_had:.2f}, KLT·H {s_klt:.3f}")
    assert s_klt < 1.3
    assert s_had > 10 * s_klt


@pytest.mark.parametrize("kind", sorted(MIXERS))
@pytest.mark.parametrize("method", ["hadamard", "mambaquant"])
def test_folding_leaves_the_float_model_unchanged(kind, method, seed):
    torch.manual_seed(seed)
    model = stack(kind).double()
    calib = [torch.randn(1, 29, 24, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(2, 29, 24, dtype=torch.float64)
    ref = model(x)
    folded = transform_model(model, calib, method)
    # rotations really are in place: norms folded, weights changed
    assert torch.all(folded[0].norm.weight == 1) and not torch.equal(folded[0].mixer.in_proj.weight,
                                                                    model[0].mixer.in_proj.weight)
    out = folded(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 1e-6, rel
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # the input model is untouched


# --------------------------------------------------------------------------------------------------
# outliers: naive > hadamard > mambaquant


def planted(kind: str, seed: int, d: int = 64) -> nn.Module:
    """Outlier channels where Mamba has them: a few norm channels ×10 (in_proj input), a few x rows of
    in_proj ×20 (conv input, and through the scan the out_proj input)."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[PreNormResidual(d, MIXERS[kind](d)) for _ in range(2)]).eval()
    with torch.no_grad():
        for block in model:
            block.norm.weight[torch.randperm(d)[:3]] *= 10
            mixer = block.mixer
            mixer.in_proj.weight[torch.randperm(mixer.d_inner)[:4]] *= 20
    return model


MODELS = 8  # models averaged per seed in the ranking test below


def test_mambaquant_beats_hadamard_beats_naive_on_outlier_channels(seed):
    """W8A8 (static per-tensor activations), error of the residual branch on the calibration bags, mean
    over MODELS fresh models (half Mamba, half LBMamba). The ranking is a property of the method on
    average, not of every model: with two models per seed, 28 of 400 random seeds broke a bound (worst
    ratios 1.54 hadamard/naive, 1.24 mambaquant/hadamard). With eight, none of 100 other seeds did (worst
    0.52 and 0.85), nor the two worst seeds of each bound; held-out tokens are noisier (see the module README
    section)."""
    errors = {m: 0.0 for m in ("naive", "hadamard", "mambaquant")}
    for i in range(MODELS):
        model = planted(("mamba", "lbmamba")[i % 2], seed + i)
        gen = torch.Generator().manual_seed(seed + 10 + i)
        calib = [torch.randn(1, 256, 64, generator=gen) for _ in range(8)]
        x = torch.cat(calib[:2])
        ref = model(x)
        for method in errors:
            q = quantize_model(model, calib, method)
            errors[method] += ((q(x) - ref).norm() / (ref - x).norm()).item() / MODELS
    print(errors)
    assert errors["hadamard"] < 0.8 * errors["naive"]
    assert errors["mambaquant"] < 0.92 * errors["hadamard"]


def test_settings_are_checked_and_4_bit_weights_cost_more(seed):
    torch.manual_seed(seed)
    model = stack("mamba")
    calib = [torch.randn(1, 40, 24) for _ in range(2)]
    with pytest.raises(QuantError, match="method: expected one of naive, hadamard, mambaquant"):
        quantize_model(model, calib, "gptq")
    with pytest.raises(QuantError, match="w_bits: expected 8 or 4"):
        quantize_model(model, calib, "naive", w_bits=3)
    with pytest.raises(QuantError, match="calib_batches"):
        quantize_model(model, [], "mambaquant")
    x = calib[0]
    ref = model(x)
    err = {b: ((quantize_model(model, calib, "hadamard", w_bits=b)(x) - ref).norm() / (ref - x).norm()).item()
           for b in (8, 4)}
    assert err[8] < 0.05 and err[4] > 2 * err[8]
    q = quantize_model(model, calib, "mambaquant", granularity="token")
    assert ((q(x) - ref).norm() / (ref - x).norm()).item() < 0.05


# --------------------------------------------------------------------------------------------------
# the int8 path


@pytest.mark.parametrize("m, k, n", [(5, 3, 7), (40, 64, 24), (17, 33, 9)])
def test_int8_matmul_is_exact(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    xs, ws, bias = torch.rand(m, 1, generator=gen) + 0.1, torch.rand(n, generator=gen) + 0.1, torch.randn(n, generator=gen)
    torch.testing.assert_close(int8_linear(xq, xs, wq, ws, bias), int8_linear_reference(xq, xs, wq, ws, bias),
                               rtol=1e-6, atol=1e-5)


def _int_vs_fake(device: str, granularity: str, seed: int):
    torch.manual_seed(seed)
    lin = nn.Linear(48, 40).to(device)
    x = (torch.randn(3, 30, 48) * torch.linspace(0.1, 4, 48)).to(device)
    q = QuantLinear.from_float(lin, granularity=granularity)
    q.freeze()
    q.input_quant.mode = "observe"
    q(x)
    q.input_quant.finish_observing()
    q.input_quant.mode = "quant"
    q.int8 = "off"
    fake = q(x)
    q.int8 = "on"
    assert q._use_int(x)
    real = q(x)
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4)
    assert ((fake - lin(x)).norm() / lin(x).norm()).item() < 0.03  # and it is a W8A8 approximation
    # the int path rounds exactly as the fake one: compare the integer inputs too
    scale = q.input_quant.current_scale(x.reshape(-1, 48))
    assert torch.equal(quantize_tensor(x.reshape(-1, 48), scale), quantize_tensor(x.reshape(-1, 48).float(), scale.float()))


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_int8_linear_matches_its_fake_quant_twin_on_cpu(granularity, seed):
    _int_vs_fake("cpu", granularity, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_int8_linear_matches_its_fake_quant_twin_on_cuda(granularity, seed):
    _int_vs_fake("cuda", granularity, seed)


def test_weight_and_row_quantizers_round_trip(seed):
    w = torch.randn(16, 8) * torch.logspace(-2, 2, 16)[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().amax(1).eq(127).all()
    torch.testing.assert_close(q.float() * scale[:, None], w, rtol=0, atol=(scale / 2 + 1e-6).max().item())
    xq, s = quantize_rows(w)
    assert s.shape == (16, 1) and xq.abs().amax(1).eq(127).all()


# --------------------------------------------------------------------------------------------------
# a trained MIL run: AUC kept, `wsimamba quantize` end to end


@pytest.fixture(scope="module")
def mamba_run(bag_cohort, tmp_path_factory):
    """A 3-fold LBMambaMIL run on the planted-witness bags (trained through the CLI)."""
    _, feats, labels = bag_cohort
    out = tmp_path_factory.mktemp("quant_runs")
    before = torch.get_num_threads()
    torch.set_num_threads(ONE_THREAD)
    try:
        code = main(["train", "--set", "name=lb", f"data.features={feats}", f"data.labels={labels}", f"out={out}",
                     "model.name=lbmambamil", "model.d_model=16", "model.d_state=4", "model.layers=1",
                     "model.attn_dim=8", "train.folds=3", "train.max_epochs=10", "train.lr=5e-3",
                     "train.val_fraction=0", "train.early_stopping.enabled=false", "--no-progress"])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return out / "lb"


@pytest.fixture(scope="module")
def quant_out(mamba_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant_out")
    assert main(["quantize", str(mamba_run), "--calib-slides", "4", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_quantize_writes_the_table_and_checkpoints(mamba_run, quant_out, bag_cohort):
    rows = read_csv(quant_out / "quant_table.csv")
    assert [r["method"] for r in rows] == ["float", "naive", "hadamard", "mambaquant"] * 3
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    float_metrics = {r["fold"]: json.loads((mamba_run / f"fold_{r['fold']}" / "metrics.json").read_text())["test"]
                     for r in rows if r["method"] == "float"}
    for r in rows:
        if r["method"] == "float":  # the float row reproduces training's own test metrics
            assert float(r["auc"]) == pytest.approx(float_metrics[r["fold"]]["auc"], abs=1e-6)
    summary = json.loads((quant_out / "quant_summary.json").read_text())
    assert set(summary["methods"]) == {"float", "naive", "hadamard", "mambaquant"}
    md = (quant_out / "quant_summary.md").read_text()
    assert "| mambaquant |" in md and "W8A8" in md
    assert not list(quant_out.rglob(".*partial*"))
    # a checkpoint reloads into the same quantized model
    from wsimamba.data.bags import BagDataset, FeatureSource
    from wsimamba.data.labels import read_labels

    _, feats, labels = bag_cohort
    table = read_labels(labels)
    ds = BagDataset(FeatureSource(feats), table.slide_ids, table.labels)
    test_ids = [r["slide_id"] for r in read_csv(mamba_run / "splits.csv") if r["fold"] == "0" and r["part"] == "test"]
    q = load_quantized_checkpoint(quant_out / "fold_0" / "mambaquant_w8a8.pt")
    probs = np.stack([torch.softmax(q(ds[table.slide_ids.index(s)]["features"][None]).logits, -1)[0].detach().numpy()
                      for s in test_ids])
    from wsimamba.train.metrics import cohort_metrics

    again = cohort_metrics(table.labels[[table.slide_ids.index(s) for s in test_ids]], probs)
    saved = next(r for r in rows if r["fold"] == "0" and r["method"] == "mambaquant")
    assert again["auc"] == pytest.approx(float(saved["auc"]), abs=1e-6)
    assert type(q.model.layers.layers[0].mixer).__name__ == "QuantLBMamba"


def test_quantized_mil_model_keeps_its_auc(quant_out):
    summary = json.loads((quant_out / "quant_summary.json").read_text())["methods"]
    auc_float = summary["float"]["auc"]["mean"]
    assert auc_float > 0.9  # planted witnesses: the float model has learnt the task
    for method in ("naive", "hadamard", "mambaquant"):
        assert summary[method]["auc"]["mean"] >= auc_float - 0.05, (method, summary[method]["auc"])
        assert summary[method]["mean_abs_dprob"]["mean"] < 0.05


def test_quantize_errors_are_one_line(tmp_path, capsys, mamba_run):
    assert main(["quantize", str(tmp_path / "nope")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], lines
    (tmp_path / "empty").mkdir()
    assert main(["quantize", str(tmp_path / "empty")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a run folder (no config.yaml)" in lines[0], lines
    assert main(["quantize", str(mamba_run), "--method", "gptq", "--out", str(tmp_path / "q")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "method" in lines[0] and "gptq" in lines[0], lines
