"""CPU time of the reference selective scan, forward and forward+backward, against the naive loop.

The baseline is `selective_scan_naive` in the same process: one Python step per token over the full
(batch, dim, length, state) tensors, as a first implementation would write it. It runs only where those
tensors fit (--naive-max-elements). The chunked reference is what the Triton kernel (kernels/) must beat.

    python benchmarks/scan.py                   # default sizes, under ~3 minutes on 2 cores
    python benchmarks/scan.py --quick           # a smoke run, seconds
    python benchmarks/scan.py --lengths 2048 8192 --dims 512 --directions forward bidirectional
    python benchmarks/scan.py --bag 50000       # also one 50,000-token bag at dim 1024: time and peak RSS

Prints a Markdown table (and writes the rows as JSON lines to --json when given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import textwrap
import time

import torch

from wsimamba.ops import DIRECTIONS, selective_scan_naive, selective_scan_reference

from _device import device_name  # benchmarks/ is on sys.path when a script here runs




def make_inputs(batch: int, dim: int, length: int, state: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mamba-like fp32 arguments: Δ = softplus(delta + bias) around 0.01–0.1, A = −(1..N), a gate and D."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, state, length, generator=g),
        C=torch.randn(batch, state, length, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.full((dim,), -3.0),
    )


def timed(fn, args: dict, direction: str, backward: bool, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of `repeats` calls, after one untimed warm-up call when `warm_up`."""
    def once():
        inputs = {k: v.detach().requires_grad_(backward) for k, v in args.items()}
        start = time.perf_counter()
        out = fn(**inputs, delta_softplus=True, direction=direction)
        if backward:
            out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    if warm_up:
        once()
    return statistics.median(once() for _ in range(repeats))


BAG_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time, torch
    from wsimamba.ops import selective_scan_reference
    torch.set_num_threads(int(sys.argv[3]))
    length, direction = int(sys.argv[1]), sys.argv[2]
    b, d, n = 1, 1024, 16
    g = torch.Generator().manual_seed(0)
    args = dict(u=torch.randn(b, d, length, generator=g), delta=torch.randn(b, d, length, generator=g) * 0.5,
                A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1), B=torch.randn(b, n, length, generator=g),
                C=torch.randn(b, n, length, generator=g), D=torch.ones(d), z=torch.randn(b, d, length, generator=g),
                delta_bias=torch.full((d,), -3.0))
    for t in args.values():
        t.requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = selective_scan_reference(**args, delta_softplus=True, direction=direction)
    forward = time.perf_counter() - start
    out.backward(torch.ones_like(out))
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(forward, total, before * 1024, peak * 1024)
    """
)


def run_bag(length: int, direction: str, threads: int) -> dict:
    """One bag of `length` tokens at dim 1024, state 16, in a fresh process (peak RSS is per process)."""
    done = subprocess.run([sys.executable, "-c", BAG_SCRIPT, str(length), direction, str(threads)],
                          capture_output=True, text=True, check=True)
    forward, total, before, peak = (float(v) for v in done.stdout.split())
    return dict(length=length, direction=direction, forward_s=forward, forward_backward_s=total,
                rss_with_inputs_gib=before / 2**30, peak_rss_gib=peak / 2**30,
                full_state_tensor_gib=1 * 1024 * length * 16 * 4 / 2**30)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=["forward", "local_bidirectional"])
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed reference calls per entry (median), after a warm-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--naive-max-elements", type=float, default=2**24,
                        help="run the naive baseline only where batch·dim·length·state is at most this")
    parser.add_argument("--bag", type=int, default=0, metavar="LENGTH",
                        help="also time one bag of LENGTH tokens at dim 1024 (local_bidirectional) and its peak RSS")
    parser.add_argument("--json", help="append the rows as JSON lines to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.dims, args.repeats = [512, 2048], [256], 1

    torch.set_num_threads(args.threads)
    header = (f"device: {device_name()}, torch {torch.__version__}, {args.threads} thread(s); "
              f"date {datetime.date.today().isoformat()}; batch {args.batch}, state {args.state}, fp32")
    print(header)
    print()
    print("| direction | dim | length | reference fwd (s) | reference fwd+bwd (s) | naive fwd (s) | naive fwd+bwd (s) "
          "| speed-up fwd | speed-up fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for direction in args.directions:
        for dim in args.dims:
            for length in args.lengths:
                inputs = make_inputs(args.batch, dim, length, args.state)
                row = dict(direction=direction, batch=args.batch, dim=dim, length=length, state=args.state,
                           threads=args.threads)
                row["reference_fwd_s"] = timed(selective_scan_reference, inputs, direction, False, args.repeats)
                row["reference_fwd_bwd_s"] = timed(selective_scan_reference, inputs, direction, True, args.repeats)
                if args.batch * dim * length * args.state <= args.naive_max_elements:
                    # the baseline is slow and steady: one call each, after the reference warmed torch up
                    row["naive_fwd_s"] = timed(selective_scan_naive, inputs, direction, False, 1, warm_up=False)
                    row["naive_fwd_bwd_s"] = timed(selective_scan_naive, inputs, direction, True, 1, warm_up=False)
                rows.append(row)
                naive = [row.get("naive_fwd_s"), row.get("naive_fwd_bwd_s")]
                cells = [f"{v:.3f}" if v is not None else "—" for v in naive]
                ratios = [f"{n / r:.1f}×" if n is not None else "—"
                          for n, r in zip(naive, (row["reference_fwd_s"], row["reference_fwd_bwd_s"]))]
                print(f"| {direction} | {dim} | {length} | {row['reference_fwd_s']:.3f} | "
                      f"{row['reference_fwd_bwd_s']:.3f} | {' | '.join(cells)} | {' | '.join(ratios)} |", flush=True)
    if args.bag:
        bag = run_bag(args.bag, "local_bidirectional", args.threads)
        rows.append(dict(bag=True, threads=args.threads, **bag))
        print()
        print(f"bag of {bag['length']} tokens, dim 1024, state 16, local_bidirectional, fwd+bwd: "
              f"forward {bag['forward_s']:.1f} s, forward+backward {bag['forward_backward_s']:.1f} s, "
              f"peak RSS {bag['peak_rss_gib']:.2f} GiB (process with inputs {bag['rss_with_inputs_gib']:.2f} GiB; "
              f"one (batch, dim, length, state) fp32 tensor would be {bag['full_state_tensor_gib']:.2f} GiB)")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(dict(row, device=device_name(), torch=torch.__version__,
                                        date=datetime.date.today().isoformat())) + "\n")


if __name__ == "__main__":
    main()
