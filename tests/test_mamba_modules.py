"""wsimamba.nn: Mamba, LBMamba, BiMamba, SRMamba and AlternatingFlip — shapes, gradients, initialisation,
and each variant rebuilt from plain Mamba blocks that share its weights.

Random tests draw a fresh seed each run; a failing test prints it, and WSIMAMBA_TEST_SEED=<seed> replays it.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.errors import WsimambaError
from wsimamba.nn import AlternatingFlip, BiMamba, LBMamba, Mamba, SRMamba, stride_reorder, stride_restore

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
D_MODEL, D_STATE = 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: a second OpenMP thread mostly waits


MODULES = {
    "mamba": lambda: Mamba(D_MODEL, d_state=D_STATE),
    "mamba_reverse": lambda: Mamba(D_MODEL, d_state=D_STATE, direction="reverse"),
    "mamba_bidirectional": lambda: Mamba(D_MODEL, d_state=D_STATE, direction="bidirectional"),
    "lbmamba": lambda: LBMamba(D_MODEL, d_state=D_STATE),
    "lbmamba_window3": lambda: LBMamba(D_MODEL, d_state=D_STATE, window=3),
    "bimamba": lambda: BiMamba(D_MODEL, d_state=D_STATE),
    "srmamba": lambda: SRMamba(D_MODEL, d_state=D_STATE, rate=4),
    "srmamba_bias_dt_rank": lambda: SRMamba(D_MODEL, d_state=D_STATE, rate=3, dt_rank=3, bias=True),
}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("length", [1, 13])
def test_shape_and_gradient_reaches_every_parameter(seed, name, length):
    block = MODULES[name]()
    x = torch.randn(2, length, D_MODEL, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if length == 1:
        return  # one token: A only multiplies the zero initial state, so it rightly gets no gradient
    dead = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_initialisation_follows_mamba(seed):
    block = Mamba(32, d_state=6, expand=2, dt_min=1e-3, dt_max=1e-1)
    assert block.dt_rank == math.ceil(32 / 16) and block.d_inner == 64
    torch.testing.assert_close(-torch.exp(block.A_log.detach()), -torch.arange(1.0, 7.0).repeat(64, 1))
    assert torch.equal(block.D.detach(), torch.ones(64))
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # spread over the log range, not one value
    assert block.conv1d.weight.shape == (64, 1, 4) and block.conv1d.groups == 64


def test_mamba_parameter_names_match_mamba_ssm_and_vim():
    assert set(dict(Mamba(D_MODEL).named_parameters())) == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
        "A_log", "D", "out_proj.weight"}
    second = {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias",
              "A_b_log", "D_b"}
    for cls in (BiMamba, SRMamba):
        assert second <= set(dict(cls(D_MODEL).named_parameters()))


def test_convolution_is_causal_and_reverse_block_is_the_forward_block_on_the_flipped_sequence(seed):
    forward = Mamba(D_MODEL, d_state=D_STATE)
    reverse = Mamba(D_MODEL, d_state=D_STATE, direction="reverse")
    reverse.load_state_dict(forward.state_dict())
    x = torch.randn(2, 11, D_MODEL)
    torch.testing.assert_close(reverse(x), forward(x.flip(1)).flip(1))
    # a forward block's output at token t ignores later tokens
    changed = x.clone()
    changed[:, 7:] += 1
    torch.testing.assert_close(forward(changed)[:, :7], forward(x)[:, :7])
    assert not torch.allclose(forward(changed)[:, 7:], forward(x)[:, 7:])


def test_lbmamba_with_window_one_is_the_forward_block(seed):
    forward = Mamba(D_MODEL, d_state=D_STATE)
    local = LBMamba(D_MODEL, d_state=D_STATE, window=1)
    local.load_state_dict(forward.state_dict())
    x = torch.randn(2, 9, D_MODEL)
    torch.testing.assert_close(local(x), forward(x))
    local.window = 4  # a token now sees up to three later tokens of its window, and no further
    changed = x.clone()
    changed[:, 6] += 1
    out, out_changed = local(x), local(changed)
    torch.testing.assert_close(out_changed[:, :4], out[:, :4])
    assert not torch.allclose(out_changed[:, 4:6], out[:, 4:6])


BRANCH = {"conv1d.weight": "conv1d_b.weight", "conv1d.bias": "conv1d_b.bias", "x_proj.weight": "x_proj_b.weight",
          "dt_proj.weight": "dt_proj_b.weight", "dt_proj.bias": "dt_proj_b.bias", "A_log": "A_b_log", "D": "D_b"}


def _branch_block(two_branch, second):
    """A plain Mamba block with the shared projections and the first or second branch of ``two_branch``."""
    source = two_branch.state_dict()
    block = Mamba(D_MODEL, d_state=D_STATE)
    state = {k: v for k, v in source.items() if k.startswith(("in_proj", "out_proj"))}
    state.update({name: source[second_name if second else name] for name, second_name in BRANCH.items()})
    block.load_state_dict(state)
    return block


def test_bimamba_averages_a_forward_branch_and_a_backward_branch_with_its_own_parameters(seed):
    bi = BiMamba(D_MODEL, d_state=D_STATE)
    x = torch.randn(3, 10, D_MODEL)
    forward, backward = _branch_block(bi, second=False), _branch_block(bi, second=True)
    # out_proj has no bias, so averaging before or after it is the same
    torch.testing.assert_close(bi(x), (forward(x) + backward(x.flip(1)).flip(1)) / 2)


@pytest.mark.parametrize("rate,length", [(1, 5), (3, 7), (4, 12), (10, 23)])
def test_stride_reorder_takes_every_rate_th_token_and_restore_inverts_it(rate, length):
    x = torch.arange(1, length + 1, dtype=torch.float32).reshape(1, 1, length).repeat(2, 3, 1)
    padded = -(-length // rate) * rate
    tokens = list(range(1, length + 1)) + [0] * (padded - length)  # zero padding at the end
    expected = [tokens[k * rate + w] for w in range(rate) for k in range(padded // rate)]
    reordered = stride_reorder(x, rate)
    assert reordered.shape == (2, 3, padded) and reordered[0, 0].tolist() == expected
    assert torch.equal(stride_restore(reordered, rate, length), x)


@pytest.mark.parametrize("rate,length", [(3, 10), (4, 8), (10, 7)])
def test_srmamba_sums_a_forward_branch_and_a_branch_over_the_reordered_sequence(seed, rate, length):
    sr = SRMamba(D_MODEL, d_state=D_STATE, rate=rate)
    x = torch.randn(2, length, D_MODEL)
    forward, second = _branch_block(sr, second=False), _branch_block(sr, second=True)
    # in_proj and out_proj act per token without bias, so they commute with padding and reordering
    reordered = stride_reorder(x.transpose(1, 2), rate).transpose(1, 2)
    restored = stride_restore(second(reordered).transpose(1, 2), rate, length).transpose(1, 2)
    torch.testing.assert_close(sr(x), forward(x) + restored)


class _AddResidual(nn.Module):
    """Vim-style block: returns (mixer(hidden + residual), hidden + residual)."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return self.mixer(residual), residual


def test_alternating_flip_reverses_the_sequence_between_layers(seed):
    first, second, third = (Mamba(D_MODEL, d_state=D_STATE) for _ in range(3))
    x = torch.randn(2, 9, D_MODEL)
    torch.testing.assert_close(AlternatingFlip([first, second])(x), second(first(x).flip(1)).flip(1))
    stack = AlternatingFlip([first, second, third])
    expected = third(second(first(x).flip(1)).flip(1))  # three flips, then order restored
    torch.testing.assert_close(stack(x), expected)
    torch.testing.assert_close(AlternatingFlip([first, second, third], restore_order=False)(x), expected.flip(1))

    stack = AlternatingFlip([_AddResidual(first), _AddResidual(second)], residual=True)
    hidden, residual = stack(x)
    r1 = x
    h1 = first(r1)
    r2 = h1.flip(1) + r1.flip(1)
    torch.testing.assert_close(residual, r2.flip(1))
    torch.testing.assert_close(hidden, second(r2).flip(1))


def test_bad_arguments_raise_errors_naming_them():
    cases = [
        (lambda: Mamba(0), "d_model:"),
        (lambda: Mamba(8, dt_rank="big"), "dt_rank:"),
        (lambda: Mamba(8, direction="up"), "direction:"),
        (lambda: Mamba(8, window=4), "window:"),
        (lambda: LBMamba(8, direction="forward"), "direction:"),
        (lambda: BiMamba(8, direction="reverse"), "direction:"),
        (lambda: SRMamba(8, rate=0), "rate:"),
        (lambda: Mamba(8)(torch.randn(2, 5, 7)), "hidden_states:"),
        (lambda: Mamba(8, backend="fast")(torch.randn(2, 5, 8)), "backend:"),
        (lambda: AlternatingFlip([Mamba(8)])(torch.randn(1, 3, 8), torch.randn(1, 3, 8)), "residual:"),
    ]
    for build, prefix in cases:
        with pytest.raises(WsimambaError) as info:
            build()
        assert str(info.value).startswith(prefix), str(info.value)


@pytest.mark.parametrize("cls", [Mamba, LBMamba, BiMamba, SRMamba])
def test_bfloat16_block_matches_fp32_within_bf16_tolerance(seed, cls):
    block = cls(D_MODEL, d_state=D_STATE)
    x = torch.randn(2, 17, D_MODEL)
    low = cls(D_MODEL, d_state=D_STATE)
    low.load_state_dict(block.state_dict())
    low = low.to(torch.bfloat16)
    block.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in block.state_dict().items()})
    out_low = low(x.to(torch.bfloat16))
    out = block(x.to(torch.bfloat16).float())
    assert out_low.dtype == torch.bfloat16
    # projections and convolution run in bf16 too, so allow a few bf16 roundings
    torch.testing.assert_close(out_low.float(), out, rtol=5e-2, atol=5e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", MODULES)
def test_modules_on_cuda_match_cpu(seed, name):
    block = MODULES[name]()
    x = torch.randn(2, 33, D_MODEL)
    expected = block(x)
    torch.testing.assert_close(block.cuda()(x.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)
