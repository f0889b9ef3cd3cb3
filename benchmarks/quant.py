"""MambaQuant: accuracy of W8A8 MIL aggregators (float vs naive vs hadamard vs mambaquant) on a synthetic
cohort, and with --gpu the speed of bf16 vs int8 Linear layers at MIL sizes.

Accuracy (CPU is fine): planted-witness bags with a few heavy feature channels (as real encoder features
have), an LBMambaMIL trained with k-fold cross-validation through `train_run`, then `quantize_run` on the
run folder: the same table `wsimamba quantize` writes (mean ± std over folds).

Speed (--gpu): for tokens × (in → out) at MIL sizes, bf16 ``F.linear`` (the baseline, same process and
device) vs the W8A8 path of ``QuantLinear`` (per-token dynamic activation quantization + ``torch._int_mm``
+ rescale) and ``torch._int_mm`` alone; median of CUDA-event timings.

    python benchmarks/quant.py                  # accuracy table on CPU (about 6.5 CPU-minutes: 11 min wall on 2 busy cores)
    python benchmarks/quant.py --gpu --no-accuracy --json quant_gpu.json

Prints one JSON object (and writes it to --json when given).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _device import device_name, report  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def accuracy(args) -> dict:
    from wsimamba.config import TrainConfig, build_config
    from wsimamba.data.synthetic import witness_bags, write_cohort
    from wsimamba.quant.run import quantize_run
    from wsimamba.train.run import train_run

    with tempfile.TemporaryDirectory() as tmp:
        data = witness_bags(args.bags, dim=args.in_dim, instances=(args.instances // 2, args.instances),
                            witness_fraction=(0.05, 0.10), shift=args.shift, seed=0)
        rng = np.random.default_rng(1)
        heavy = rng.choice(args.in_dim, max(1, args.in_dim // 32), replace=False)
        for bag in data.bags:  # outlier feature channels, as encoders produce; train standardises them away
            bag[:, heavy] *= 20.0  # per fold, but a few channels stay heavy-tailed after it
        feats, labels = write_cohort(tmp, data)
        cfg = build_config(TrainConfig, {
            "name": "quantbench", "out": str(Path(tmp) / "runs"),
            "data": {"features": str(feats), "labels": str(labels), "preload": True},
            "model": {"name": "lbmambamil", "d_model": args.d_model, "layers": 2, "d_state": 8},
            "train": {"folds": args.folds, "max_epochs": args.epochs, "lr": 5e-4, "val_fraction": 0,
                      "early_stopping": {"enabled": False}, "seed": 0},
        })
        run = train_run(cfg)
        result = quantize_run(run.run_dir, calib_slides=args.calib_slides, device="cpu")
        return {
            "cohort": {"bags": args.bags, "instances": [args.instances // 2, args.instances], "in_dim": args.in_dim,
                       "heavy_channels": len(heavy), "model": "lbmambamil", "d_model": args.d_model,
                       "folds": args.folds, "epochs": args.epochs, "calib_slides": args.calib_slides},
            "methods": {m: {k: v for k, v in r.items()} for m, r in result.summary["methods"].items()},
            "rows": result.rows,
        }


def _time_cuda(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def speed(args) -> dict:
    import torch.nn.functional as F

    from wsimamba.ops.int8 import int8_linear, quantize_rows
    from wsimamba.quant.quantizers import quantize_weight

    dev = torch.device("cuda")
    out = []
    for tokens in args.tokens:
        for k, n in args.shapes:
            x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            wq, ws = quantize_weight(w.float())
            wq, ws = wq.to(dev), ws.to(dev)
            xq, xs = quantize_rows(x)

            t_bf16 = _time_cuda(lambda: F.linear(x, w), args.repeats)
            t_w8a8 = _time_cuda(lambda: int8_linear(*quantize_rows(x), wq, ws, None, torch.bfloat16), args.repeats)
            t_mm = _time_cuda(lambda: torch._int_mm(xq, wq.t()), args.repeats)
            flops = 2 * tokens * k * n
            out.append({"tokens": tokens, "in": k, "out": n, "bf16_ms": t_bf16 * 1e3, "w8a8_ms": t_w8a8 * 1e3,
                        "int_mm_ms": t_mm * 1e3, "bf16_tflops": flops / t_bf16 / 1e12,
                        "int_mm_tops": flops / t_mm / 1e12, "speedup_w8a8": t_bf16 / t_w8a8,
                        "speedup_int_mm": t_bf16 / t_mm})
    return {"device": device_name(dev), "baseline": "bf16 F.linear, same process", "results": out}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    ap.add_argument("--gpu", action="store_true", help="time bf16 vs int8 Linear layers on CUDA")
    ap.add_argument("--bags", type=int, default=36)
    ap.add_argument("--instances", type=int, default=400)
    ap.add_argument("--in-dim", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--calib-slides", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    ap.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                    default=[(1024, 512), (512, 2048), (512, 1024)],
                    help="in x out pairs: embed / out_proj 1024→512, in_proj 512→2048 (d_model 512), 512→1024")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"benchmark": "quant", "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    if not args.no_accuracy:
        result["accuracy"] = {"device": device_name("cpu"), "threads": args.threads, **accuracy(args)}
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")
        result["speed"] = speed(args)
    return report(result, args.json, default=float)


if __name__ == "__main__":
    main()
