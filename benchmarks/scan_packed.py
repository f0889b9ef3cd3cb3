"""The Triton selective scan with packed sequences (`seq_idx`) against the same input unpacked, on a GPU.

Forward + backward of one row of `--length` positions (d 1024, state 16, bf16 u/Δ/z, fp32 B/C, z and
softplus), plain forward and local_bidirectional (window 16), once unpacked and once cut into
`--sequences` packed sequences starting at multiples of 16; CUDA events, median of 20 after 3 warm-ups,
all in one process. With `--baseline FILE` (an older kernels/selective_scan.py, e.g. from `git show
REV:kernels/selective_scan.py`), that version's unpacked time too, twice in turn with this one's: the
packing's constexpr must leave the unpacked kernels as they were.

    python benchmarks/scan_packed.py
    git show HEAD~1:kernels/selective_scan.py > /tmp/old.py && python benchmarks/scan_packed.py --baseline /tmp/old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _inputs(length: int, dim: int, state: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    return dict(u=r(1, dim, length).bfloat16(), delta=(r(1, dim, length) * 0.5).bfloat16(),
                A=-(torch.rand(dim, state, device="cuda", generator=g) + 0.5), B=r(1, state, length),
                C=r(1, state, length), D=r(dim), z=r(1, dim, length).bfloat16(), delta_bias=r(dim) * 0.3)


def _ms(fn, reps: int = 20) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _step(module, args: dict, **kw):
    leaves = {k: v.detach().requires_grad_(True) for k, v in args.items()}

    def run():
        module.selective_scan(**leaves, delta_softplus=True, **kw).float().sum().backward()

    return run


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="10000,200000")
    ap.add_argument("--sequences", type=int, default=20)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--baseline", type=Path, help="an older kernels/selective_scan.py to time beside this one")
    args = ap.parse_args(argv)
    from wsimamba.kernels import selective_scan as current

    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("scan_baseline", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    rows = []
    for length in (int(v) for v in args.lengths.split(",")):
        x = _inputs(length, args.dim, args.state)
        ids = torch.zeros(1, length, dtype=torch.long, device="cuda")
        every = max(16, length // args.sequences // 16 * 16)
        for s0 in range(every, length, every):
            ids[0, s0:] += 1
        for direction, window in (("forward", None), ("local_bidirectional", 16)):
            kw = dict(direction=direction, window=window)
            row = {"device": torch.cuda.get_device_name(), "length": length, "direction": direction,
                   "sequences": int(ids[0, -1]) + 1}
            for turn in range(2 if base is not None else 1):
                if base is not None:
                    row[f"baseline_ms_{turn}"] = round(_ms(_step(base, x, **kw)), 3)
                row[f"unpacked_ms_{turn}"] = round(_ms(_step(current, x, **kw)), 3)
            row["packed_ms"] = round(_ms(_step(current, x, seq_idx=ids, **kw)), 3)
            row["packed_over_unpacked"] = round(row["packed_ms"] / row["unpacked_ms_0"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
