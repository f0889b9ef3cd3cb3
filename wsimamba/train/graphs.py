"""CUDA graphs for MIL training steps: a bag's forward and backward replayed as two graph launches.

At 10,000 patches a Mamba MIL step is bound by the host, not the GPU (kernels/NOTES.md, session 17):
~3 ms of kernels in a ~9 ms step, the rest Python, the autograd engine and ~150 launches. A CUDA graph
replays the recorded kernels with one launch, but only for the shapes it recorded, and every bag has
its own length. So bag lengths are rounded up to buckets (:func:`bucket_length`, 4 per octave: at most
25% padding, ~10% on average) and a bag runs padded to its bucket, through the model's ``lengths``
argument (``MILModel.takes_lengths``), which computes each bag as if alone (wsimamba/nn/padding.py).

:class:`BagGraphs` records a bucket's graph the second time a bag of that bucket comes (a length seen
once is not worth a capture), keeps at most ``max_graphs`` of them, and runs longer bags (above
``max_length``, where the GPU bounds a step and a graph does not pay) and the rest eagerly. The graphs are
``torch.cuda.make_graphed_callables`` of a thin module over the model, sharing one memory pool.

Limits (``MILModule`` checks them, ``graphs_unavailable``): one device (no DDP), one bag per step, no
gradient accumulation (the graphed backward hands autograd its static gradient buffers, which a second
accumulated step would overwrite), not under deterministic algorithms.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

#: at least this many patches per bucket: every length ≤ 128 shares one graph
MIN_BUCKET = 128
#: longer bags run eagerly. Where the GPU, not the host, bounds a step, a graph only adds its padding and
#: the padded path's gathers: lbmambamil, bf16, H200, ms per step graphed / eager: 3.5 / 11.0 at 10k
#: patches, 6.4 / 8.5 at 20k, 9.8 / 9.1 at 30k, 16.4 / 13.7 at 50k (benchmarks/RESULTS.md)
MAX_LENGTH = 24576


def bucket_length(n: int, per_octave: int = 4) -> int:
    """The padded length of a bag of `n` patches: n rounded up to a multiple of 2^(⌊log2 n⌋ − 2) (with 4 per
    octave), at least MIN_BUCKET. Powers of two are bucket ends, so every bucket lies inside one of
    LBMamba's default-window classes (≤ 128, ≤ 256, longer) and its padded run uses the bag's window."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    step = max(1, 1 << max(0, (n - 1).bit_length() - 1 - (per_octave.bit_length() - 1)))
    return -(-n // step) * step


class _Padded(nn.Module):
    """The model on one bucket's static inputs: x (1, length, in_dim) raw features, lengths (1,) → logits."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, normalize: bool):
        super().__init__()
        self.model = model
        self._stats = (mean, std) if normalize else None  # not buffers: read in place, as the module's own

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self._stats is not None:
            mean, std = self._stats
            x = (x - mean.to(x.dtype)) / std.to(x.dtype)
        return self.model(x, lengths).logits


class BagGraphs:
    """Graphed training forward + backward for one bag at a time, by length bucket.

    ``logits(x)`` with x (1, n, in_dim) raw features on the model's CUDA device returns the bag's logits
    (1, n_classes), connected to the model's parameters, from a graph replay; or None when this bag runs
    eagerly (its bucket not seen before, too long, or the graph budget spent). Call it inside the
    training step, in the autocast context the step runs in: the graphs record that precision. Nothing may
    hold an earlier step's autograd graph (its logits or loss) when a bag is captured: with one alive, the
    backward's capture failed with a stream-capture error, presumably because that graph keeps the
    parameters' gradient-accumulator nodes of an eager step, made on the default stream (``MILModule``
    keeps none; benchmarks/packed.py did, in a loop over bags, until each bag's step became a function).
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, normalize: bool = True,
                 max_length: int = MAX_LENGTH, max_graphs: int = 12, per_octave: int = 4):
        self.model, self.mean, self.std, self.normalize = model, mean, std, normalize
        self.max_length, self.max_graphs, self.per_octave = max_length, max_graphs, per_octave
        self.graphs: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}  # bucket → (graphed, x, lengths)
        self.seen: dict[int, int] = {}
        self.replays = 0
        self._pool = None

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() != 3 or x.shape[0] != 1:
            return None
        n = x.shape[1]
        bucket = bucket_length(n, self.per_octave)
        entry = self.graphs.get(bucket)
        if entry is None:
            self.seen[bucket] = self.seen.get(bucket, 0) + 1
            if bucket > self.max_length or self.seen[bucket] < 2 or len(self.graphs) >= self.max_graphs:
                return None
            entry = self.graphs[bucket] = self._capture(x, bucket)
        graphed, static_x, static_n = entry
        static_x[:, :n].copy_(x)  # the padding keeps whatever it held: the model never lets it reach a real patch
        static_n.fill_(n)
        self.replays += 1
        return graphed(static_x, static_n)

    def _capture(self, x: torch.Tensor, bucket: int):
        static_x = torch.zeros(1, bucket, x.shape[2], device=x.device, dtype=x.dtype)
        static_x[:, : x.shape[1]].copy_(x)  # warm-up and capture on a real bag's values
        static_n = torch.full((1,), x.shape[1], device=x.device, dtype=torch.long)
        module = _Padded(self.model, self.mean, self.std, self.normalize)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        device = x.device.type
        # the graph records the step's precision; autocast's weight-cast cache must be off while it records
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device)
        # and the casts an enclosing autocast cached hold autograd nodes made on the default stream, which
        # would join the capture's side stream to it (a capture error): drop them
        torch.clear_autocast_cache()
        with torch.autocast(device, dtype=dtype, enabled=autocast, cache_enabled=False), warnings.catch_warnings():
            # the warm-up runs on a side stream while the parameters' gradient accumulators were made on the
            # default stream by the eager steps before: one extra wait in the warm-up, nothing in the graph
            warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
            graphed = torch.cuda.make_graphed_callables(module, (static_x, static_n), allow_unused_input=True,
                                                        pool=self._pool)
        return graphed, static_x, static_n

    def clear(self) -> None:
        """Drop the graphs and their memory pool."""
        self.graphs.clear()
        self.seen.clear()
        self._pool = None
