"""Images per second of the Mamba vision backbones, inference and training step, against DeiT-Ti.

Each backbone (full size, random init, 1000-class head) runs on random images: forward in eval mode
under inference_mode, and a training step (forward, cross-entropy, backward, AdamW step). One warm-up,
then the median of `--repeats` timed batches. The baseline is timm's DeiT-Ti (`vit_tiny_patch16_224`,
5.7M parameters, the baseline the Vim paper compares Vim-Ti with), measured in the same process;
ratios are images/s of the backbone over images/s of DeiT-Ti.

    python benchmarks/vision.py                     # CPU, 64-px images, batch 8, reference scan
    python benchmarks/vision.py --gpu               # CUDA, 224 px, batch 64, bf16 autocast,
                                                    # backend="reference" and backend="triton" in turn

Prints one JSON object (and writes it to --json when given).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

from _device import device_name, forward_and_train_seconds, report  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("vim_tiny", "lbvim_tiny", "vmamba_tiny", "resvmamba_small")
BASELINE = "deit_tiny"


def _build(name: str, size: int, backend: str):
    if name == BASELINE:
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size)
    from wsimamba.models.vision import create_backbone

    kw = {"backend": backend}
    if name in ("vim_tiny", "lbvim_tiny"):
        kw["img_size"] = size  # the position embedding at the benchmark's grid, no interpolation
    return create_backbone(name, **kw)


def measure(name: str, backend: str, args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = _build(name, args.size, backend).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    fwd, train = forward_and_train_seconds(model, x, y, args.repeats, device)
    out = {
        "backend": backend if name != BASELINE else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_images_per_s": args.batch / statistics.median(fwd),
        "train_images_per_s": args.batch / statistics.median(train),
        "forward_seconds": fwd, "train_seconds": train,
    }
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del model
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, 224 px, bf16 autocast, reference vs triton")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated; the baseline {BASELINE} always runs")
    ap.add_argument("--size", type=int, help="image side (default 64 on CPU, 224 with --gpu)")
    ap.add_argument("--batch", type=int, help="images per batch (default 8 on CPU, 64 with --gpu)")
    ap.add_argument("--backends", help="scan backends to compare (default: reference on CPU, reference,triton with --gpu)")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per measurement (median), after one warm-up")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    args.size = args.size or (224 if args.gpu else 64)
    args.batch = args.batch or (64 if args.gpu else 8)
    backends = (args.backends or ("reference,triton" if args.gpu else "reference")).split(",")
    if not args.gpu:
        torch.set_num_threads(args.threads)

    base = measure(BASELINE, "-", args, device)
    results = {BASELINE: base}
    for name in args.models.split(","):
        for backend in backends:
            key = f"{name}[{backend}]"
            try:
                r = measure(name, backend, args, device)
            except Exception as err:  # a backend that cannot run here is reported, the rest still run
                results[key] = {"backend": backend, "error": f"{type(err).__name__}: {err}"}
                continue
            r["forward_ratio_to_deit_tiny"] = r["forward_images_per_s"] / base["forward_images_per_s"]
            r["train_ratio_to_deit_tiny"] = r["train_images_per_s"] / base["train_images_per_s"]
            results[key] = r
        ref, tri = results.get(f"{name}[reference]", {}), results.get(f"{name}[triton]", {})
        if "forward_images_per_s" in ref and "forward_images_per_s" in tri:
            results[f"{name}[triton]"]["forward_speedup_over_reference"] = (
                tri["forward_images_per_s"] / ref["forward_images_per_s"])
            results[f"{name}[triton]"]["train_speedup_over_reference"] = (
                tri["train_images_per_s"] / ref["train_images_per_s"])
    out = {
        "benchmark": "vision", "device": device_name(device), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "threads": None if args.gpu else args.threads,
        "precision": "bf16 autocast" if args.gpu else "fp32", "image_size": args.size, "batch": args.batch,
        "repeats": args.repeats, "baseline": f"{BASELINE} (timm vit_tiny_patch16_224, random init)",
        "results": results,
    }
    return report(out, args.json)


if __name__ == "__main__":
    main()
