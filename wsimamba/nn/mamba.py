"""Mamba blocks: the Mamba (S6) mixer and the variants the MIL aggregators and vision backbones use.

Every block maps hidden states (batch, length, d_model) to (batch, length, d_model). Parameter names
follow mamba-ssm (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) and, for the second branch,
Vim / MambaMIL (conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b), so their checkpoints load by name.

- :class:`Mamba`    one branch; the scan direction is an argument (``reverse`` runs the whole block on
                    the flipped sequence, so its convolution looks ahead instead of back).
- :class:`BiMamba`  Vim v2: a second branch over the flipped sequence; in_proj/out_proj shared; averaged.
- :class:`SRMamba`  MambaMIL: a second branch over the sequence reordered with stride ``rate``; summed.
- :class:`LBMamba`  a Mamba block whose scan is ``local_bidirectional``.
- :class:`AlternatingFlip`  runs a stack of layers, reversing the sequence (and residual) after each (LBVim).

Two implementations of the same function (``impl``):

- ``reference``  nn.Linear / nn.Conv1d as written in the papers: in_proj gives (batch, length, 2·d_inner),
                 which is transposed for the convolution; the scan then copies the transposed z and dt
                 into rows, and the convolution pads both sides and cuts the tail.
- ``fast``       the same parameters, laid out for the kernels: in_proj, x_proj and dt_proj are batched
                 products whose outputs are already (batch, channels, length), so x, z, Δ, B and C reach
                 the fused convolution (``wsimamba.ops.causal_conv1d``, causal depthwise conv + SiLU in one
                 kernel that recomputes its activation in the backward) and the scan without a layout copy.
                 SRMamba's reordering makes no copies either: the second branch's convolution reads x in
                 place (``reorder=rate``), both branches scan without the gate, and
                 ``wsimamba.ops.restore_add_gate`` restores, adds and gates in one pass; padded and packed
                 bags too, each bag reordered alone (``bags=``).
- ``auto``       ``fast`` on CUDA tensors, ``reference`` elsewhere.

Both give the same outputs and gradients within rounding (tests/test_mamba_fast.py).

Every block's forward also takes ``pad``: bags padded at their ends to one length, or packed into one
sequence (:mod:`wsimamba.nn.padding`), each computed as if alone (tests/test_padded_bags.py).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from wsimamba.nn.padding import PaddedBags
from wsimamba.ops import causal_conv1d, selective_scan
from wsimamba.ops.conv1d import causal_conv1d_reference
from wsimamba.ops.reorder import restore_add_gate, stride_reorder, stride_restore
from wsimamba.ops.selective_scan import DIRECTIONS, ScanArgumentError

IMPLS = ("auto", "fast", "reference")

__all__ = ["AlternatingFlip", "BiMamba", "LBMamba", "Mamba", "SRMamba", "stride_reorder", "stride_restore"]


# parameter factories shared by every branch: depthwise causal conv, dt_proj, A_log, D


def _conv(d_inner: int, d_conv: int, bias: bool) -> nn.Conv1d:
    return nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=bias)


def _dt_proj(dt_rank: int, d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> nn.Linear:
    proj = nn.Linear(dt_rank, d_inner, bias=True)
    bound = dt_rank**-0.5  # keeps the variance of dt at initialisation independent of dt_rank
    nn.init.uniform_(proj.weight, -bound, bound)
    # bias = softplus⁻¹(dt) with dt log-uniform in [dt_min, dt_max], so the scan starts at those step sizes
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    with torch.no_grad():
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    proj.bias._no_reinit = True  # model-level initialisers must not zero this bias
    return proj


def _a_log(d_inner: int, d_state: int) -> nn.Parameter:
    # S4D-real: A = −(1, 2, …, N) in every channel, stored as log so that A stays negative in training
    a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    param = nn.Parameter(torch.log(a))
    param._no_weight_decay = True
    return param


def _skip(d_inner: int) -> nn.Parameter:
    param = nn.Parameter(torch.ones(d_inner))
    param._no_weight_decay = True
    return param


def _check_block_args(d_model, d_state, d_conv, expand, dt_rank, direction, impl="auto"):
    if impl not in IMPLS:
        raise ScanArgumentError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScanArgumentError(f"{name}: expected a positive int, got {value!r}")
    if dt_rank != "auto" and (isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1):
        raise ScanArgumentError(f"dt_rank: expected 'auto' or a positive int, got {dt_rank!r}")
    if direction not in DIRECTIONS:
        raise ScanArgumentError(f"direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")


def _check_hidden(hidden: torch.Tensor, d_model: int) -> None:
    if hidden.dim() != 3 or hidden.shape[-1] != d_model or hidden.shape[1] < 1:
        raise ScanArgumentError(
            f"hidden_states: expected shape (batch, length ≥ 1, {d_model}), got ({', '.join(map(str, hidden.shape))})"
        )


class Mamba(nn.Module):
    """The Mamba (S6) block.

    in_proj → (x, z); x → depthwise causal conv1d (kernel ``d_conv``) → SiLU → x_proj → (dt, B, C);
    dt → dt_proj (bias passed to the scan as delta_bias, softplus inside); A = −exp(A_log);
    y = selective_scan(x, dt, A, B, C, D, z) in ``direction``; out_proj(y).

    Args:
        d_model: model width. d_state: SSM state size N. d_conv: convolution width.
        expand: d_inner = expand · d_model. dt_rank: rank of dt, "auto" = ceil(d_model / 16).
        dt_min, dt_max: range of the initial softplus(dt bias), log-uniform. dt_init_floor: its lower clamp.
        conv_bias, bias: biases of conv1d and of in_proj/out_proj.
        direction: scan direction ("forward", "reverse", "bidirectional", "local_bidirectional").
        window: window of the local_bidirectional scan; None picks LBMamba's rule from the length.
        backend: selective-scan backend ("auto", "reference", "triton", "mamba_ssm").
        impl: "auto", "fast" or "reference" layers (module docstring); the parameters are the same.

    Shapes: hidden_states (batch, length, d_model) → (batch, length, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 direction: str = "forward", window: int | None = None, backend: str = "auto",
                 impl: str = "auto"):
        super().__init__()
        _check_block_args(d_model, d_state, d_conv, expand, dt_rank, direction, impl)
        if window is not None and direction != "local_bidirectional":
            raise ScanArgumentError(f"window: only used by direction='local_bidirectional', got window={window!r} "
                                    f"with direction={direction!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.direction, self.window, self.backend, self.impl = direction, window, backend, impl
        self._dt_init = (dt_min, dt_max, dt_init_floor)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = _conv(self.d_inner, d_conv, conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = _dt_proj(self.dt_rank, self.d_inner, *self._dt_init)
        self.A_log = _a_log(self.d_inner, d_state)
        self.D = _skip(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _fast(self, t: torch.Tensor) -> bool:
        """Whether this call runs the fast layers (``impl``; "auto": on CUDA tensors)."""
        return self.impl == "fast" or (self.impl == "auto" and t.is_cuda)

    def _ssm(self, x, z, conv1d, x_proj, dt_proj, A_log, D, direction, window, pad=None):
        """One branch after in_proj. x, z: (batch, d_inner, length) → y (batch, d_inner, length).
        pad: a :class:`PaddedBags` (the padding's Δ is set to 0: identity steps) or None."""
        if self._fast(x):
            return self._ssm_fast(x, z, conv1d, x_proj, dt_proj, A_log, D, direction, window, pad)
        x = _reference_conv(conv1d, x, pad)
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (batch, d_inner, length); bias goes to the scan
        if pad is not None:
            dt = pad.mask_delta(dt)
        return selective_scan(
            x, dt, -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D.float(), z,
            delta_bias=dt_proj.bias.float(), delta_softplus=True, direction=direction, backend=self.backend,
            **_scan_layout(direction, window, pad),
        )

    def _ssm_fast(self, x, z, conv1d, x_proj, dt_proj, A_log, D, direction, window, pad=None, reorder=None,
                  bags=None):
        """The fast branch: x, z (batch, d_inner, length) with unit stride along the length (views of
        in_proj's output are fine) → y (batch, d_inner, length). z None: no gate. reorder r: the branch runs
        over ``stride_reorder(x, r)`` (of each bag alone, with ``bags`` and ``pad`` the reordered layout), which
        the convolution reads from x in place; y is then in that order."""
        if reorder is None:
            conv_kw = {"seq_idx": _seq_idx(pad)}
        else:
            conv_kw = {"reorder": reorder} if bags is None else {"reorder": reorder, "bags": bags}
        x = causal_conv1d(x, conv1d.weight, conv1d.bias, activation="silu", **conv_kw)
        # x_dbl = W_x x: (batch, dt_rank + 2·d_state, length), so Δ's low-rank part, B and C are rows
        x_dbl = _channel_first(x_proj.weight, x)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = _channel_first(dt_proj.weight, dt)  # (batch, d_inner, length); bias goes to the scan
        if pad is not None:
            dt = pad.mask_delta(dt)
        return selective_scan(
            x, dt, -torch.exp(A_log.float()), B, C, D.float(), z,
            delta_bias=dt_proj.bias.float(), delta_softplus=True, direction=direction, backend=self.backend,
            **_scan_layout(direction, window, pad),
        )

    def _in(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_hidden(hidden_states, self.d_model)
        if self._fast(hidden_states):
            # (batch, 2·d_inner, length) straight from the product: x and z are row views, no transpose copy
            xz = _channel_first(self.in_proj.weight, hidden_states.transpose(1, 2), self.in_proj.bias)
        else:
            xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2·d_inner, length)
        return xz.chunk(2, dim=1)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        # both layers: y (batch, d_inner, length) read transposed in place (a copy only for batch > 1)
        return self.out_proj(y.transpose(1, 2))

    def forward(self, hidden_states: torch.Tensor, pad: PaddedBags | None = None) -> torch.Tensor:
        """hidden_states (batch, length, d_model) → (batch, length, d_model).

        pad: the bags are padded at the end (:class:`wsimamba.nn.padding.PaddedBags`) or packed into one
        sequence (:class:`wsimamba.nn.padding.PackedBags`); each bag's real tokens get what they would get
        alone. Padded, a local_bidirectional scan with ``window=None`` takes its window from the padded
        length, so give the window to match bags of ≤ 256 tokens run alone; packed, it takes each bag's
        own, which must agree (:meth:`~wsimamba.nn.padding.PackedBags.lb_window`)."""
        if self.direction == "reverse":
            # the whole block on the flipped sequence, so the convolution is anti-causal too
            return _flip(self._forward(_flip(hidden_states, 1, pad), "forward", pad), 1, pad)
        return self._forward(hidden_states, self.direction, pad)

    def _forward(self, hidden_states, direction, pad=None):
        x, z = self._in(hidden_states)
        y = self._ssm(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, direction, self.window, pad)
        return self._out(y)


def _seq_idx(pad: PaddedBags | None) -> torch.Tensor | None:
    """The packed bags' slot of every position (conv and scan restart at each), or None."""
    return None if pad is None else pad.seq_idx


def _scan_layout(direction: str, window: int | None, pad: PaddedBags | None) -> dict:
    """The scan's ``window`` and ``seq_idx`` arguments. Packed bags need the window resolved here: LBMamba's
    rule applied to each bag's length, as alone (:meth:`wsimamba.nn.PackedBags.lb_window`)."""
    seq_idx = _seq_idx(pad)
    if seq_idx is None:
        return {"window": window}
    if direction == "local_bidirectional":
        window = pad.lb_window(window)
    return {"window": window, "seq_idx": seq_idx}


def _reference_conv(conv1d: nn.Conv1d, x: torch.Tensor, pad: PaddedBags | None) -> torch.Tensor:
    """The reference layers' depthwise causal conv + SiLU: nn.Conv1d, or with packed bags the reference
    op restarting at each slot."""
    if _seq_idx(pad) is not None:
        return causal_conv1d_reference(x, conv1d.weight, conv1d.bias, activation="silu", seq_idx=pad.seq_idx)
    # conv pads both sides by d_conv − 1; the tail cut makes it causal
    return F.silu(conv1d(x)[..., :x.shape[-1]])


def _flip(x: torch.Tensor, dim: int, pad: PaddedBags | None) -> torch.Tensor:
    """x reversed along `dim`, or with padded bags each bag's real tokens reversed in place."""
    return x.flip(dim) if pad is None else pad.flip(x, dim)


def _channel_first(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W x per batch element: weight (out, in), x (batch, in, length) any strides → (batch, out, length) contiguous.

    A product whose output is channel-first and row-contiguous, what the convolution and the scan read
    (``torch.matmul(weight, x)`` computes it as (xᵀ Wᵀ)ᵀ and returns a transposed view). One bag (batch 1,
    how MIL trains) is a plain ``mm`` with the weight itself, whose cast autocast caches for the step; a
    batch is a ``bmm`` against the expanded weight.
    """
    if x.shape[0] == 1:
        out = torch.mm(weight, x[0]).unsqueeze(0)
    else:
        out = torch.bmm(weight.expand(x.shape[0], -1, -1), x)
    return out if bias is None else out + bias.to(out.dtype)[:, None]  # in the product's dtype, as F.linear


class LBMamba(Mamba):
    """Mamba block with the locally bidirectional scan (LBMamba).

    The forward scan plus, inside each window of ``window`` tokens, a backward scan
    (DESIGN.md, "The selective scan contract"). ``window=None`` picks 4 / 8 / 16 tokens for
    length ≤ 128 / ≤ 256 / longer. Other arguments as :class:`Mamba`.

    Shapes: hidden_states (batch, length, d_model) → (batch, length, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", window: int | None = None, backend: str = "auto", **kwargs):
        # impl (and the other Mamba arguments) pass through kwargs
        if "direction" in kwargs:
            raise ScanArgumentError(
                f"direction: LBMamba's scan is always local_bidirectional, got {kwargs['direction']!r}")
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, direction="local_bidirectional",
                         window=window, backend=backend, **kwargs)


class _TwoBranch(Mamba):
    """A Mamba block plus a second branch with its own conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False,
                 backend="auto", **kwargs):
        for name in ("direction", "window"):
            if name in kwargs:
                raise ScanArgumentError(f"{name}: {type(self).__name__} fixes its scans, got {name}={kwargs[name]!r}")
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, conv_bias=conv_bias, bias=bias,
                         direction="forward", backend=backend, **kwargs)
        self.conv1d_b = _conv(self.d_inner, d_conv, conv_bias)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = _dt_proj(self.dt_rank, self.d_inner, *self._dt_init)
        self.A_b_log = _a_log(self.d_inner, d_state)
        self.D_b = _skip(self.d_inner)

    def _first(self, x, z, pad=None):
        return self._ssm(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, "forward", None, pad)

    def _second(self, x, z, pad=None):
        return self._ssm(x, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, "forward", None,
                         pad)


class BiMamba(_TwoBranch):
    """Vim v2 bidirectional Mamba: forward branch and a backward branch, averaged.

    The backward branch has its own conv1d_b, x_proj_b, dt_proj_b, A_b_log and D_b and runs on the
    flipped sequence (its output flipped back); in_proj and out_proj are shared:
    out = out_proj((y_forward + y_backward) / 2). Arguments as :class:`Mamba` (no direction/window).

    Shapes: hidden_states (batch, length, d_model) → (batch, length, d_model).
    """

    def forward(self, hidden_states: torch.Tensor, pad: PaddedBags | None = None) -> torch.Tensor:
        """hidden_states (batch, length, d_model) → (batch, length, d_model); pad as :meth:`Mamba.forward`."""
        x, z = self._in(hidden_states)
        y_forward = self._first(x, z, pad)
        y_backward = _flip(self._second(_flip(x, -1, pad), _flip(z, -1, pad), pad), -1, pad)
        return self._out((y_forward + y_backward) / 2)


class SRMamba(_TwoBranch):
    """MambaMIL's sequence-reordering Mamba.

    A forward branch over the sequence, plus a second branch (own conv1d_b, x_proj_b, dt_proj_b, A_b_log,
    D_b) over the sequence reordered with stride ``rate`` by :func:`stride_reorder` (x and z after the
    shared in_proj, zero-padded), whose output is put back in order and cut to the length;
    out = out_proj(y_forward + y_reordered). ``rate`` defaults to MambaMIL's 10. Other arguments as
    :class:`Mamba` (no direction/window).

    Shapes: hidden_states (batch, length, d_model) → (batch, length, d_model).
    """

    # The fast layers reorder inside the kernels (True), or by copies as the reference layers do (False: the
    # baseline of benchmarks/srmamba.py, set per instance there; the function is the same).
    reorder_in_kernels = True

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", rate: int = 10, **kwargs):
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise ScanArgumentError(f"rate: expected a positive int, got {rate!r}")
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, **kwargs)
        self.rate = rate

    def forward(self, hidden_states: torch.Tensor, pad: PaddedBags | None = None) -> torch.Tensor:
        """hidden_states (batch, length, d_model) → (batch, length, d_model); pad as :meth:`Mamba.forward`
        (each bag reordered alone)."""
        x, z = self._in(hidden_states)
        if self._fast(x) and self.reorder_in_kernels:
            # the fast layers make no reordered copies: the second branch's convolution reads x in place
            # (``causal_conv1d(reorder=rate)``), both branches scan without the gate, and one pass restores the
            # second, adds the first and applies the gate they share (``restore_add_gate``); padded or packed
            # bags are handed to both as ``bags`` (each bag reordered alone), the scan gets their reordered layout
            bags, pad_r = (None, None) if pad is None else pad.reorder_bags(self.rate)
            y_forward = self._first(x, None, pad)
            y_reordered = self._ssm_fast(x, None, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b,
                                         "forward", None, pad_r, reorder=self.rate, bags=bags)
            gate_kw = {} if bags is None else {"bags": bags}
            return self._out(restore_add_gate(y_forward, y_reordered, z, self.rate, **gate_kw))
        y_forward = self._first(x, z, pad)
        if pad is None:
            y_reordered = self._second(stride_reorder(x, self.rate), stride_reorder(z, self.rate))
            return self._out(y_forward + stride_restore(y_reordered, self.rate, x.shape[-1]))
        x_r, pad_r = pad.stride_reorder(x, self.rate)
        z_r, _ = pad.stride_reorder(z, self.rate)
        return self._out(y_forward + pad.stride_restore(self._second(x_r, z_r, pad_r), self.rate))


class AlternatingFlip(nn.Module):
    """Runs layers in turn and reverses the token order after every layer, as LBVim stacks its blocks.

    With local_bidirectional scans this lets information cross window borders in both directions
    across layers. With ``residual=True`` each layer is called as ``layer(hidden, residual)`` and must
    return ``(hidden, residual)`` (Vim's pre-norm block); both are flipped. With ``restore_order`` the
    output is flipped back after an odd number of layers, so token i of the output is token i of the input.

    Shapes: hidden (batch, length, dim) [, residual (batch, length, dim) or None] → the same.
    """

    def __init__(self, layers: Iterable[nn.Module], residual: bool = False, restore_order: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.residual = residual
        self.restore_order = restore_order

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, pad: PaddedBags | None = None):
        """hidden (batch, length, dim) → hidden; or with ``residual=True``, (hidden, residual) → (hidden, residual).

        pad: padded bags (:class:`wsimamba.nn.padding.PaddedBags`): each bag's real tokens are reversed
        in place, and every layer is called with ``pad=pad``."""
        if residual is not None and not self.residual:
            raise ScanArgumentError("residual: given, but this AlternatingFlip was built with residual=False")
        extra = {} if pad is None else {"pad": pad}
        for layer in self.layers:
            if self.residual:
                hidden, residual = layer(hidden, residual, **extra)
                residual = _flip(residual, 1, pad) if residual is not None else None
            else:
                hidden = layer(hidden, **extra)
            hidden = _flip(hidden, 1, pad)
        if self.restore_order and len(self.layers) % 2:
            hidden = _flip(hidden, 1, pad)
            residual = _flip(residual, 1, pad) if residual is not None else None
        return (hidden, residual) if self.residual else hidden
