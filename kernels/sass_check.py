"""Read the SASS of the sequential forward's block loop: instruction mix, and waits that ptxas made share a
scoreboard with a global load (kernels/NOTES.md, session 15).

Hopper instructions carry scheduling control bits in their top 23 bits: the stall count, the dependency
barriers (scoreboards, 6 of them) the instruction sets when its result is ready (write) or its sources are read
(read), and the barriers it waits on first. A load sets a write barrier; whatever needs its result waits on it.
ptxas shares barriers between loads, so an FMA that needs a shared-memory read can end up waiting for a global
load issued just before on the same barrier: it then waits for memory. `shared_scoreboard_waits` finds them.

    python -m kernels.sass_check --window 16            # the LB forward at its GPU tiles, compiled for sm_90
    python -m kernels.sass_check --window 0 --consts '{"IN_AHEAD": 2}'

No GPU needed: Triton compiles for sm_90 here and its bundled cuobjdump prints the SASS. The SASS depends on the
Triton version: to read what the GPU machine runs (Triton 3.6 there), put that version first on the path
(`pip download --no-deps triton==3.6.0 -d /tmp/tw && pip install --no-deps --target /tmp/t36 /tmp/tw/*.whl`, then
`PYTHONPATH=/tmp/t36 python -m kernels.sass_check ...`).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

NO_BARRIER = 7


@dataclass
class Instr:
    addr: int
    text: str
    stall: int
    write_barrier: int
    read_barrier: int
    wait_mask: int

    @property
    def op(self) -> str:
        return re.sub(r"^@!?U?P\w+\s+", "", self.text).split()[0]

    def waits_on(self, barrier: int) -> bool:
        return bool(self.wait_mask >> barrier & 1)


_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\*\s*(0x[0-9a-f]{16})\s*\*/")
_HIGH = re.compile(r"^\s+/\*\s*(0x[0-9a-f]{16})\s*\*/")


def parse_sass(text: str) -> list[Instr]:
    """Instructions of cuobjdump's SASS listing: each is a line with address, text and the low 64 bits, then a
    line with the high 64 bits, whose top 23 bits (bits 105-127 of the instruction) are the control bits."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m = _LINE.match(line)
        if not m:
            continue
        hi = _HIGH.match(lines[i + 1])
        if not hi:
            raise ValueError(f"SASS line {i + 1}: no high word after {line.strip()!r}")
        ctrl = int(hi.group(1), 16) >> 41
        out.append(Instr(addr=int(m.group(1), 16), text=m.group(2).strip(), stall=ctrl & 0xF,
                         write_barrier=(ctrl >> 5) & 7, read_barrier=(ctrl >> 8) & 7, wait_mask=(ctrl >> 11) & 0x3F))
    return out


def loop_body(instrs: list[Instr]) -> list[Instr]:
    """The instructions of the longest backward branch's loop (the sequential kernels' block loop)."""
    best = None
    index = {x.addr: k for k, x in enumerate(instrs)}
    for k, x in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", x.text)
        if m and int(m.group(1), 16) in index:
            j = index[int(m.group(1), 16)]
            if j < k and (best is None or k - j > best[1] - best[0]):
                best = (j, k)
    if best is None:
        raise ValueError("no loop (backward branch) in this SASS")
    return instrs[best[0]:best[1] + 1]


def _width(op: str) -> int:
    """Registers a vector access names by its first: 4 for .128, 2 for .64."""
    return 4 if ".128" in op else 2 if ".64" in op else 1


def _dest_registers(x: Instr) -> set[str]:
    m = re.match(r"(?:@!?U?P\w+\s+)?\S+\s+R(\d+)\b", x.text)
    if not m:
        return set()
    return {f"R{int(m.group(1)) + i}" for i in range(_width(x.op))}


def _reads(x: Instr, regs: set[str]) -> bool:
    """Whether x reads one of `regs`. A store's data register names the first of 2 or 4 (.64, .128)."""
    parts = x.text.split(",")[1:] if "," in x.text else []
    read = set()
    for p in parts:
        for m in re.finditer(r"\bR(\d+)\b", p):
            n = _width(x.op) if x.op.startswith("ST") and "[" not in p else 1
            read.update(f"R{int(m.group(1)) + i}" for i in range(n))
    return bool(read & regs)


def shared_scoreboard_waits(body: list[Instr]) -> list[tuple[int, Instr, int, Instr]]:
    """(k, load, distance, waiter) for every global load (LDG) in the loop whose write barrier is waited on by an
    instruction that does not read the load's result, before the first one that does (going round the loop):
    that instruction waits for the global load too. The distance is in instructions."""
    found = []
    n = len(body)
    for k, x in enumerate(body):
        if not x.op.startswith("LDG") or x.op.startswith(("LDGSTS", "LDGDEPBAR")) or x.write_barrier == NO_BARRIER:
            continue
        dst = _dest_registers(x)
        for d in range(1, n):
            y = body[(k + d) % n]
            if _reads(y, dst):
                break
            if y.waits_on(x.write_barrier):
                found.append((k, x, d, y))
                break
    return found


def instruction_mix(body: list[Instr]) -> collections.Counter:
    return collections.Counter(x.op.split(".")[0] for x in body)


def compile_sm90(fn, consts: dict, bf16: set[str]):
    """A Triton kernel of this package compiled for sm_90 without a GPU (Triton's own toolchain): the pointers named
    in `bf16` bf16, the others fp32; pointers, lengths (L, DIM, DPG, SEG_LEN) and row strides (s_*, but the state
    strides s_*n) taken as multiples of 16, as at the GPU defaults. Returns Triton's compiled kernel (`.asm`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in consts else ("*bf16" if p in bf16 else "*fp32") if p.endswith("_ptr") else "i32"
           for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p not in consts and (
        p.endswith("_ptr") or p in ("L", "DIM", "DPG", "SEG_LEN") or (p.startswith("s_") and not p.endswith("n")))}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1))


def compile_forward_sass(window: int, consts: dict | None = None) -> str:
    """SASS of `_fwd_seq_kernel` at its GPU tiles (bf16 u, Δ, z and output; state 16; rows from shared memory; A
    contiguous), compiled for sm_90; `consts` overrides the constexprs."""
    import triton

    from wsimamba.kernels import selective_scan as ks

    c = dict(N=16, BLOCK_D=16, TB=16, STEP=16, WINDOW=window, SAVE_EVERY=1, PREFETCH=bool(window), PREFETCH_BC=False,
             PREFETCH_L1=True, IN_AHEAD=1, LATE_NEXT=True, SUMS_AFTER=True, SHFL_PICK=False, SMEM_ROWS=True,
             HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, SAVE_STATES=False, SAVE_LAST=False, s_An=1)
    c.update(consts or {})
    cubin = compile_sm90(ks._fwd_seq_kernel, c, {"u_ptr", "dt_ptr", "z_ptr", "out_ptr"}).asm["cubin"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=16, help="LB window (0: the plain forward)")
    ap.add_argument("--consts", default="{}", help="JSON of constexprs to override")
    ap.add_argument("--sass", help="read this SASS listing instead of compiling")
    args = ap.parse_args()
    text = open(args.sass).read() if args.sass else compile_forward_sass(args.window, json.loads(args.consts))
    body = loop_body(parse_sass(text))
    mix = instruction_mix(body)
    print(f"block loop: {len(body)} instructions;", ", ".join(f"{op} {n}" for op, n in mix.most_common(14)))
    waits = shared_scoreboard_waits(body)
    print(f"waits sharing a global load's scoreboard: {len(waits)}")
    for k, load, d, waiter in waits:
        print(f"  [{k}] {load.text}  ->  {d} instructions later: {waiter.text}")


if __name__ == "__main__":
    main()
