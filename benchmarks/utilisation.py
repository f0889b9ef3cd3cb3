"""Where a command's time goes: whole-machine CPU, per-thread CPU of its process tree, GPU utilisation.

Runs the command, and once a second prints how many cores the machine kept busy, the GPU's
utilisation (nvidia-smi, when there is one) and the busiest threads of the command's processes over
that second (MAIN = the command's main thread; child-… = threads of its child processes). The
command's own output is printed as it comes, prefixed with seconds since the start, so its phases can
be matched to the samples. Linux only (/proc).

    python benchmarks/utilisation.py -- python benchmarks/extract.py --gpu --configs r50-224
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_total() -> tuple[int, int]:
    """(all jiffies, idle jiffies) of the whole machine."""
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(fields), fields[3] + fields[4]


def process_tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return out
    for child in children:
        out += process_tree(int(child))
    return out


def thread_cpu(root: int) -> dict[tuple[int, int], tuple[str, float]]:
    """{(pid, tid): (label, CPU seconds so far)} for every thread of root's process tree."""
    found = {}
    for pid in process_tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in map(int, tids):
            try:
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            if pid != root:
                name = f"child-{name}"
            elif tid == root:
                name = "MAIN"
            found[(pid, tid)] = (name, (int(fields[11]) + int(fields[12])) / HZ)
    return found


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    if not argv:
        print(__doc__)
        return 2
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gpu: list[tuple[float, float]] = []
    try:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                               stdout=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: [gpu.append((time.time() - t0, float(line))) for line in smi.stdout
                                         if line.strip().isdigit()], daemon=True).start()
    except OSError:
        smi = None
    samples: list[tuple[float, float, dict]] = []
    totals: dict = {}

    def sample() -> None:
        prev = cpu_total()
        while proc.poll() is None:
            time.sleep(1.0)
            cur = cpu_total()
            busy = 1 - (cur[1] - prev[1]) / max(1, cur[0] - prev[0])
            prev = cur
            threads = thread_cpu(proc.pid)
            totals.update(threads)
            samples.append((time.time() - t0, busy * os.cpu_count(), threads))

    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        print(f"[{time.time() - t0:6.1f}] {line.rstrip()}", flush=True)
    rc = proc.wait()
    if smi is not None:
        smi.terminate()
    print(f"\n{os.cpu_count()} CPUs. Each second: busy cores (whole machine), GPU utilisation, threads over 5% of a "
          "core, and the busiest threads (cores)")
    prev: dict = {}
    for t, cores, threads in samples:
        used = sorted(((cpu - prev.get(key, (None, 0.0))[1], name) for key, (name, cpu) in threads.items()), reverse=True)
        prev = threads
        g = [u for tg, u in gpu if t - 1 <= tg < t]
        gpu_text = f"{sum(g) / len(g):5.1f}%" if g else "    -"
        top = " ".join(f"{name}:{c:.2f}" for c, name in used[:6])
        print(f"t={t:6.1f}s cores {cores:5.1f}  gpu {gpu_text}  threads>5%: {sum(c > 0.05 for c, _ in used):3d}  {top}")
    by_name = collections.Counter()
    for name, cpu in totals.values():
        by_name[name] += cpu
    print("CPU seconds by thread name (whole run):", {k: round(v, 1) for k, v in by_name.most_common(12)})
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
