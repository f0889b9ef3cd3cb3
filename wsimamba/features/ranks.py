"""`wsimamba extract --gpus N`: one extraction process per GPU, started by the command itself.

The split is torchrun's (each process gets `RANK`, `WORLD_SIZE` and `LOCAL_RANK`, takes its share of
the slides with `select_shard` and its own GPU), without torchrun's launcher. The launching process
imports no torch: it starts the ranks at once, shows one progress bar for all of them, and reports one
summary. torchrun's launcher imports torch before it starts the ranks and polls them for their end,
which cost ~2 s of a 30-s two-GPU run on an H200 host (`benchmarks/extract_ranks.py --timeline`).

The ranks report their progress to the launcher as lines on a pipe (`PipeProgress`, fd in
`WSIMAMBA_PROGRESS_FD`): `start N`, `patches N`, and `end {json}` per slide. They print no summary of
their own. Exit code: 0 when every rank succeeded, 130 when interrupted, else 1 (a failed slide, or a
rank that stopped: its remaining slides are then not done, and rerunning the command finishes them).

This module imports no torch.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from wsimamba.errors import WsimambaError
from wsimamba.interrupts import retry_dropped_interrupts

PROGRESS_FD_ENV = "WSIMAMBA_PROGRESS_FD"
STOP_GRACE_S = 30.0  # after an interrupt: how long the ranks get to finish their files before they are killed


def count_gpus() -> int:
    """CUDA devices this process may use, without importing torch where it can: the entries of
    `CUDA_VISIBLE_DEVICES` when it is set (up to the first invalid one, as CUDA reads it), else NVML's
    count; torch's count when NVML cannot be asked."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = 0
        for v in visible.split(","):
            v = v.strip()
            if not v or v.startswith("-"):
                break
            n += 1
        return n
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        count = ctypes.c_uint(0)
        if nvml.nvmlInit_v2() == 0:
            try:
                if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0:
                    return int(count.value)
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):  # no driver library, or one without these symbols
        pass
    import torch

    return torch.cuda.device_count()


def parse_gpus(text: str, device: str) -> int:
    """`--gpus` ('N' or 'all') → the number of rank processes; checks that it can work here."""
    if any(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        raise WsimambaError("--gpus starts its own processes: do not combine it with torchrun (RANK is set)")
    if text == "all":
        n = count_gpus()
        if n < 1:
            raise WsimambaError("--gpus all: no CUDA device found")
    else:
        try:
            n = int(text)
        except ValueError:
            raise WsimambaError(f"--gpus must be a number or 'all', got {text!r}") from None
        if n < 1:
            raise WsimambaError(f"--gpus {text}: need at least 1")
    if device not in ("auto", "cuda", "cpu"):
        raise WsimambaError(f"--gpus {text} gives each process its own GPU: --device must be auto or cuda "
                            f"(or cpu: N processes on the CPU), not {device!r}")
    return n


def strip_option(argv: list[str], name: str) -> list[str]:
    """`argv` without the option `name` and its value (`--name V` or `--name=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


class PipeProgress:
    """A rank's `ExtractProgress`: events as lines on the launcher's pipe. Writing never fails the
    extraction: if the launcher is gone, the events are dropped."""

    def __init__(self, fd: int):
        os.set_inheritable(fd, False)
        self._f = os.fdopen(fd, "w", buffering=1)

    def _send(self, line: str) -> None:
        if self._f is None:
            return
        try:
            self._f.write(line + "\n")
        except (OSError, ValueError):
            self._f = None

    def start(self, n_slides: int) -> None:
        self._send(f"start {n_slides}")

    def slide_start(self, slide_id: str, n_patches: int) -> None:
        pass

    def patches_done(self, n: int) -> None:
        self._send(f"patches {n}")

    def slide_end(self, result) -> None:
        r = result.__dict__
        self._send("end " + json.dumps({k: r.get(k) for k in ("slide_id", "status", "patches", "error")}))

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None


def _interrupt_once(signum, frame) -> None:  # noqa: ARG001
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def interrupt_once() -> None:
    """In a rank: the first SIGINT raises KeyboardInterrupt, later ones are ignored. The launcher passes a
    Ctrl-C on to the ranks 2 s after it (`_stop`), for a rank that did not get it; one that did may still be
    finishing its files then, and a second KeyboardInterrupt there cuts that short and can leave a `.partial`
    file behind (seen once in CI, in `test_ctrl_c_stops_every_rank_cleanly_and_the_rerun_finishes`; not
    reproduced here, this is the one path to it found). A rank that does not finish is still killed after
    `STOP_GRACE_S`, or at a second Ctrl-C.

    The one KeyboardInterrupt must reach the rank's code: if Python drops it in a finalizer (OpenSlide's
    `__del__`, seen in CI), it is raised again (`wsimamba.interrupts`). Main thread only (signal handlers)."""
    retry_dropped_interrupts()
    signal.signal(signal.SIGINT, _interrupt_once)


def pipe_progress() -> PipeProgress | None:
    """This process's `PipeProgress` when it is a rank started by `--gpus`, else None."""
    fd = os.environ.get(PROGRESS_FD_ENV)
    if not fd:
        return None
    try:
        return PipeProgress(int(fd))
    except (ValueError, OSError):
        return None


@dataclass
class RanksReport:
    """What the ranks reported: one dict per slide (`slide_id`, `status`, `patches`, `error`), each
    rank's exit code (negative: killed by that signal), how many slides each announced (None: it
    stopped before) and reported done."""

    slides: list[dict] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    announced: list[int | None] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    interrupted: bool = False

    def stopped(self) -> list[int]:
        """Ranks that ended before reporting all their slides (an error, a crash, a signal)."""
        return [r for r, (a, d) in enumerate(zip(self.announced, self.done)) if a is None or d < a]


class RanksProgress:
    """What the launcher shows: `total(n)` as ranks announce their slides, `patches(n)`, `slide_end(d)`."""

    def total(self, n: int) -> None: ...

    def patches(self, n: int) -> None: ...

    def slide_end(self, slide: dict) -> None: ...


def run_ranks(args: list[str], n: int, progress: RanksProgress | None = None,
              command: Callable[[list[str]], list[str]] | None = None) -> RanksReport:
    """Run `wsimamba <args>` as `n` rank processes (rank r on GPU r) and wait for them.

    `command(args)` gives the program to run (default: this Python, `-m wsimamba`). The ranks share this
    process's stdout and stderr (their error lines pass through) and its process group (a Ctrl-C reaches
    them directly); a SIGTERM to this process is passed on to them."""
    progress = progress or RanksProgress()
    cmd = command(args) if command is not None else [sys.executable, "-m", "wsimamba", *args]
    report = RanksReport(announced=[None] * n, done=[0] * n)
    # each rank's torch CPU threads: its share of the cores (unless the user set it). torch's default,
    # all cores in every rank, oversubscribes them: 4x slower on 2 cores with 2 ranks encoding on the CPU
    threads = max(1, (os.cpu_count() or 1) // n)
    procs: list[subprocess.Popen] = []
    readers: dict[int, int] = {}  # read fd → rank
    buffers: dict[int, bytes] = {}
    sel = selectors.DefaultSelector()
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, frame):  # noqa: ARG001
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    try:
        signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: no forwarding
        previous = None
    try:
        for r in range(n):
            rfd, wfd = os.pipe()
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                   "LOCAL_WORLD_SIZE": str(n), PROGRESS_FD_ENV: str(wfd)}
            env.setdefault("OMP_NUM_THREADS", str(threads))
            try:
                procs.append(subprocess.Popen(cmd, env=env, pass_fds=(wfd,)))
            finally:
                os.close(wfd)
            os.set_blocking(rfd, False)
            readers[rfd] = r
            buffers[rfd] = b""
            sel.register(rfd, selectors.EVENT_READ)

        def handle(rank: int, line: str) -> None:
            kind, _, rest = line.partition(" ")
            try:
                if kind == "start":
                    report.announced[rank] = int(rest)
                    progress.total(int(rest))
                elif kind == "patches":
                    progress.patches(int(rest))
                elif kind == "end":
                    slide = json.loads(rest)
                    report.slides.append(slide)
                    report.done[rank] += 1
                    progress.slide_end(slide)
            except ValueError:  # a garbled line: progress only, the files and the manifest are the record
                pass

        def drain(fd: int) -> bool:
            """Read what is there; False at end of file."""
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    return True
                if not chunk:
                    return False
                data = buffers[fd] + chunk
                *lines, buffers[fd] = data.split(b"\n")
                for line in lines:
                    handle(readers[fd], line.decode("utf-8", "replace"))

        def pump(timeout: float) -> None:
            for key, _ in sel.select(timeout):
                if not drain(key.fd):
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    readers.pop(key.fd)
            for fd, r in list(readers.items()):  # a rank that exited: its pipe may stay open in its children
                if procs[r].poll() is not None:
                    drain(fd)
                    sel.unregister(fd)
                    os.close(fd)
                    readers.pop(fd)

        try:
            while readers or any(p.poll() is None for p in procs):
                pump(0.2)
                if not readers:
                    for p in procs:
                        p.wait()
        except KeyboardInterrupt:
            report.interrupted = True
            _stop(procs, pump)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for fd in list(readers):
            sel.unregister(fd)
            os.close(fd)
        sel.close()
        for p in procs:  # never leave a rank behind
            if p.poll() is None:
                p.kill()
                p.wait()
    report.codes = [p.returncode for p in procs]
    return report


def _stop(procs: list[subprocess.Popen], pump) -> None:
    """After a Ctrl-C (which the ranks received too): give them `STOP_GRACE_S` to finish the files of
    slides already embedded, pass the interrupt on to any that did not get it, then kill what is left."""
    now = time.monotonic()
    deadline, forward_at = now + STOP_GRACE_S, now + 2.0
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        try:
            pump(0.2)
        except KeyboardInterrupt:
            break  # a second Ctrl-C: stop now
        if forward_at is not None and time.monotonic() > forward_at:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            forward_at = None
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
