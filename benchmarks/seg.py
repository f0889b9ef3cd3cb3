"""Images per second of the Mamba segmentation networks, inference and training step, against a plain UNet.

Each network (full size, random init, 3 input channels, 2 classes) runs on random images and masks:
forward in eval mode under inference_mode, and a training step (forward, cross-entropy, backward,
AdamW step). One warm-up, then the median of `--repeats` timed batches. The baseline is a plain
convolutional UNet written here (four levels of two 3×3 conv-BatchNorm-ReLU layers at widths
32/64/128/256, max pooling, transposed-conv upsampling, concatenated skips: 1.9M parameters in 2D,
5.6M in 3D), measured in the same process at the same input size; ratios are images/s of the
network over images/s of the UNet of the same dimensionality. `lightm_unet_3d` (and its baseline
`unet_3d`) run on volumes.

    python benchmarks/seg.py                      # CPU, 64-px images / 32³ volumes, batch 2, reference scan
    python benchmarks/seg.py --gpu                # CUDA, 224 px / 128³, batch 16 / 1, bf16 autocast,
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
from torch import nn

from _device import device_name, forward_and_train_seconds, report  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("lightm_unet", "lightm_unet_3d", "msvm_unet", "mhs_vmunet")
BASELINES = {2: "unet_2d", 3: "unet_3d"}


class PlainUNet(nn.Module):
    """The baseline: a plain convolutional UNet. (B, in, *S) → (B, classes, *S), S multiples of 8."""

    def __init__(self, nd: int, in_channels: int = 3, num_classes: int = 2, widths=(32, 64, 128, 256)):
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if nd == 2 else (nn.Conv3d, nn.BatchNorm3d)
        up = nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d
        self.pool = nn.MaxPool2d(2) if nd == 2 else nn.MaxPool3d(2)

        def double(c_in, c_out):
            return nn.Sequential(conv(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True),
                                 conv(c_out, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True))

        self.down = nn.ModuleList(double(c_in, c_out) for c_in, c_out in zip((in_channels, *widths[:-1]), widths))
        self.ups = nn.ModuleList(up(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(len(widths) - 1)))
        self.dec = nn.ModuleList(double(2 * widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = conv(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, dec, skip in zip(self.ups, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def _build(name: str, backend: str) -> tuple[nn.Module, int]:
    if name in BASELINES.values():
        nd = 2 if name == "unet_2d" else 3
        return PlainUNet(nd), nd
    from wsimamba.models.seg import create_segmenter

    nd = 3 if name.endswith("_3d") else 2
    return create_segmenter(name.removesuffix("_3d"), 3, 2, spatial_dims=nd, backend=backend), nd


def measure(name: str, backend: str, args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model, nd = _build(name, backend)
    model = model.to(device)
    size, batch = (args.size, args.batch) if nd == 2 else (args.size_3d, args.batch_3d)
    x = torch.randn(batch, 3, *[size] * nd, device=device)
    y = torch.randint(0, 2, (batch, *[size] * nd), device=device)
    fwd, train = forward_and_train_seconds(model, x, y, args.repeats, device)
    out = {
        "backend": backend if name not in BASELINES.values() else None,
        "input": f"{batch} × 3 × {'×'.join([str(size)] * nd)}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_images_per_s": batch / statistics.median(fwd),
        "train_images_per_s": batch / statistics.median(train),
        "forward_seconds": fwd, "train_seconds": train,
    }
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del model
    return out


def _progress(key: str, r: dict) -> None:
    """One line per measurement as it finishes, so a run cut short still shows what it measured."""
    print(f"# {key}: {r['input']}  forward {r['forward_images_per_s']:.1f} img/s  train {r['train_images_per_s']:.1f} img/s"
          + (f"  peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, 224 px / 128³, bf16 autocast, reference vs triton")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated; the baselines always run")
    ap.add_argument("--size", type=int, help="2D image side (default 64 on CPU, 224 with --gpu)")
    ap.add_argument("--size-3d", type=int, help="3D volume side (default 32 on CPU, 128 with --gpu)")
    ap.add_argument("--batch", type=int, help="2D images per batch (default 2 on CPU, 16 with --gpu)")
    ap.add_argument("--batch-3d", type=int, default=1, help="volumes per batch (default 1)")
    ap.add_argument("--backends",
                    help="scan backends to compare (default: reference on CPU, reference,triton with --gpu)")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per measurement (median), after one warm-up")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    args.size = args.size or (224 if args.gpu else 64)
    args.size_3d = args.size_3d or (128 if args.gpu else 32)
    args.batch = args.batch or (16 if args.gpu else 2)
    backends = (args.backends or ("reference,triton" if args.gpu else "reference")).split(",")
    if not args.gpu:
        torch.set_num_threads(args.threads)

    names = args.models.split(",")
    results = {}
    for nd, base in BASELINES.items():
        if any((n.endswith("_3d")) == (nd == 3) for n in names):
            results[base] = measure(base, "-", args, device)
            _progress(base, results[base])
    for name in names:
        base = results[BASELINES[3 if name.endswith("_3d") else 2]]
        for backend in backends:
            key = f"{name}[{backend}]"
            try:
                r = measure(name, backend, args, device)
            except Exception as err:  # a backend that cannot run here is reported, the rest still run
                results[key] = {"backend": backend, "error": f"{type(err).__name__}: {err}"}
                continue
            r["forward_ratio_to_unet"] = r["forward_images_per_s"] / base["forward_images_per_s"]
            r["train_ratio_to_unet"] = r["train_images_per_s"] / base["train_images_per_s"]
            results[key] = r
            _progress(key, r)
        ref, tri = results.get(f"{name}[reference]", {}), results.get(f"{name}[triton]", {})
        if "forward_images_per_s" in ref and "forward_images_per_s" in tri:
            tri["forward_speedup_over_reference"] = tri["forward_images_per_s"] / ref["forward_images_per_s"]
            tri["train_speedup_over_reference"] = tri["train_images_per_s"] / ref["train_images_per_s"]
    out = {
        "benchmark": "seg", "device": device_name(device), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "threads": None if args.gpu else args.threads,
        "precision": "bf16 autocast" if args.gpu else "fp32", "image_size": args.size, "volume_size": args.size_3d,
        "batch": args.batch, "batch_3d": args.batch_3d, "repeats": args.repeats,
        "baseline": "plain conv UNet (32/64/128/256, BatchNorm, transposed-conv upsampling), random init, same process",
        "results": results,
    }
    return report(out, args.json)


if __name__ == "__main__":
    main()
