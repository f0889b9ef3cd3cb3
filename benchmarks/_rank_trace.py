"""`python benchmarks/_rank_trace.py extract ...` runs `wsimamba extract ...` (also as torchrun's script)
and records when each step of the process's start and end happened, in seconds since `WSIMAMBA_T0` (a
`time.time()` set by the launcher; else this script's start): one JSON line on stderr at exit,
prefixed `#timeline`. `extract_ranks.py --timeline` runs its commands through this script; under `--gpus N` the launcher
(rank -1) starts its ranks through it too.

Steps: this script running (after the interpreter's start), torch imported, the CLI and the
extraction modules imported, `extract_cohort` entered, the CUDA device set, the decoding pool started,
the encoder built and on its device, the first slide prepared, the first batch decoded and embedded,
the CUDA graph captured, the last batch embedded, `extract_cohort` returned, the exit begun (before
the interpreter's teardown, or `os._exit`). First occurrences, except the last batch.
"""

from __future__ import annotations

import atexit
import importlib.abc
import json
import os
import sys
import time

T0 = float(os.environ.get("WSIMAMBA_T0", "nan"))
MARKS: dict[str, float] = {}
PID = os.getpid()
LAUNCHER = False  # this process is `extract --gpus N`'s launcher (reported as rank -1)


def mark(name: str, last: bool = False) -> None:
    if last or name not in MARKS:
        MARKS[name] = time.time()


def _wrap(owner, attr: str, before: str | None = None, after: str | None = None, last: bool = False) -> None:
    fn = getattr(owner, attr)

    def wrapped(*a, **kw):
        if before:
            mark(before, last)
        out = fn(*a, **kw)
        if after:
            mark(after, last)
        return out

    setattr(owner, attr, wrapped)


def _report() -> None:
    if "exit begins" in MARKS or os.getpid() != PID:  # once, and not in forked children (DataLoader workers)
        return
    mark("exit begins")
    t0 = T0 if T0 == T0 else MARKS["script running"]
    rank = -1 if LAUNCHER else int(os.environ.get("RANK", "0"))
    steps = {k: round(v - t0, 3) for k, v in sorted(MARKS.items(), key=lambda kv: kv[1])}
    print("#timeline " + json.dumps({"rank": rank, "steps": steps}), file=sys.stderr, flush=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `hooks[name]()` once module `name` is imported, without importing it earlier: the trace
    must not change the order in which the command imports torch and starts its processes."""

    def __init__(self, hooks: dict):
        self.hooks = hooks

    def find_spec(self, name, path=None, target=None):
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        hook, real_exec = self.hooks.pop(name), spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            hook()

        spec.loader.exec_module = exec_module
        return spec


def _trace_extraction() -> None:
    import torch

    import wsimamba.features.extract as ex
    import wsimamba.features.fastread as fr
    import wsimamba.features.prepare as pr

    mark("wsimamba imported")
    _wrap(ex, "extract_cohort", "extract_cohort entered", "extract_cohort returned")
    _wrap(torch.cuda, "set_device", None, "CUDA device set")
    _wrap(fr, "read_pool", None, "decoding pool started")
    _wrap(ex, "create_encoder", None, "encoder built")
    _wrap(ex.PatchEmbedder, "__init__", None, "encoder on the device")
    _wrap(pr.SlidePreparer, "result", None, "first slide prepared")
    _wrap(fr.DecodeProcesses, "decode", None, "first batch decoded")
    _wrap(ex.PatchEmbedder, "embed", "first batch embedding", None)
    _wrap(ex.PatchEmbedder, "embed", None, "last batch embedded", last=True)
    _wrap(ex.PatchEmbedder, "_capture", None, "graph captured")


def main() -> int:
    mark("script running")
    atexit.register(_report)
    sys.meta_path.insert(0, _AfterImport({"torch": lambda: mark("torch imported"),
                                          "wsimamba.features.extract": _trace_extraction}))
    import wsimamba.cli as cli

    if "--gpus" in " ".join(sys.argv):  # the launcher: its ranks run through this script too
        global LAUNCHER
        LAUNCHER = True
        import wsimamba.features.ranks as rk

        real_run = rk.run_ranks

        def run_ranks(args, n, progress=None, command=None):
            mark("ranks starting")
            return real_run(args, n, progress, command=lambda a: [sys.executable, __file__, *a])

        rk.run_ranks = run_ranks
    real_exit = os._exit

    def exit_now(code: int) -> None:  # `wsimamba.cli.entry` skips the interpreter's teardown (and atexit)
        _report()
        real_exit(code)

    os._exit = exit_now
    entry = getattr(cli, "entry", None)  # older code: main() and a normal exit
    if entry is not None:
        entry()
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
