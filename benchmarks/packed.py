"""Batches of small bags: packed into one sequence against one bag at a time and against padding, on a GPU.

For `--bags` bags with lengths uniform in [`--min`, `--max`] patches (1024-d features, d_model 512, bf16
autocast, fast layers), per model, all in one process:

- train: ms to train on all the bags: one step (forward, cross-entropy mean over the bags, backward, fused
  AdamW step) with them ``packed`` (``forward_bags``, one sequence) or ``padded`` (one (B, longest) batch
  with ``lengths``; both build their batch inside the step), against a step per bag as
  ``train.batch_size=1`` trains (``one-by-one``), and the same replayed from MILModule's CUDA graphs of
  length buckets (``one-by-one+graphs``, `wsimamba.train.graphs.BagGraphs`, captured in the warm-ups);
- predict: ms per batch of inference (no gradient) over the same bags: packed, padded, one-by-one.

Median of `--repeats` timings after two warm-ups; ratios are to one-by-one in the same process.
``--srmamba-reorder both`` runs the models built on SRMamba (mambamil) twice, the second time
(``mambamil[copies]``) with ``SRMamba.reorder_in_kernels = False``: the reordering by index gathers, the
baseline of the kernels that read the bags in place.

    python benchmarks/packed.py                     # CUDA
    python benchmarks/packed.py --smoke             # the CPU at tiny sizes (checks the script)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _device import device_name, report  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn, repeats: int, dev: str) -> float:
    """Median ms of `repeats` calls, after two warm-ups."""
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_model(name: str, bags: list[torch.Tensor], labels: torch.Tensor, args, dev: str, label: str = "") -> dict:
    from wsimamba.models.mil import create_model
    from wsimamba.train.graphs import BagGraphs

    torch.manual_seed(0)
    kw = {"d_model": args.d_model}
    if "mamba" in name:
        kw.update(impl="fast" if dev == "cuda" else "reference", d_state=16)
    model = create_model(name, bags[0].shape[1], 2, **kw).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev == "cuda")
    sizes = [b.shape[0] for b in bags]
    bf16 = dev == "cuda"
    graphs = BagGraphs(model, bags[0].new_zeros(bags[0].shape[1]), bags[0].new_ones(bags[0].shape[1]),
                       normalize=False) if dev == "cuda" else None

    def padded():
        """The bags as one (B, longest, D) batch and their lengths, built each step as packing is."""
        return torch.nn.utils.rnn.pad_sequence(bags, batch_first=True), torch.tensor(sizes, device=dev)

    def autocast():
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16)

    def one(b, y, graphed):
        # a function, so that nothing holds this bag's autograd graph when the next bag's CUDA graph is
        # captured (a live graph keeps the parameters' gradient accumulators of an eager step, made on the
        # default stream, and the backward's capture then fails)
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = graphs.logits(b[None]) if graphed else None
            if logits is None:
                logits = model(b[None]).logits
        F.cross_entropy(logits.float(), y[None]).backward()
        opt.step()

    def train(kind):
        def step():
            if kind in ("one-by-one", "one-by-one+graphs"):
                for b, y in zip(bags, labels):
                    one(b, y, kind.endswith("graphs"))
            else:
                opt.zero_grad(set_to_none=True)
                with autocast():
                    out = model.forward_bags(bags) if kind == "packed" else model(*padded())
                F.cross_entropy(out.logits.float(), labels).backward()
                opt.step()
        return step

    def predict(kind):
        @torch.no_grad()
        def run():
            with autocast():
                if kind == "packed":
                    return model.forward_bags(bags).logits
                if kind == "padded":
                    return model(*padded()).logits
                return torch.cat([model(b[None]).logits for b in bags])
        return run

    out = {"train": {}, "predict": {}}
    kinds = ["one-by-one"] + (["one-by-one+graphs"] if graphs is not None else []) + ["packed", "padded"]
    if name == "transmil":
        kinds = ["one-by-one", "packed"]  # (takes neither padded nor packed bags: packed runs them one by one)
    for kind in kinds:
        try:
            out["train"][kind] = round(_timed(train(kind), args.repeats, dev), 3)
        except RuntimeError as err:  # (reported, and the other kinds still run)
            out["train"][kind] = None
            out.setdefault("errors", {})[kind] = str(err).splitlines()[0]
            print(f"{label or name} train {kind}: {out['errors'][kind]}", file=sys.stderr, flush=True)
            if dev == "cuda":
                torch.cuda.synchronize()
            continue
        print(f"{label or name} train {kind}: {out['train'][kind]:.2f} ms", file=sys.stderr, flush=True)
    if graphs is not None:
        out["graphs_replays"] = graphs.replays
        graphs.clear()
    for kind in [k for k in kinds if "graphs" not in k]:
        out["predict"][kind] = round(_timed(predict(kind), args.repeats, dev), 3)
        print(f"{label or name} predict {kind}: {out['predict'][kind]:.2f} ms", file=sys.stderr, flush=True)
    for part in ("train", "predict"):
        base = out[part]["one-by-one"]
        out[part + "_ratio_to_one_by_one"] = {k: round(v / base, 3) for k, v in out[part].items() if v is not None}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="abmil,mambamil,lbmambamil")
    ap.add_argument("--bags", type=int, default=32)
    ap.add_argument("--min", type=int, default=200, help="fewest patches in a bag")
    ap.add_argument("--max", type=int, default=4000, help="most patches in a bag")
    ap.add_argument("--in-dim", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="the CPU at tiny sizes")
    ap.add_argument("--srmamba-reorder", choices=("kernels", "copies", "both"), default="kernels",
                    help="SRMamba's reordering for mambamil: in the kernels, by copies, or both in turn")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.bags, args.min, args.max, args.in_dim, args.d_model, args.repeats = 4, 20, 90, 32, 16, 2
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --smoke)")
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(args.min, args.max + 1, (args.bags,), generator=g).tolist()
    bags = [torch.randn(n, args.in_dim, generator=g).to(dev) for n in sizes]
    labels = (torch.arange(args.bags) % 2).to(dev)
    out = {"benchmark": "packed", "device": device_name(dev), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "bags": args.bags, "patches": sum(sizes), "longest": max(sizes),
           "range": [args.min, args.max], "in_dim": args.in_dim, "d_model": args.d_model,
           "precision": "bf16-autocast" if dev == "cuda" else "fp32", "models": {}}
    from wsimamba.nn import SRMamba

    modes = ("kernels", "copies") if args.srmamba_reorder == "both" else (args.srmamba_reorder,)
    for name in (m for m in args.models.split(",") if m):
        for mode in modes if name == "mambamil" else ("kernels",):
            SRMamba.reorder_in_kernels = mode == "kernels"
            key = name if mode == "kernels" else f"{name}[copies]"
            out["models"][key] = run_model(name, bags, labels, args, dev, key)
            if dev == "cuda":
                torch.cuda.empty_cache()  # the model and its optimiser went with run_model's return
    SRMamba.reorder_in_kernels = True
    return report(out, args.json)


if __name__ == "__main__":
    main()
