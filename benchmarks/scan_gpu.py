"""The Triton selective scan on a GPU: time, throughput and distance to the two floors.

All in one process: our forward, local-bidirectional (LB) and two-pass bidirectional kernels,
forward and backward; the PyTorch reference at the smallest shape; mamba-ssm's CUDA kernel when it
imports. Floors, measured here: bytes that must move at the measured device-to-device copy
bandwidth, and `state` exponentials per element at the measured exp throughput.

    python benchmarks/scan_gpu.py                  # the issue's shapes, bf16, z + softplus
    python benchmarks/scan_gpu.py --sweep          # also try tile configurations at the largest shape
    python benchmarks/scan_gpu.py --quick          # one shape, for a smoke test
    git show REV:kernels/selective_scan.py > /tmp/old.py
    python benchmarks/scan_gpu.py --baseline /tmp/old.py   # an older version timed beside this one

Prints a table and writes JSON lines to --json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

SHAPES = [(1, 1024, 16, 8192), (1, 1024, 16, 32768), (1, 1024, 16, 131072), (8, 1024, 16, 16384)]


def median_ms(fn, warmup=25, rep=100) -> float:
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


@triton.jit
def _exp_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x0 = tl.load(x_ptr + offs)
    x1, x2, x3 = x0 + 0.1, x0 + 0.2, x0 + 0.3
    for _ in range(ITERS):
        # four independent chains; exp of a value in (-1, 0] keeps them bounded
        x0 = tl.exp(-x0 * 0.5)
        x1 = tl.exp(-x1 * 0.5)
        x2 = tl.exp(-x2 * 0.5)
        x3 = tl.exp(-x3 * 0.5)
    tl.store(out_ptr + offs, x0 + x1 + x2 + x3)


def exp_rate() -> float:
    """Exponentials per second through tl.exp with enough independent work to fill the chip."""
    n, block, iters = 1 << 22, 256, 256
    x = torch.rand(n, device="cuda")
    out = torch.empty_like(x)
    fn = lambda: _exp_kernel[(n // block,)](x, out, ITERS=iters, BLOCK=block)  # noqa: E731
    ms = median_ms(fn)
    return n * iters * 4 / (ms * 1e-3)


def load_baseline(path: Path, name: str = "baseline_selective_scan"):
    """An older copy of kernels/selective_scan.py as a module of its own (`name`), to time in the same process."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make(batch, dim, state, length, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return dict(
        u=r(batch, dim, length).to(dtype),
        delta=(r(batch, dim, length) * 0.5 - 1.0).to(dtype),
        A=-(torch.rand(dim, state, device="cuda", generator=g) * 4 + 0.5),
        B=r(batch, state, length),
        C=r(batch, state, length),
        D=r(dim),
        z=r(batch, dim, length).to(dtype),
        delta_bias=r(dim) * 0.1,
    )


def bytes_floor(batch, dim, state, length, itemsize, backward=False) -> int:
    seq = batch * dim * length
    bc = 2 * batch * state * length * 4
    if not backward:
        return seq * itemsize * 4 + bc  # u, delta, z in; out
    # u, delta, z, dout in; du, ddelta, dz out; B, C in; dB, dC out
    return seq * itemsize * 7 + 2 * bc


def time_direction(fn, args, direction, window, backward):
    kw = dict(delta_softplus=True, direction=direction, window=window)
    if not backward:
        with torch.no_grad():
            return median_ms(lambda: fn(**args, **kw))
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in args.items()}
    out = fn(**leaves, **kw)
    grad = torch.randn_like(out)
    inputs = [v for v in leaves.values() if v.requires_grad]
    fwd_bwd = median_ms(lambda: torch.autograd.grad(fn(**leaves, **kw), inputs, grad))
    with torch.no_grad():
        fwd = median_ms(lambda: fn(**leaves, **kw))
    # the backward alone: forward-with-saving + backward, minus a forward without saving
    return fwd_bwd - fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--window", type=int, default=16, help="LB window (LBMamba's default for L > 256 is 16)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-shapes", action="store_true", help="skip the shape table (sweep only)")
    ap.add_argument("--sweep-shape", default="1,1024,16,131072", help="batch,dim,state,length for --sweep")
    ap.add_argument("--cfgs", default='[{"fwd": {"BLOCK_D": 2, "T": 64}, "bwd": {"BLOCK_D": 8}}]',
                    help="JSON list of {fwd: tiles, bwd: tiles, seq: tiles, bwd_seq: tiles, forward: seq|scan, "
                         "backward: auto|scan, warps_per_sm: n} to try with --sweep")
    ap.add_argument("--shapes", default=None, help="batch,dim,state,length[;...] instead of the issue's four shapes")
    ap.add_argument("--sweep-forward-only", action="store_true", help="--sweep: time the forward passes only")
    ap.add_argument("--sweep-backward-only", action="store_true", help="--sweep: time the backward passes only")
    ap.add_argument("--sweep-ops", default="fwd,LB", help="--sweep: which of fwd (unidirectional) and LB to time")
    ap.add_argument("--memory", action="store_true",
                    help="also report the peak GPU memory of one forward + backward per direction, sequential "
                         "and scan backward, at --sweep-shape")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="an older kernels/selective_scan.py, timed right after this one for every row of the shape "
                         "table (same inputs, same process); rows get its time and the speed-up")
    ap.add_argument("--forwards", default="seq,scan",
                    help="forward kernels to time in the shape table (both in one process): seq, scan")
    args = ap.parse_args()

    from wsimamba.kernels import selective_scan as ks
    from wsimamba.ops.selective_scan import selective_scan_reference

    dev = torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    bw = copy_bandwidth()
    er = exp_rate()
    print(f"device {dev}  date {today}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s   exp throughput {er / 1e12:.2f} T/s")
    records = [dict(kind="floors", device=dev, date=today, copy_tb_s=bw / 1e12, exp_t_s=er / 1e12)]

    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401

        have_mamba = True
    except ImportError:
        have_mamba = False

    def triton_fn(**kw):
        return ks.selective_scan(**kw)

    base = load_baseline(args.baseline) if args.baseline else None
    if base is not None:
        print(f"baseline: {args.baseline}")

    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in part.split(",")) for part in args.shapes.split(";")]
    if args.no_shapes:
        shapes = []
    forwards = args.forwards.split(",")
    rows = []
    for batch, dim, state, length in shapes:
        a = make(batch, dim, state, length)
        elems = batch * dim * length
        item = a["u"].element_size()
        for impl, (label, direction, window), backward in (
                (i, o, bw) for o in (("fwd", "forward", None), ("LB", "local_bidirectional", args.window),
                                     ("bidir", "bidirectional", None)) for bw in (False, True) for i in forwards):
            ks.FORWARD = impl
            t0 = time.perf_counter()
            ms = time_direction(triton_fn, a, direction, window, backward)
            base_ms = None
            if base is not None:
                base.FORWARD = impl
                base_ms = time_direction(lambda **kw: base.selective_scan(**kw), a, direction, window, backward)
            passes = 2 if direction == "bidirectional" else 1
            floor_b = passes * bytes_floor(batch, dim, state, length, item, backward) / bw * 1e3
            floor_e = passes * (1 if not backward else 1) * state * elems / er * 1e3
            rec = dict(kind="triton", device=dev, date=today, shape=f"B{batch} D{dim} N{state} L{length}",
                       op=label if len(forwards) == 1 else f"{label}[{impl}]", forward=impl,
                       pass_="bwd" if backward else "fwd", ms=round(ms, 4),
                       gelem_s=round(elems / (ms * 1e-3) / 1e9, 2),
                       bytes_floor_ms=round(floor_b, 4), exp_floor_ms=round(floor_e, 4),
                       x_bytes_floor=round(ms / floor_b, 2), x_exp_floor=round(ms / floor_e, 2),
                       wall_s=round(time.perf_counter() - t0, 1))
            if base_ms is not None:
                rec.update(baseline_ms=round(base_ms, 4), speedup=round(base_ms / ms, 3))
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        ks.FORWARD = "auto"
        if length <= 8192:
            ref_args = {k: v for k, v in a.items()}
            for backward in (False, True):
                ms = time_direction(selective_scan_reference, ref_args, "local_bidirectional", args.window, backward)
                rec = dict(kind="reference", device=dev, date=today, shape=f"B{batch} D{dim} N{state} L{length}",
                           op="LB", pass_="bwd" if backward else "fwd", ms=round(ms, 3))
                rows.append(rec)
                print(json.dumps(rec), flush=True)
        if have_mamba:
            from wsimamba.ops import selective_scan

            for backward in (False, True):
                fn = lambda **kw: selective_scan(**kw, backend="mamba_ssm")  # noqa: E731
                ms = time_direction(fn, a, "forward", None, backward)
                rec = dict(kind="mamba_ssm", device=dev, date=today, shape=f"B{batch} D{dim} N{state} L{length}",
                           op="fwd", pass_="bwd" if backward else "fwd", ms=round(ms, 4))
                rows.append(rec)
                print(json.dumps(rec), flush=True)
        del a
        torch.cuda.empty_cache()

    if args.memory:
        batch, dim, state, length = (int(v) for v in args.sweep_shape.split(","))
        a = make(batch, dim, state, length)
        base = torch.cuda.memory_allocated()
        for backward_kind in ("auto", "scan"):
            ks.BACKWARD = backward_kind
            for label, direction, window in (("fwd", "forward", None), ("LB", "local_bidirectional", args.window)):
                leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in a.items()}
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                out = triton_fn(**leaves, delta_softplus=True, direction=direction, window=window)
                torch.autograd.grad(out, [v for v in leaves.values() if v.requires_grad], torch.ones_like(out))
                torch.cuda.synchronize()
                rec = dict(kind="memory", device=dev, date=today, shape=f"B{batch} D{dim} N{state} L{length}", op=label,
                           backward="seq" if backward_kind == "auto" else "scan",
                           peak_gib_above_inputs=round((torch.cuda.max_memory_allocated() - base) / 2**30, 3))
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                del out, leaves
        ks.BACKWARD = "auto"
        del a
        torch.cuda.empty_cache()

    if args.sweep:
        batch, dim, state, length = (int(v) for v in args.sweep_shape.split(","))
        a = make(batch, dim, state, length)
        for item in json.loads(args.cfgs):
            ks.TILE_OVERRIDE = {k: item[k] for k in ("fwd", "bwd", "seq", "bwd_seq") if k in item}
            ks.FORWARD = item.get("forward", "auto")
            ks.BACKWARD = item.get("backward", "auto")
            ks.SEQ_WARPS_PER_SM = item.get("warps_per_sm", 16)
            for backward in (False,) if args.sweep_forward_only else (True,) if args.sweep_backward_only else (False, True):
                for label, direction, window in (("fwd", "forward", None), ("LB", "local_bidirectional", args.window)):
                    if label not in args.sweep_ops.split(","):
                        continue
                    t0 = time.perf_counter()
                    try:
                        ms = time_direction(triton_fn, a, direction, window, backward)
                    except Exception as e:  # a config that does not compile or fit is reported, not fatal
                        ms = float("nan")
                        print(f"config {item} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    rec = dict(kind="sweep", shape=f"B{batch} D{dim} N{state} L{length}", op=label,
                               pass_="bwd" if backward else "fwd", cfg=item, ms=round(ms, 4),
                               wall_s=round(time.perf_counter() - t0, 1))
                    if backward and ks.BACKWARD == "auto":
                        rec["bwd_seq_kernel"] = dict(ks.KERNEL_RESOURCES.get("bwd_seq", {}))
                    elif not backward:
                        rec["fwd_seq_kernel"] = dict(ks.KERNEL_RESOURCES.get("fwd_seq_lb" if window else "fwd_seq", {}))
                    print(json.dumps(rec), flush=True)
                    rows.append(rec)
        ks.TILE_OVERRIDE = None
        ks.FORWARD = "auto"
        ks.BACKWARD = "auto"
        ks.SEQ_WARPS_PER_SM = 16

    print("\nshape                    op          pass     ms   Gelem/s  x bytes-floor  x exp-floor")
    for r in rows:
        if r["kind"] == "triton":
            print(f"{r['shape']:<24} {r['op']:<11} {r['pass_']:<4} {r['ms']:8.3f} {r['gelem_s']:8.1f} "
                  f"{r['x_bytes_floor']:10.2f} {r['x_exp_floor']:10.2f}"
                  + (f"   baseline {r['baseline_ms']:.3f} ms, {r['speedup']:.2f}x" if "speedup" in r else ""))
        elif r["kind"] in ("reference", "mamba_ssm"):
            print(f"{r['shape']:<24} {r['op']:<11} {r['pass_']:<4} {r['ms']:8.3f}  ({r['kind']})")
    if args.json:
        with open(args.json, "w") as f:
            for r in records + rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
