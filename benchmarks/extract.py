"""Patches per second of `wsimamba extract`, against a naive loop in the same process.

The naive loop is what a first script does: for every patch of the same grid, one OpenSlide
`read_region` at level 0, a PIL resize, and the plain encoder (no BatchNorm folding, default
memory layout, fp32) on a batch of one. Both paths use the same
slides, grid, encoder and device; the synthetic cohort is written to a temporary folder first.

    python benchmarks/extract.py                       # CPU, resnet50-trunc, small cohort
    python benchmarks/extract.py --device cuda --slides 4 --size 16384 --workers 8 --batch-size 256

Prints one JSON line with both rates and their ratio (and writes it to --json when given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _device import device_name  # benchmarks/ is on sys.path when a script here runs




def naive_loop(slide_paths, cfg, encoder, device, max_patches: int | None) -> tuple[int, float]:
    """One read_region per patch at level 0, the plain model on a batch of one. Returns (patches, seconds)."""
    from wsimamba.slide.reader import open_slide
    from wsimamba.slide.tiling import make_grid
    from wsimamba.slide.tissue import TissueParams, detect_tissue

    mean = torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=device).view(1, 3, 1, 1)
    n = 0
    t0 = time.perf_counter()
    for path in slide_paths:
        with open_slide(path) as slide:
            grid = make_grid(slide, detect_tissue(slide, TissueParams()), cfg.target_mpp, cfg.patch_size,
                             cfg.overlap, cfg.min_tissue)
            osr = slide._osr
            for x, y in grid.coords:
                img = osr.read_region((int(x), int(y)), 0, (grid.patch_size_level0,) * 2).convert("RGB")
                img = img.resize((grid.patch_size,) * 2, Image.BILINEAR)
                x = torch.from_numpy(np.array(img)).to(device).permute(2, 0, 1)[None].float() / 255.0
                with torch.inference_mode():
                    encoder.model((x - mean) / std)
                n += 1
                if max_patches and n >= max_patches:
                    return n, time.perf_counter() - t0
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096, help="slide side in level-0 pixels")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px of the synthetic slides")
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--encoder", default="resnet50-trunc")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--naive-max", type=int, default=0, help="stop the naive loop after this many patches (0: all)")
    ap.add_argument("--cohort", type=Path, default=None, help="reuse slides from this synth folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from wsimamba.config import ExtractConfig
    from wsimamba.features.encoders import create_encoder
    from wsimamba.features.extract import PatchEmbedder, extract_cohort, pick_device
    from wsimamba.slide.synth import synth_cohort

    tmp = Path(tempfile.mkdtemp(prefix="wsimamba-bench-"))
    if args.cohort is None:
        synth_cohort(tmp / "cohort", args.slides, seed=1, size=(args.size, args.size), mpp=args.mpp, size_jitter=0.0)
        slide_dir = tmp / "cohort" / "slides"
    else:
        slide_dir = args.cohort / "slides"
    paths = sorted(slide_dir.glob("*.svs"))
    cfg = ExtractConfig(encoder=args.encoder, random_init=True, target_mpp=args.target_mpp, patch_size=args.patch_size,
                        device=args.device, workers=args.workers, batch_size=args.batch_size, qc=False)
    device = pick_device(cfg.device)

    # warm-up outside the timing: encoder build, cuDNN autotune, first-batch allocations
    embedder = PatchEmbedder(create_encoder(cfg.encoder, random_init=True), device)
    embedder(torch.zeros(min(args.batch_size, 8), args.patch_size, args.patch_size, 3, dtype=torch.uint8))
    plain = create_encoder(cfg.encoder, random_init=True)
    plain.model.to(device).eval()
    with torch.inference_mode():
        plain.model(torch.zeros(1, 3, args.patch_size, args.patch_size, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()

    t0 = time.perf_counter()
    results = extract_cohort(paths, tmp / "features", cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_fast = time.perf_counter() - t0
    n_fast = sum(r.patches for r in results if r.status == "ok")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise SystemExit(f"extraction failed: {failed[0].error}")

    n_naive, t_naive = naive_loop(paths, cfg, plain, device, args.naive_max or None)
    if device.type == "cuda":
        torch.cuda.synchronize()

    fast_rate = n_fast / t_fast
    naive_rate = n_naive / t_naive
    out = {
        "benchmark": "extract",
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "encoder": args.encoder,
        "slides": len(paths),
        "slide_size": args.size,
        "patch_size": args.patch_size,
        "target_mpp": args.target_mpp,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "patches": n_fast,
        "extract_patches_per_s": round(fast_rate, 1),
        "naive_patches": n_naive,
        "naive_patches_per_s": round(naive_rate, 1),
        "speedup_vs_naive": round(fast_rate / naive_rate, 2),
        "extract_seconds_incl_tissue_and_writing": round(t_fast, 2),
    }
    line = json.dumps(out)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
