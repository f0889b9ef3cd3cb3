"""How many patches per second this machine's CPUs can cut from native JPEG tiles, by process count.

The native-tile pipeline on a GPU host is CPU-bound: every patch is read, decoded and assembled by a
decoding process (`wsimamba.features.decodeprocs`). This measures that work alone, with no GPU, no
encoder and no pipeline: `N` processes each loop over the batches of one synthetic slide (the same
read + decode + assemble as `decode_into`, into a private buffer) for `--seconds`, for each `N` of
`--processes`. The ratio of N processes to one shows how the machine scales (physical cores against
hardware threads, memory bandwidth); the one-process row splits a patch's CPU time into reading,
decoding and assembling.

    python benchmarks/tile_decode.py --processes 1,4,8,12,16 --patch-size 224
    python benchmarks/tile_decode.py --slide some.svs --patch-size 256

Prints one JSON line per process count (patches/s, tiles decoded per patch) and the split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from _device import device_name  # benchmarks/ is on sys.path when a script here runs


def _plan(slide: Path, patch_size: int, target_mpp: float):
    from wsimamba.slide.reader import open_slide
    from wsimamba.slide.tiles import plan_tiles
    from wsimamba.slide.tiling import make_grid
    from wsimamba.slide.tissue import TissueParams, detect_tissue

    with open_slide(slide) as s:
        grid = make_grid(s, detect_tissue(s, TissueParams()), target_mpp, patch_size, 0.0, 0.25)
        return plan_tiles(s, grid)


def _loop(slide: str, patch_size: int, target_mpp: float, batch: int, seconds: float, start_at: float):
    """Worker: batches of the plan, round and round, from `start_at` for `seconds`; (patches, tiles,
    read s, decode s, assemble s)."""
    from wsimamba.slide.tiles import assemble_copies, decode_tile_checked, read_tile_bytes

    plan = _plan(Path(slide), patch_size, target_mpp)
    lv = plan.level
    recipes = [plan.recipe(a, min(len(plan), a + batch)) for a in range(0, len(plan), batch)]
    out = np.empty((batch, plan.read_size, plan.read_size, 3), np.uint8)
    fd = os.open(slide, os.O_RDONLY)
    while time.time() < start_at:  # all processes start together
        time.sleep(0.001)
    n = tiles = 0
    t_read = t_dec = t_asm = 0.0
    t_end = time.perf_counter() + seconds
    k = 0
    while time.perf_counter() < t_end:
        rec = recipes[k % len(recipes)]
        k += 1
        t0 = time.perf_counter()
        raw = read_tile_bytes(fd, slide, lv.page, rec.tiles, lv.offsets[rec.tiles], lv.counts[rec.tiles])
        t1 = time.perf_counter()
        dec = [decode_tile_checked(b, lv.tables, lv.colorspace, slide, lv.page, int(t), rec.tile_w, rec.tile_h)
               for b, t in zip(raw, rec.tiles)]
        t2 = time.perf_counter()
        assemble_copies(dec, rec, out[: len(rec)])
        t3 = time.perf_counter()
        t_read, t_dec, t_asm = t_read + t1 - t0, t_dec + t2 - t1, t_asm + t3 - t2
        n += len(rec)
        tiles += len(rec.tiles)
    os.close(fd)
    return n, tiles, t_read, t_dec, t_asm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=None, help="a slide (default: one synthetic 16384² SVS at 0.5 µm/px)")
    ap.add_argument("--processes", default="1,4,8,12,16")
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    slide = args.slide
    if slide is None:
        from wsimamba.slide.synth import synth_cohort

        tmp = Path(tempfile.mkdtemp(prefix="wsimamba-decode-"))
        synth_cohort(tmp, 1, seed=1, size=(16384, 16384), mpp=0.5, size_jitter=0.0)
        slide = next((tmp / "slides").glob("*.svs"))
    plan = _plan(slide, args.patch_size, args.target_mpp)
    ctx = mp.get_context("spawn")
    rows = []
    base = None
    for n_proc in [int(x) for x in args.processes.split(",")]:
        start_at = time.time() + 2.0 + 0.2 * n_proc  # time for the processes to start and plan
        with ctx.Pool(n_proc) as pool:
            res = pool.starmap(_loop, [(str(slide), args.patch_size, args.target_mpp, args.batch_size, args.seconds,
                                        start_at)] * n_proc)
        n = sum(r[0] for r in res)
        tiles = sum(r[1] for r in res)
        rate = n / args.seconds
        base = base or rate / n_proc
        row = {"benchmark": "tile-decode", "date": datetime.date.today().isoformat(), "device": device_name("cpu"),
               "layout": plan.layout, "patch_size": args.patch_size, "batch_size": args.batch_size,
               "processes": n_proc, "patches_per_s": round(rate, 1), "per_process": round(rate / n_proc, 1),
               "vs_one_process": round(rate / base, 2), "tiles_per_patch": round(tiles / max(n, 1), 3)}
        if n_proc == 1:
            _, _, t_read, t_dec, t_asm = res[0]
            row.update(us_per_patch_read=round(1e6 * t_read / n, 1), us_per_patch_decode=round(1e6 * t_dec / n, 1),
                       us_per_patch_assemble=round(1e6 * t_asm / n, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
