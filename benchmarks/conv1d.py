"""The fused causal depthwise conv1d + SiLU (Triton) against PyTorch's `F.conv1d(..., padding=width-1)[..., :L]`
+ `F.silu` (cuDNN on the GPU), forward and forward + backward, in one process.

Times are medians of CUDA-event timings after warm-up, with L2 flushed before every call (a 256 MB write),
so lengths whose tensors fit in L2 are not flattered. GB/s is each implementation's own byte count over
its time (N = batch · dim · length elements of s bytes):

    Triton   forward 2·N·s (read x, write out); forward + backward 5·N·s (+ read x, dout, write dx)
    PyTorch  forward 4·N·s (conv: read x, write y; silu: read y, write out); forward + backward 11·N·s
             (+ silu backward: read dout, y, write dy; conv input grad: read dy, write dx; weight grad: read x, dy)

and `floor_ms` is the Triton byte count at the measured device-to-device copy bandwidth.

    python benchmarks/conv1d.py                          # dim 1024, bf16, width 4, L 10k / 50k / 200k, batch 1
    python benchmarks/conv1d.py --seq-bag 1000           # Triton also with seq_idx (bags of 1000 packed)
    python benchmarks/conv1d.py --sweep '[{"fwd": {"BLOCK_D": 32, "BLOCK_L": 128}}]'   # tile configs, largest L
    python benchmarks/conv1d.py --device cpu --small     # smoke test: the reference (CPU), perf_counter

Prints one JSON object (device, date, versions, rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _device import device_name  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="dim 64, lengths 1000 and 4000: a smoke test")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--lengths", default="10000,50000,200000")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq-bag", type=int, default=0, help="also time the Triton kernel with seq_idx, bags of this length")
    ap.add_argument("--sweep", default=None,
                    help="JSON list of {fwd: {BLOCK_D, BLOCK_L, HALO, num_warps}, bwd: {...}} (the kernel's TILE_OVERRIDE), "
                         "timed at the largest length after the default tiles")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON object here")
    args = ap.parse_args(argv)
    if args.small:
        args.dim, args.lengths = 64, "1000,4000"
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    return args


class Timer:
    """Median milliseconds of `fn`: CUDA events around each call with L2 flushed first, or perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.repeats = warmup, repeats
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float | None:
    """Device-to-device copy, bytes read + written per second (CUDA only)."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / (timer(lambda: y.copy_(x)) * 1e-3)


def torch_conv_silu(x, weight, bias):
    width = weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]])


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (use --device cpu --small)")
    from wsimamba.ops import causal_conv1d

    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    # Triton compiles for CUDA only; on the CPU the op's auto backend is the reference
    ours_backend = "triton" if device.type == "cuda" else "reference"
    timer = Timer(device, args.warmup, args.repeats)
    bw = copy_bandwidth(device, timer)
    s = torch.tensor([], dtype=args.dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)
    rows = []

    def record(impl, op, length, ms, nbytes, **extra):
        n = args.batch * args.dim * length
        row = dict(impl=impl, op=op, batch=args.batch, dim=args.dim, length=length, width=args.width, ms=round(ms, 4),
                   bytes=nbytes, gb_s=round(nbytes / (ms * 1e-3) / 1e9, 2), **extra)
        if bw is not None and impl.startswith("triton"):
            row["floor_ms"] = round((2 if op == "fwd" else 5) * n * s / bw * 1e3, 4)
            from wsimamba.kernels import conv1d as kc

            row["kernels"] = {k: dict(v) for k, v in kc.KERNEL_RESOURCES.items()}
        rows.append(row)
        print(f"{impl:<16} {op:<8} L={length:<7} {ms:9.4f} ms {row['gb_s']:8.1f} GB/s"
              + (f"  floor {row['floor_ms']:.4f} ms" if "floor_ms" in row else "")
              + (f"  x{extra['speedup']} vs torch" if "speedup" in extra else "")
              + (f"  tiles {extra['tiles']}" if "tiles" in extra else ""), file=sys.stderr, flush=True)

    def time_pair(fn, x, w, b):
        with torch.no_grad():
            fwd = timer(lambda: fn(x, w, b))
        xs, ws, bs = (t.detach().requires_grad_(True) for t in (x, w, b))
        dout = torch.randn(x.shape, device=device, generator=g).to(x.dtype)
        fwd_bwd = timer(lambda: torch.autograd.grad(fn(xs, ws, bs), (xs, ws, bs), dout))
        return fwd, fwd_bwd

    for length in args.lengths:
        n = args.batch * args.dim * length
        x = torch.randn(args.batch, args.dim, length, device=device, generator=g).to(args.dtype)
        w = (torch.randn(args.dim, 1, args.width, device=device, generator=g) / args.width ** 0.5).to(args.dtype)
        b = torch.randn(args.dim, device=device, generator=g).to(args.dtype)
        ours = lambda x_, w_, b_, seq=None: causal_conv1d(x_, w_, b_, seq_idx=seq, backend=ours_backend)  # noqa: E731
        fwd, fwd_bwd = time_pair(ours, x, w, b)
        base_fwd, base_fwd_bwd = time_pair(torch_conv_silu, x, w, b)
        label = "triton" if ours_backend == "triton" else "reference"
        record(label, "fwd", length, fwd, 2 * n * s, speedup=round(base_fwd / fwd, 3))
        record(label, "fwd+bwd", length, fwd_bwd, 5 * n * s, speedup=round(base_fwd_bwd / fwd_bwd, 3))
        record("torch", "fwd", length, base_fwd, 4 * n * s)
        record("torch", "fwd+bwd", length, base_fwd_bwd, 11 * n * s)
        if args.seq_bag:
            seq = (torch.arange(length, device=device) // args.seq_bag).to(torch.int32).expand(args.batch, length)
            fwd, fwd_bwd = time_pair(lambda x_, w_, b_: ours(x_, w_, b_, seq), x, w, b)
            record(f"{label}+seq_idx", "fwd", length, fwd, 2 * n * s, bag=args.seq_bag)
            record(f"{label}+seq_idx", "fwd+bwd", length, fwd_bwd, 5 * n * s, bag=args.seq_bag)
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.sweep and device.type == "cuda":
        from wsimamba.kernels import conv1d as kc

        length = max(args.lengths)
        n = args.batch * args.dim * length
        x = torch.randn(args.batch, args.dim, length, device=device, generator=g).to(args.dtype)
        w = (torch.randn(args.dim, 1, args.width, device=device, generator=g) / args.width ** 0.5).to(args.dtype)
        b = torch.randn(args.dim, device=device, generator=g).to(args.dtype)
        defaults = {name: getattr(kc, name) for name in ("FORWARD", "BACKWARD") if hasattr(kc, name)}
        for tiles in [None] + json.loads(args.sweep):
            kc.TILE_OVERRIDE = {k: v for k, v in tiles.items() if k in ("fwd", "bwd")} if tiles else None
            for name, value in defaults.items():
                setattr(kc, name, (tiles or {}).get(name.lower(), value))
            try:
                fwd, fwd_bwd = time_pair(lambda x_, w_, b_: causal_conv1d(x_, w_, b_, backend="triton"), x, w, b)
            except Exception as err:  # a config that does not compile is reported, not fatal
                print(f"tiles {tiles} failed: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr, flush=True)
                continue
            record("triton", "fwd", length, fwd, 2 * n * s, tiles=tiles or "default")
            record("triton", "fwd+bwd", length, fwd_bwd, 5 * n * s, tiles=tiles or "default")
        kc.TILE_OVERRIDE = None
        for name, value in defaults.items():
            setattr(kc, name, value)

    result = dict(benchmark="conv1d", device=device_name(device), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, triton=triton_version,
                  cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                  dtype=str(args.dtype).removeprefix("torch."), copy_tb_s=round(bw / 1e12, 3) if bw else None,
                  rows=rows)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
