"""Patches per second of `wsimamba extract`, against a naive loop in the same process.

The naive loop is what a first script does: for every patch of the same grid, one OpenSlide
`read_region` at level 0, a PIL resize, and the plain encoder (no BatchNorm folding, default
memory layout, fp32) on a batch of one. Both paths use the same
slides, grid, encoder and device; the synthetic cohort is written to a temporary folder first.

    python benchmarks/extract.py                       # CPU, resnet50-trunc, small cohort
    python benchmarks/extract.py --device cuda --slides 4 --size 16384 --workers 8 --batch-size 256

Prints one JSON line with both rates and their ratio (and writes it to --json when given).

Reader comparison (issue 9): `--readers` times the native-tile reader against the OpenSlide
DataLoader path, end to end (read → decode → encode → write), for ResNet50-trunc at 224 and 256 px
and ViT-L/16 (`uni`, random init, 256-px patches resized to 224), plus each encoder alone on
device-resident patches (the ceiling the readers are measured against). `--gpu` is `--readers` on
CUDA with a cohort big enough that every fast-path run lasts at least `--min-seconds`:

    python benchmarks/extract.py --gpu                                   # one GPU, all three configs
    python benchmarks/extract.py --gpu --configs uni --json uni.json     # one config
    python benchmarks/extract.py --readers --device cpu --slides 2 --size 4096 --configs r50-224 \
        --min-seconds 0 --workers 2 --batch-size 16                      # a small CPU run

Prints a table (device, date) and one JSON line per config.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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


READER_CONFIGS = {  # name → (encoder, patch size)
    "r50-224": ("resnet50-trunc", 224),
    "r50-256": ("resnet50-trunc", 256),
    "uni": ("uni", 256),
    "tiny": ("timm:test_resnet", 256),  # a CPU smoke run: reading dominates
}


def read_alone(paths, cfg, device, reader: str, seconds: float) -> float:
    """Patches/s of reading alone (patches on the device, no encoder), over the slides in turn."""
    from torch.utils.data import DataLoader

    from wsimamba.features.extract import PatchDataset
    from wsimamba.features.fastread import TileItems, choose_decoder, decode_item
    from wsimamba.slide.reader import open_slide
    from wsimamba.slide.tiles import plan_tiles
    from wsimamba.slide.tiling import make_grid
    from wsimamba.slide.tissue import TissueParams, detect_tissue

    n, busy = 0, 0.0
    for p in paths:
        with open_slide(p) as slide:
            grid = make_grid(slide, detect_tissue(slide, TissueParams()), cfg.target_mpp, cfg.patch_size, cfg.overlap,
                             cfg.min_tissue)
            plan = plan_tiles(slide, grid) if reader == "tiles" else None
        if plan is not None:
            decoder, _ = choose_decoder(plan, device, "auto")  # extract_cohort does this while preparing
        t0 = time.perf_counter()
        if plan is not None:
            items = TileItems(plan, cfg.batch_size, decoder, cfg.workers, pin=device if device.type == "cuda" else None)
            for item in items:
                n += decode_item(item, plan, device, {}, items.backlog).shape[0]
            items.close()
        else:
            loader = DataLoader(PatchDataset(p, grid, None), batch_size=cfg.batch_size, num_workers=cfg.workers,
                                prefetch_factor=4 if cfg.workers else None)
            for batch in loader:
                n += batch.to(device).shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - t0
        if busy >= seconds:
            break
    return n / max(busy, 1e-9)


def encoder_alone(embedder, patch_size: int, batch_size: int, seconds: float = 5.0) -> float:
    """Patches/s of `PatchEmbedder.embed` (resize, normalise, model) on uint8 patches already on the device."""
    device = embedder.device
    x = torch.randint(0, 256, (batch_size, patch_size, patch_size, 3), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        embedder.embed(x)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        embedder.embed(x)
        n += batch_size
        if n % (4 * batch_size) == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    sync()
    return n / (time.perf_counter() - t0)


def _count_patches(paths, cfg) -> list[int]:
    from wsimamba.slide.reader import open_slide
    from wsimamba.slide.tiling import make_grid
    from wsimamba.slide.tissue import TissueParams, detect_tissue

    counts = []
    for p in paths:
        with open_slide(p) as slide:
            counts.append(len(make_grid(slide, detect_tissue(slide, TissueParams()), cfg.target_mpp, cfg.patch_size,
                                        cfg.overlap, cfg.min_tissue)))
    return counts


def _note(text: str) -> None:
    """A progress line with the time of day, flushed, so a run cut short shows where its time went."""
    print(f"# {time.strftime('%H:%M:%S')} {text}", flush=True)


class _Timeline:
    """Progress events with their times: how long each slide's embedding took (its start to its last
    batch), how long the embedding loop paused between slides (a slide's last batch to the next one's
    first: preparation, reading or finishing files in the way), and the first start to the last end."""

    def __init__(self):
        self.starts: list[float] = []
        self.first_batch: list[float | None] = []
        self.last_batch: list[float | None] = []
        self.ends: list[float] = []

    def start(self, n_slides: int) -> None: ...

    def slide_start(self, slide_id: str, n_patches: int) -> None:
        self.starts.append(time.perf_counter())
        self.first_batch.append(None)
        self.last_batch.append(None)

    def patches_done(self, n: int) -> None:
        t = time.perf_counter()
        if self.first_batch[-1] is None:
            self.first_batch[-1] = t
        self.last_batch[-1] = t

    def slide_end(self, result) -> None:
        if result.status != "skipped":
            self.ends.append(time.perf_counter())

    def summary(self) -> dict:
        embed = [b - s for s, b in zip(self.starts, self.last_batch) if b is not None]
        gaps = [f - b for b, f in zip(self.last_batch[:-1], self.first_batch[1:]) if b is not None and f is not None]
        return {"embed_ms_per_slide": round(1000 * float(np.mean(embed)), 1) if embed else None,
                "wait_ms_between_slides": round(1000 * float(np.mean(gaps)), 1) if gaps else None,
                "first_to_last_s": (self.ends[-1] - self.starts[0]) if self.ends else None}


class _StartTrace:
    """Times of the steps of one `extract_cohort` call that come before its first batch and after its
    last (the run's start and end, which "after start" rates leave out), by wrapping the functions
    that do them while the context is open: {step: seconds since `t0`}. First occurrences only."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.marks: dict[str, float] = {}
        self._undo: list = []

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, round(time.perf_counter() - self.t0, 3))

    def _wrap(self, owner, attr: str, before: str | None, after: str | None) -> None:
        fn = getattr(owner, attr)

        def wrapped(*a, **kw):
            if before:
                self.mark(before)
            out = fn(*a, **kw)
            if after:
                self.mark(after)
            return out

        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, fn))

    def __enter__(self):
        import wsimamba.features.extract as ex
        import wsimamba.features.fastread as fr
        import wsimamba.features.prepare as pr

        self._wrap(fr, "read_pool", None, "decoding pool started")
        self._wrap(ex, "create_encoder", None, "encoder built")
        self._wrap(ex.PatchEmbedder, "__init__", None, "encoder on the device")
        self._wrap(pr.SlidePreparer, "result", None, "first slide prepared")
        self._wrap(ex.PatchEmbedder, "_capture", "graph capture begins", "graph captured")
        self._wrap(fr.DecodeProcesses, "decode", None, "first batch decoded")
        self._wrap(ex.PatchEmbedder, "embed", "first batch embedding", None)
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def compare_readers(args, slide_paths: list[Path], tmp: Path) -> None:
    """Fast path vs OpenSlide loader, per config, on one cohort; prints a table and JSON lines."""
    import shutil

    from wsimamba.config import ExtractConfig
    from wsimamba.features.encoders import create_encoder
    from wsimamba.features.extract import PatchEmbedder, extract_cohort, pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = []
    for name in args.configs.split(","):
        if name not in READER_CONFIGS:
            raise SystemExit(f"--configs: unknown {name!r} (choose from {', '.join(READER_CONFIGS)})")
        enc_name, ps = READER_CONFIGS[name]
        base = dict(encoder=enc_name, random_init=True, target_mpp=args.target_mpp, patch_size=ps, device=args.device,
                    workers=args.workers, batch_size=args.batch_size, qc=False, min_tissue=args.min_tissue)
        embedder = PatchEmbedder(create_encoder(enc_name, random_init=True), device)
        alone = encoder_alone(embedder, ps, args.batch_size, seconds=3.0 if args.min_seconds else 1.0)
        _note(f"{name}: encoder alone {alone:,.0f} patches/s")
        # enough copies of the cohort that the fast path (≈ min(encoder, 15k patches/s)) runs ≥ min_seconds
        per_pass = sum(_count_patches(slide_paths, ExtractConfig(**base)))
        want = args.min_seconds * min(alone, 15000.0)
        repeats = max(1, int(np.ceil(want / max(per_pass, 1))))
        if args.max_repeats:
            repeats = min(repeats, args.max_repeats)
        cohort = tmp / f"cohort_{name}"
        cohort.mkdir(parents=True, exist_ok=True)
        paths = []
        for r in range(repeats):
            for p in slide_paths:
                link = cohort / f"{p.stem}_r{r:03d}{p.suffix}"
                if not link.exists():
                    link.symlink_to(p.resolve())
                paths.append(link)
        _note(f"{name}: cohort of {len(paths)} slide files ({repeats} × {len(slide_paths)}), {per_pass * repeats:,} patches")
        row = {"config": name, "encoder": enc_name, "patch_size": ps, "encoder_alone_patches_per_s": round(alone, 1),
               "slide_files": len(paths)}
        for reader in ("tiles", "openslide"):
            row[f"{reader}_read_alone_patches_per_s"] = round(
                read_alone(paths, ExtractConfig(**base), device, reader, seconds=max(3.0, args.min_seconds / 3)), 1)
            _note(f"{name}: {reader} reading alone {row[f'{reader}_read_alone_patches_per_s']:,.0f} patches/s")
        for reader in ("tiles", "openslide"):
            cfg = ExtractConfig(**base, reader=reader)
            out = tmp / f"features_{name}_{reader}"
            run_paths = paths
            if reader == "openslide" and args.baseline_seconds:
                # the baseline on the first slide files only: as many as its reading-alone rate needs
                # for --baseline-seconds (rates are per patch, so the two stay comparable)
                per_file = per_pass / len(slide_paths)
                want_files = int(np.ceil(args.baseline_seconds * row["openslide_read_alone_patches_per_s"] / per_file))
                run_paths = paths[: max(len(slide_paths), min(len(paths), want_files))]
            extract_cohort(paths[:1], tmp / "warmup", cfg.model_copy(update={"overwrite": True}))  # workers, cuDNN, nvjpeg
            if device.type == "cuda":
                torch.cuda.synchronize()
            timeline = _Timeline()
            t0 = time.perf_counter()
            with _StartTrace(t0) as trace:
                results = extract_cohort(run_paths, out, cfg, progress=timeline)
                trace.mark("returned")
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if timeline.last_batch and timeline.last_batch[-1] is not None:
                trace.marks["first slide starts"] = round(timeline.starts[0] - t0, 3)
                trace.marks["first batch done"] = round(next(b for b in timeline.first_batch if b) - t0, 3)
                trace.marks["last batch done"] = round(timeline.last_batch[-1] - t0, 3)
                trace.marks["last slide written"] = round(timeline.ends[-1] - t0, 3)
            steps = dict(sorted(trace.marks.items(), key=lambda kv: kv[1]))
            row[f"{reader}_start_and_end_s"] = steps
            _note(f"{name}: {reader} start and end (s since the call): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
            failed = [r for r in results if r.status == "failed"]
            if failed:
                raise SystemExit(f"{reader}: extraction failed: {failed[0].slide_id}: {failed[0].error}")
            n = sum(r.patches for r in results)
            readers_used = sorted({r.reader for r in results})
            row[f"{reader}_patches"] = n
            row[f"{reader}_seconds"] = round(dt, 2)
            row[f"{reader}_patches_per_s"] = round(n / dt, 1)
            row[f"{reader}_readers_used"] = readers_used
            row[f"{reader}_slide_files"] = len(run_paths)
            row[f"{reader}_ms_per_slide_file"] = round(1000 * dt / len(run_paths), 1)
            tl = timeline.summary()
            row[f"{reader}_embed_ms_per_slide"] = tl["embed_ms_per_slide"]
            row[f"{reader}_wait_ms_between_slides"] = tl["wait_ms_between_slides"]
            # without the run's start (encoder build, worker processes, the first slide's preparation)
            row[f"{reader}_patches_per_s_after_start"] = round(n / tl["first_to_last_s"], 1)
            _note(f"{name}: {reader} end to end {n:,} patches in {dt:.1f} s = {n / dt:,.0f} patches/s, "
                  f"{1000 * dt / len(run_paths):.0f} ms per slide file ({len(run_paths)} files; embedding "
                  f"{tl['embed_ms_per_slide']} ms, waiting {tl['wait_ms_between_slides']} ms between slides; "
                  f"{n / tl['first_to_last_s']:,.0f} patches/s from the first slide's start), "
                  f"readers {readers_used}")
            if reader == "tiles":
                from wsimamba.features.store import read_features

                _, _, _, attrs = read_features(results[0].output)
                row["tiles_decoder"] = attrs.get("reader_decoder", "")
                row["tiles_layout"] = attrs.get("reader_layout", "")
                counts = [read_features(r.output)[3] for r in results]
                row["tiles_device_batches"] = int(sum(int(a.get("reader_device_batches", 0)) for a in counts))
                row["tiles_cpu_batches"] = int(sum(int(a.get("reader_cpu_batches", 0)) for a in counts))
            shutil.rmtree(out, ignore_errors=True)
        row["speedup"] = round(row["tiles_patches_per_s"] / row["openslide_patches_per_s"], 2)
        row["tiles_vs_encoder_alone"] = round(row["tiles_patches_per_s"] / alone, 3)
        rows.append(row)
        print("# " + json.dumps(row), flush=True)  # each config as it finishes: a run cut short keeps what it measured
        del embedder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"benchmark": "extract-readers", "date": datetime.date.today().isoformat(), "device": device_name(device),
            "tile_processes": os.environ.get("WSIMAMBA_TILE_PROCESSES", "auto"),
            "tile_decoder": os.environ.get("WSIMAMBA_TILE_DECODER", "auto"),
            "cuda_graphs": os.environ.get("WSIMAMBA_CUDA_GRAPHS", "1"),
            "workers": args.workers, "batch_size": args.batch_size, "slide_mpp": args.mpp, "target_mpp": args.target_mpp,
            "slides": len(slide_paths), "slide_size": args.size}
    print(f"# {meta['device']}, {meta['date']}: {len(slide_paths)} synthetic SVS of {args.size}² px at {args.mpp} µm/px, "
          f"target {args.target_mpp} µm/px, workers {args.workers}, batch {args.batch_size}")
    head = (f"{'config':<8} {'decoder/layout':<22} {'tiles p/s':>10} {'openslide p/s':>14} {'speedup':>8} {'encoder alone':>14} "
            f"{'tiles/alone':>11} {'read tiles':>11} {'read openslide':>15} {'patches':>9} {'tiles s':>8} {'openslide s':>11}")
    print(head)
    for r in rows:
        print(f"{r['config']:<8} {r.get('tiles_decoder', '') + '/' + r.get('tiles_layout', ''):<22} "
              f"{r['tiles_patches_per_s']:>10,.1f} {r['openslide_patches_per_s']:>14,.1f} {r['speedup']:>7.2f}x "
              f"{r['encoder_alone_patches_per_s']:>14,.1f} {r['tiles_vs_encoder_alone']:>11.1%} "
              f"{r['tiles_read_alone_patches_per_s']:>11,.1f} {r['openslide_read_alone_patches_per_s']:>15,.1f} {r['tiles_patches']:>9,} "
              f"{r['tiles_seconds']:>8.1f} {r['openslide_seconds']:>11.1f}")
    lines = [json.dumps({**meta, **r}) for r in rows]
    for line in lines:
        print(line)
    if args.json:
        args.json.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=None, help="synthetic slides (default 2; 4 with --gpu)")
    ap.add_argument("--size", type=int, default=None, help="slide side in level-0 pixels (default 4096; 8192 with --gpu)")
    ap.add_argument("--mpp", type=float, default=None, help="level-0 µm/px of the synthetic slides (default 0.25; 0.5 with --gpu)")
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--encoder", default="resnet50-trunc")
    ap.add_argument("--device", default=None, help="default auto; cuda with --gpu")
    ap.add_argument("--workers", type=int, default=None, help="default 2; min(16, cores) with --gpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64; 256 with --gpu")
    ap.add_argument("--naive-max", type=int, default=0, help="stop the naive loop after this many patches (0: all)")
    ap.add_argument("--cohort", type=Path, default=None, help="reuse slides from this synth folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--readers", action="store_true", help="compare the native-tile reader with the OpenSlide loader")
    ap.add_argument("--gpu", action="store_true",
                    help="--readers on CUDA with GPU-sized defaults (4 slides of 8192² px at 0.5 µm/px, all workers, batch 256)")
    ap.add_argument("--configs", default=",".join(READER_CONFIGS), help="comma-separated: " + ", ".join(READER_CONFIGS))
    ap.add_argument("--min-seconds", type=float, default=30.0, help="--readers: cohort repeated until the fast path runs this long")
    ap.add_argument("--min-tissue", type=float, default=0.25)
    ap.add_argument("--max-repeats", type=int, default=0, help="--readers: link each slide at most this many times (0: no cap)")
    ap.add_argument("--baseline-seconds", type=float, default=0.0,
                    help="--readers: run the OpenSlide baseline on only as many slide files as it needs for about "
                         "this long (0: the whole cohort)")
    args = ap.parse_args()
    # defaults that depend on --gpu; a value given on the command line always wins (also one equal to a default)
    if args.gpu:
        args.readers = True
        defaults = dict(device="cuda", workers=min(16, os.cpu_count() or 1), batch_size=256, slides=4, size=8192, mpp=0.5)
    else:
        defaults = dict(device="auto", workers=2, batch_size=64, slides=2, size=4096, mpp=0.25)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from wsimamba.config import ExtractConfig
    from wsimamba.features.encoders import create_encoder
    from wsimamba.features.extract import PatchEmbedder, extract_cohort, pick_device
    from wsimamba.slide.synth import synth_cohort

    tmp = Path(tempfile.mkdtemp(prefix="wsimamba-bench-"))
    if args.cohort is None:
        t0 = time.perf_counter()
        synth_cohort(tmp / "cohort", args.slides, seed=1, size=(args.size, args.size), mpp=args.mpp, size_jitter=0.0)
        if args.readers:
            _note(f"synthetic cohort: {args.slides} slides of {args.size}² px in {time.perf_counter() - t0:.0f} s")
        slide_dir = tmp / "cohort" / "slides"
    else:
        slide_dir = args.cohort / "slides"
    paths = sorted(slide_dir.glob("*.svs"))
    if args.readers:
        compare_readers(args, paths, tmp)
        return
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
