"""SRMamba (MambaMIL's mixer) reordering inside the kernels against reordering by copies, on a GPU.

Both are the fast layers with the same parameters, in one process, timed in turns (A B A B …):

- ``kernels``: the second branch's convolution reads x in place (``causal_conv1d(reorder=rate)``), both
  branches scan without the gate, and ``restore_add_gate`` restores, adds and gates in one pass;
- ``copies``: ``SRMamba.reorder_in_kernels = False``, the fast layers as they were before (``stride_reorder``
  copies of x and z, gated scans, a ``stride_restore`` copy and an add).

Figures: ``block``, one SRMamba(512) layer (d_inner 1024, rate 10), forward + backward of a (1, L, 512) input
under bf16 autocast, ms; ``step``, a mambamil training step (benchmarks/train.py's: 1024-d features, d_model
512, two layers, cross-entropy, AdamW) at each bag size, bf16 autocast and fp32, ms; ``peak_gib``, the peak
memory of the bf16 step; ``conv``, the second branch's convolution alone, forward + backward with the
gradients of x, weight and bias as in the layer (bf16, d_inner channels read in place from a wider buffer),
reading x in place against the conv of a ``stride_reorder`` copy and against the plain conv of x (no
reordering); ``gate``, the block's end alone, forward + backward:
``restore_add_gate`` against the ``stride_restore`` copy and add the copies path runs there (whose gates are
inside its scans, not timed there); ``bags``, the layer on a batch of bags, 32 packed in one sequence and
8 padded to 10,000 (``bag_figures``), the bags read in place (``bags=``) against the index gathers. Each figure
is the median over `--turns` turns of the mean of `--calls` calls.
The outputs and input gradients of the two are compared once per block size (``max_rel``).

    python benchmarks/srmamba.py                 # CUDA
    python benchmarks/srmamba.py --sections bags # only the batches of bags
    python benchmarks/srmamba.py --smoke         # the CPU at tiny sizes (checks the script; the "kernels"
                                                 # side runs the references there)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

import train as train_bench  # benchmarks/train.py (benchmarks/ is on sys.path when a script here runs)
from _device import device_name, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("kernels", "copies")


def _turns(fns: dict, turns: int, calls: int, dev: str) -> dict:
    """{kind: median over `turns` of the mean ms of `calls` calls}, the kinds timed in turns."""
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for _ in range(turns):
        for kind, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[kind].append((time.perf_counter() - t0) * 1e3 / calls)
    return {k: {"ms": round(statistics.median(v), 3), "ms_all": [round(t, 3) for t in v]} for k, v in times.items()}


def _blocks(length: int, dev: str, d_model: int):
    from wsimamba.nn import SRMamba

    torch.manual_seed(0)
    blocks = {k: SRMamba(d_model, impl="fast").to(dev) for k in KINDS}
    blocks["copies"].load_state_dict(blocks["kernels"].state_dict())
    blocks["copies"].reorder_in_kernels = False
    x = torch.randn(1, length, d_model, device=dev)
    r = torch.randn(1, length, d_model, device=dev)
    bf16 = dev == "cuda"

    def run(block):
        xl = x.detach().requires_grad_(True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = block(xl)
        (out.float() * r).sum().backward()
        return out.detach().float(), xl.grad.float()

    return blocks, run


def block_figures(length: int, args, dev: str) -> dict:
    blocks, run = _blocks(length, dev, args.d_model)
    (out_k, dx_k), (out_c, dx_c) = run(blocks["kernels"]), run(blocks["copies"])
    rel = max(((a - b).norm() / b.norm()).item() for a, b in ((out_k, out_c), (dx_k, dx_c)))
    fns = {k: (lambda b=b: run(b)) for k, b in blocks.items()}
    for fn in fns.values():  # warm-up: compilation, allocator
        fn()
    out = _turns(fns, args.turns, args.calls, dev)
    out["max_rel"] = float(f"{rel:.2e}")
    return out


def conv_figures(length: int, args, dev: str) -> dict:
    """The second branch's convolution alone, forward + backward, bf16, d_inner channels of a (1, 2·d_inner, L)
    buffer: reading x in place (``reorder``) against the conv of a ``stride_reorder`` copy, and the plain conv
    of x (no reordering: the floor)."""
    from wsimamba.ops import causal_conv1d, stride_reorder

    dim = 2 * args.d_model
    torch.manual_seed(0)
    xz = torch.randn(1, 2 * dim, length, device=dev, dtype=torch.bfloat16)
    w = torch.randn(dim, 4, device=dev) / 2
    b = torch.randn(dim, device=dev)
    g = torch.randn(1, dim, -(-length // 10) * 10, device=dev, dtype=torch.bfloat16)

    def run(kind):
        # x, weight and bias all need gradients, as in the layer
        leaf, wl, bl = (t.detach().requires_grad_(True) for t in (xz, w, b))
        x = leaf[:, :dim]
        if kind == "in_place":
            out = causal_conv1d(x, wl, bl, reorder=10)
        elif kind == "copy":
            out = causal_conv1d(stride_reorder(x, 10), wl, bl)
        else:
            out = causal_conv1d(x, wl, bl)
        out.backward(g[..., :out.shape[-1]])

    fns = {k: (lambda k=k: run(k)) for k in ("in_place", "copy", "plain")}
    for fn in fns.values():
        fn()
    return _turns(fns, args.turns, args.calls, dev)


def gate_figures(length: int, args, dev: str) -> dict:
    """The block's end alone, forward + backward, bf16, with the incoming gradient laid out as out_proj gives it:
    ``restore_add_gate`` (restore, add, gate in one pass) against ``restore_add``, what the copies path runs
    there (a ``stride_restore`` copy and an add; its gates are inside the two scans, not timed here)."""
    from wsimamba.ops import restore_add_gate, stride_restore

    dim = 2 * args.d_model
    padded = -(-length // 10) * 10
    torch.manual_seed(0)
    y = torch.randn(1, dim, length, device=dev, dtype=torch.bfloat16)
    yr = torch.randn(1, dim, padded, device=dev, dtype=torch.bfloat16)
    xz = torch.randn(1, 2 * dim, length, device=dev, dtype=torch.bfloat16)
    g = torch.randn(1, length, dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)

    def run(kind):
        leaves = [t.detach().requires_grad_(True) for t in (y, yr, xz)]
        if kind == "restore_add_gate":
            out = restore_add_gate(leaves[0], leaves[1], leaves[2][:, dim:], 10)
        else:
            out = leaves[0] + stride_restore(leaves[1], 10, length)
        out.backward(g)

    fns = {k: (lambda k=k: run(k)) for k in ("restore_add_gate", "restore_add")}
    for fn in fns.values():
        fn()
    return _turns(fns, args.turns, args.calls, dev)


def bag_figures(layout: str, args, dev: str) -> dict:
    """One SRMamba(d_model) layer, forward + backward, bf16 autocast, on a batch of bags: ``packed``, 32 bags of
    500–4,000 patches in one sequence (``PackedBags``, how ``train.batch_size > 1`` runs), or ``padded``, 8
    bags of 2,000–10,000 padded to 10,000 (``PaddedBags``, the ``lengths`` argument and the CUDA-graphed
    steps); kernels (``bags=`` read in place) against copies (the index gathers)."""
    from wsimamba.nn import PackedBags, PaddedBags, SRMamba

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    small = dev == "cpu"
    blocks = {k: SRMamba(args.d_model, impl="fast").to(dev) for k in KINDS}
    blocks["copies"].load_state_dict(blocks["kernels"].state_dict())
    blocks["copies"].reorder_in_kernels = False
    if layout == "packed":
        sizes = torch.randint(5, 40, (4,), generator=gen) if small else torch.randint(500, 4001, (32,), generator=gen)
        x, pad = PackedBags.pack([torch.randn(int(n), args.d_model, device=dev) for n in sizes])
        valid = pad.valid
    else:
        n_max, rows = (37, 3) if small else (10_000, 8)
        lengths = torch.randint(n_max // 5, n_max + 1, (rows,), generator=gen)
        lengths[0] = n_max
        x = torch.randn(rows, n_max, args.d_model, device=dev)
        pad = PaddedBags(lengths.to(dev), n_max)
        valid = pad.valid
    r = torch.randn(x.shape, device=dev) * valid[..., None]

    def run(block):
        xl = x.detach().requires_grad_(True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = block(xl, pad=pad)
        (out.float() * r).sum().backward()
        return (out.detach().float() * valid[..., None]), xl.grad.float()

    (out_k, dx_k), (out_c, dx_c) = run(blocks["kernels"]), run(blocks["copies"])
    rel = max(((a - b).norm() / b.norm()).item() for a, b in ((out_k, out_c), (dx_k, dx_c)))
    fns = {k: (lambda b=b: run(b)) for k, b in blocks.items()}
    for fn in fns.values():
        fn()
    out = _turns(fns, args.turns, args.calls, dev)
    out.update(max_rel=float(f"{rel:.2e}"), tokens=int(valid.sum()), length=int(x.shape[1]), rows=int(x.shape[0]))
    return out


def step_figures(instances: int, bf16: bool, args, dev: str) -> dict:
    steps = {k: train_bench._training_step("mambamil", instances, bf16, "fast" if k == "kernels" else "fast-copies",
                                           in_dim=args.in_dim, d_model=args.d_model) for k in KINDS}
    out = _turns(steps, args.turns, args.calls, dev)
    if dev == "cuda" and bf16:
        for kind, step in steps.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            out[kind]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="10000,50000,200000", help="block: sequence lengths")
    ap.add_argument("--step-instances", default="10000,50000", help="step: bag sizes")
    ap.add_argument("--precisions", default="bf16,fp32", help="step: bf16 (autocast) and/or fp32")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--in-dim", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--sections", default="block,conv,gate,bags,step", help="which figures to make")
    ap.add_argument("--smoke", action="store_true", help="the CPU at tiny sizes (checks the script)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.lengths, args.step_instances, args.turns, args.calls = "97", "61", 2, 1
        args.in_dim, args.d_model = 32, 16
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --smoke)")
    train_bench.DEV = dev
    out = {"benchmark": "srmamba", "device": device_name(dev), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "d_model": args.d_model, "rate": 10, "block": {}, "step": {}}
    out.update(conv={}, gate={}, bags={})
    sections = args.sections.split(",")
    for section, figures in (("block", block_figures), ("conv", conv_figures), ("gate", gate_figures)):
        if section not in sections:
            continue
        for n in (int(v) for v in args.lengths.split(",") if v):
            r = figures(n, args, dev)
            out[section][str(n)] = r
            print(f"{section} {n}: " + ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in r.items() if isinstance(v, dict))
                  + (f", max rel {r['max_rel']}" if "max_rel" in r else ""), file=sys.stderr, flush=True)
    for layout in ("packed", "padded") if "bags" in sections else ():
        r = bag_figures(layout, args, dev)
        out["bags"][layout] = r
        print(f"bags {layout} ({r['rows']} x {r['length']}, {r['tokens']} patches): kernels {r['kernels']['ms']:.3f} ms, "
              f"copies {r['copies']['ms']:.3f} ms, max rel {r['max_rel']}", file=sys.stderr, flush=True)
    for n in (int(v) for v in args.step_instances.split(",") if v) if "step" in sections else ():
        for precision in args.precisions.split(","):
            r = step_figures(n, precision == "bf16", args, dev)
            out["step"][f"{n}/{precision}"] = r
            print(f"step {n} {precision}: kernels {r['kernels']['ms']:.3f} ms, copies {r['copies']['ms']:.3f} ms, "
                  f"ratio {r['copies']['ms'] / r['kernels']['ms']:.3f}", file=sys.stderr, flush=True)
    return report(out, args.json)


if __name__ == "__main__":
    main()
