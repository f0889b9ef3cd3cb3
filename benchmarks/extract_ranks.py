"""Extraction on several GPUs (torchrun, and the command's own `--gpus N`) against one GPU, on the same
cohort in the same run.

All runs are the real command (`python -m wsimamba extract`, `torchrun --nproc-per-node N -m wsimamba
extract`, and `python -m wsimamba extract --gpus N`), timed from launch to exit, so process start, model
build and the last slide's tail are counted for all. Each rank gets `--workers` reader processes of its
own. The cohort is synthetic SVS slides, linked `--repeats` times so that the one-GPU run lasts long
enough to measure.

    python benchmarks/extract_ranks.py --gpus 2                 # ResNet50-trunc, 256 px, native-tile reader
    python benchmarks/extract_ranks.py --gpus 2 --encoder uni --patch-size 256 --repeats 20
    python benchmarks/extract_ranks.py --device cpu --gpus 2 --encoder timm:test_resnet --slides 1 \
        --size 2048 --repeats 4 --workers 0                     # a CPU smoke run of the script itself

Prints one JSON line (device, date, patches/s for 1 and N GPUs, their ratios) and writes it to --json.
`--timeline` runs the commands through `_rank_trace.py` (the same CLI) and adds, per process, when each
step of its start and end happened, in seconds since the command's launch.
The ratio is given twice: from launch to exit, and inside the command (the longest rank's own time,
from the summary line it prints), which leaves out the interpreter's start, the torch import and
torchrun's launcher: fixed costs of several seconds a run that a long cohort amortises.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _device import device_name  # benchmarks/ is on sys.path when a script here runs


TRACE = Path(__file__).with_name("_rank_trace.py")
SUMMARY = re.compile(r"(\d[\d,]*) extracted \(([\d,]+) patches, ([\d,.]+) patches/s\)")


def in_command_seconds(stdout: str) -> float | None:
    """The longest rank's own extraction time, from the summary line each rank prints (its patches
    over its patches/s, timed inside the command: without the interpreter's start, the torch import
    and torchrun's launcher); None when no rank printed one."""
    times = [int(m.group(2).replace(",", "")) / float(m.group(3).replace(",", ""))
             for m in SUMMARY.finditer(stdout) if float(m.group(3).replace(",", "")) > 0]
    return max(times) if times else None


def timelines(stderr: str) -> list[dict]:
    """The `#timeline` lines of `_rank_trace.py`, one per process, in rank order."""
    found = [json.loads(line.split(" ", 1)[1]) for line in stderr.splitlines() if line.startswith("#timeline ")]
    return sorted(found, key=lambda t: t["rank"])


def run_extract(slides: Path, out: Path, args, gpus: int,
                launcher: str = "torchrun") -> tuple[int, float, float | None, list[dict]]:
    """(patches written, wall seconds, seconds inside the command, per-process timelines) of one
    extraction run with `gpus` processes, started by `launcher` (torchrun, or the command's own `--gpus`)."""
    common = ["extract", str(slides), "--out", str(out), "--encoder", args.encoder, "--random-init",
              "--patch-size", str(args.patch_size), "--target-mpp", str(args.target_mpp), "--no-qc",
              "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--reader", args.reader]
    entry = [str(TRACE)] if args.timeline else ["-m", "wsimamba"]
    if gpus == 1:
        cmd = [sys.executable, *entry, *common, "--device", args.device]
    elif launcher == "gpus":
        cmd = [sys.executable, *entry, *common, "--device", "auto" if args.device == "cuda" else args.device,
               "--gpus", str(gpus)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               *entry, *common, "--device", "auto" if args.device == "cuda" else args.device]
    env = {**os.environ, "WSIMAMBA_T0": repr(time.time())}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} … failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} slides failed, first: {failed[0]}")
    readers = sorted({r.get("reader", "") for r in rows})
    inside = in_command_seconds(proc.stdout)
    how = "" if gpus == 1 else f", {launcher}"
    print(f"# {gpus} GPU(s){how}: {len(rows)} slides, readers {readers}, {dt:.1f} s from launch to exit, "
          f"{inside if inside is not None else float('nan'):.1f} s inside the command", file=sys.stderr, flush=True)
    traces = timelines(proc.stderr)
    for t in traces:
        print(f"#   rank {t['rank']}: " + ", ".join(f"{k} {v:.2f}" for k, v in t["steps"].items()),
              file=sys.stderr, flush=True)
    return sum(int(r["patches"]) for r in rows), dt, inside, traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=8192, help="slide side in level-0 pixels")
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px of the synthetic slides")
    ap.add_argument("--repeats", type=int, default=40, help="links to each slide in the cohort")
    ap.add_argument("--encoder", default="resnet50-trunc")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=None, help="reader processes per rank (default: cores / gpus)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--reader", default="auto")
    ap.add_argument("--device", default="cuda", help="cuda (one GPU per rank), or cpu for a smoke run of the script")
    ap.add_argument("--no-own-launcher", action="store_true", help="skip the run with the command's own --gpus N")
    ap.add_argument("--timeline", action="store_true", help="record when each process's steps happened (_rank_trace.py)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus):
        raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA devices")
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 2) // args.gpus)

    from wsimamba.slide.synth import synth_cohort

    tmp = Path(tempfile.mkdtemp(prefix="wsimamba-ranks-"))
    synth_cohort(tmp / "synth", args.slides, seed=3, size=(args.size, args.size), mpp=args.mpp, size_jitter=0.0)
    sources = sorted((tmp / "synth" / "slides").glob("*.svs"))
    cohort = tmp / "cohort"
    cohort.mkdir()
    for r in range(args.repeats):
        for p in sources:
            (cohort / f"{p.stem}_r{r:03d}{p.suffix}").symlink_to(p.resolve())
    warm = tmp / "warm"
    warm.mkdir()
    (warm / sources[0].name).symlink_to(sources[0].resolve())
    run_extract(warm, tmp / "out_warm", args, 1)  # page cache, CUDA/cuDNN/nvJPEG first-use costs on disk

    n1, t1, in1, tl1 = run_extract(cohort, tmp / "out_1", args, 1)
    nn_, tn, inn, tln = run_extract(cohort, tmp / f"out_{args.gpus}", args, args.gpus)
    if nn_ != n1:
        raise SystemExit(f"patch counts differ: {n1} on 1 GPU, {nn_} on {args.gpus}")
    own = None
    if not args.no_own_launcher:
        own = run_extract(cohort, tmp / f"out_{args.gpus}_own", args, args.gpus, launcher="gpus")
        if own[0] != n1:
            raise SystemExit(f"patch counts differ: {n1} on 1 GPU, {own[0]} with --gpus {args.gpus}")
    out = {
        "benchmark": "extract-ranks", "device": device_name(torch.device(args.device)), "gpus": args.gpus,
        "date": datetime.date.today().isoformat(), "encoder": args.encoder, "patch_size": args.patch_size,
        "reader": args.reader, "workers_per_rank": args.workers, "batch_size": args.batch_size,
        "slides": len(list(cohort.iterdir())), "patches": n1,
        "one_gpu_seconds": round(t1, 2), "one_gpu_patches_per_s": round(n1 / t1, 1),
        "n_gpu_seconds": round(tn, 2), "n_gpu_patches_per_s": round(nn_ / tn, 1),
        "speedup": round(t1 / tn, 3),
        # inside the command: each rank's own timing (no interpreter start, torch import, launcher)
        "one_gpu_seconds_inside": round(in1, 2) if in1 else None,
        "n_gpu_seconds_inside": round(inn, 2) if inn else None,
        "speedup_inside": round(in1 / inn, 3) if in1 and inn else None,
    }
    if own is not None:  # the command's own launcher (`--gpus N`): launch to exit only
        out.update(own_launcher_seconds=round(own[1], 2), own_launcher_patches_per_s=round(own[0] / own[1], 1),
                   own_launcher_speedup=round(t1 / own[1], 3))
    if args.timeline:
        out["timeline_one_gpu"], out["timeline_n_gpu"] = tl1, tln
        if own is not None:
            out["timeline_own_launcher"] = own[3]
    line = json.dumps(out)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
