"""Seconds per training epoch of MIL aggregators on the same bags: abmil (baseline) vs mambamil vs lbmambamil.

Each model trains through the real path (MILModule + MILDataModule + Lightning Trainer, one bag per step)
on the same synthetic bags (planted witnesses, `in_dim`-wide features like ResNet-50-trunc's 1024);
one warm-up epoch, then the median of `--epochs` timed epochs. Ratios are to abmil, measured in the
same process on the same device.

    python benchmarks/train.py                                  # CPU, small bags (about a minute on 2 cores)
    python benchmarks/train.py --device cuda --bags 64 --instances 8000 --d-model 512

Prints one JSON object (and writes it to --json when given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _device import device_name  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))




def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="abmil,mambamil,lbmambamil")
    ap.add_argument("--bags", type=int, default=16)
    ap.add_argument("--instances", type=int, default=1000, help="patches per bag")
    ap.add_argument("--in-dim", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=128, help="512 is the papers' width")
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--scan-backend", default="auto", help="selective-scan backend of the Mamba models")
    ap.add_argument("--triton-backward", default="auto",
                    help="with the Triton scan: which backward kernels, comma-separated, each Mamba model trained "
                         "once per kind in this process: auto (sequential where it fits) and/or scan "
                         "(results of the scan kind are named MODEL+scan-bwd)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from wsimamba.data.bags import BagDataset, FeatureSource
    from wsimamba.data.labels import read_labels
    from wsimamba.data.synthetic import witness_bags, write_cohort
    from wsimamba.train.datamodule import MILDataModule
    from wsimamba.train.module import MILModule

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    precision = "bf16-mixed" if cuda else "32-true"

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        n = args.instances
        data = witness_bags(args.bags, dim=args.in_dim, instances=(n, n), seed=0)
        feats, labels = write_cohort(tmp, data)
        table = read_labels(labels)
        dataset = BagDataset(FeatureSource(feats), table.slide_ids, table.labels, preload=True)
        results = {}
        runs = []
        for name in args.models.split(","):
            kinds = ["auto"] if name == "abmil" else args.triton_backward.split(",")
            runs += [(name, kind) for kind in kinds]
        for name, kind in runs:
            kw = {"d_model": args.d_model}
            if name != "abmil":
                kw.update(d_state=args.d_state, backend=args.scan_backend)
            if args.triton_backward != "auto":
                from wsimamba.kernels import selective_scan as ks

                ks.BACKWARD = kind
            L.seed_everything(0, verbose=False)
            module = MILModule(name, args.in_dim, 2, kw, lr=1e-4, max_epochs=args.epochs + 1)
            dm = MILDataModule(dataset, list(range(len(dataset))), [], [], seed=0)
            timer = EpochTimer()
            trainer = L.Trainer(max_epochs=args.epochs + 1, accelerator="gpu" if cuda else "cpu", devices=1,
                                precision=precision, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                callbacks=[timer])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer.fit(module, datamodule=dm)
            timed = timer.seconds[1:]
            label = name if kind == "auto" else f"{name}+{kind}-bwd"
            results[label] = {"seconds_per_epoch": statistics.median(timed), "epochs": timed,
                              "parameters": sum(p.numel() for p in module.model.parameters())}
            if cuda:
                results[label]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    base = results.get("abmil", {}).get("seconds_per_epoch")
    for r in results.values():
        r["ratio_to_abmil"] = r["seconds_per_epoch"] / base if base else None
    from wsimamba.ops import list_backends

    backends = list_backends()
    scan = args.scan_backend
    if scan == "auto":  # what backend="auto" picks
        scan = "triton" if cuda and "triton" in backends else "reference"
    out = {
        "benchmark": "train", "device": device_name(args.device), "scan_backend": scan, "threads": args.threads if not cuda else None,
        "precision": precision, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "bags": args.bags, "instances": n, "in_dim": args.in_dim, "d_model": args.d_model, "d_state": args.d_state,
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
