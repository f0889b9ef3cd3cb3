"""Time one forward of several copies of the scan kernels file, each with its own tile override, interleaved.

For the GPU machine. Each variant is `LABEL=OP:PATH:OVERRIDE`, OP `fwd` (unidirectional) or `LB` (window 16), PATH
a copy of kernels/selective_scan.py (`git show REV:kernels/selective_scan.py > /tmp/old.py`), OVERRIDE the JSON
given to that copy's TILE_OVERRIDE. Every variant is timed `--rounds` times, round-robin, with scan_gpu's median
timer, on the same inputs (bf16 u, Δ, z, softplus, as scan_gpu.py):

    python benchmarks/scan_variants.py 1,1024,16,131072 \\
        'now=LB:kernels/selective_scan.py:{}' 'old=LB:/tmp/old.py:{}' 'early=LB:kernels/selective_scan.py:{"seq":{"LATE_NEXT":false}}'

Prints each variant's registers and spills (first round) and its times in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan_gpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help="batch,dim,state,length")
    ap.add_argument("variants", nargs="+", help="LABEL=OP:PATH:OVERRIDE")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    batch, dim, state, length = (int(v) for v in args.shape.split(","))
    mods: dict[str, object] = {}
    variants = []
    for spec in args.variants:
        label, rest = spec.split("=", 1)
        op, path, override = rest.split(":", 2)
        if op not in ("fwd", "LB"):
            raise SystemExit(f"variant {label}: op must be fwd or LB, not {op!r}")
        if path not in mods:
            mods[path] = scan_gpu.load_baseline(Path(path), f"scan_variant_{len(mods)}")
        variants.append((label, op, mods[path], json.loads(override)))
    inputs = scan_gpu.make(batch, dim, state, length)
    times: dict[str, list[float]] = {label: [] for label, *_ in variants}
    for r in range(args.rounds):
        for label, op, mod, override in variants:
            mod.TILE_OVERRIDE = override
            mod.FORWARD = "seq"
            kw = dict(delta_softplus=True, direction="forward" if op == "fwd" else "local_bidirectional",
                      window=None if op == "fwd" else 16)
            with torch.no_grad():
                times[label].append(scan_gpu.median_ms(lambda: mod.selective_scan(**inputs, **kw)))
            if r == 0:
                print(label, op, mod.KERNEL_RESOURCES.get("fwd_seq" if op == "fwd" else "fwd_seq_lb"), flush=True)
            mod.TILE_OVERRIDE = None
    print(f"{torch.cuda.get_device_name()}  B{batch} D{dim} N{state} L{length}")
    for label, ts in times.items():
        print(f"{label:24s}", " ".join(f"{t:.4f}" for t in ts), flush=True)


if __name__ == "__main__":
    main()
