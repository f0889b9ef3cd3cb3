"""`wsimamba extract --gpus N`'s launcher (`wsimamba.features.ranks`): ranks, progress, exit codes, errors.
The whole command is tested in test_extract.py (`test_gpus_splits_the_cohort_...`)."""

from __future__ import annotations

import json
import sys

import pytest

from wsimamba.errors import WsimambaError
from wsimamba.features import ranks

# A stand-in rank: reports its environment as its one slide, then behaves as RANK_<r> says.
FAKE_RANK = r"""
import json, os, sys
r = int(os.environ["RANK"])
out = os.fdopen(int(os.environ["WSIMAMBA_PROGRESS_FD"]), "w", buffering=1)
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
mode = sys.argv[1 + r]
if mode == "silent":
    sys.exit(2)  # dies before announcing anything
out.write("start 2\n")
out.write("patches 10\npatches 5\n")
out.write("end " + json.dumps({"slide_id": f"s{r}", "status": "ok", "patches": 15, "error": None, "env": env}) + "\n")
if mode == "crash":
    os._exit(3)  # one of its two slides reported
out.write("garbled line\n")
out.write("end " + json.dumps({"slide_id": f"t{r}", "status": "failed" if mode == "fail" else "ok",
                               "patches": 0, "error": "bad slide" if mode == "fail" else None}) + "\n")
sys.exit(1 if mode == "fail" else 0)
"""


class Events(ranks.RanksProgress):
    def __init__(self):
        self.totals, self.patch_counts, self.ends = [], [], []

    def total(self, n):
        self.totals.append(n)

    def patches(self, n):
        self.patch_counts.append(n)

    def slide_end(self, slide):
        self.ends.append(slide["slide_id"])


def run_fake(modes: list[str], monkeypatch) -> tuple[ranks.RanksReport, Events]:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ev = Events()
    rep = ranks.run_ranks(modes, len(modes), ev, command=lambda args: [sys.executable, "-c", FAKE_RANK, *args])
    return rep, ev


def test_ranks_get_their_environment_and_their_progress_is_gathered(monkeypatch):
    rep, ev = run_fake(["ok", "ok", "ok"], monkeypatch)
    assert rep.codes == [0, 0, 0] and rep.stopped() == [] and not rep.interrupted
    assert ev.totals == [2, 2, 2] and sum(ev.patch_counts) == 45 and sorted(ev.ends) == ["s0", "s1", "s2", "t0", "t1", "t2"]
    assert rep.announced == [2, 2, 2] and rep.done == [2, 2, 2]
    envs = sorted((s["env"] for s in rep.slides if "env" in s), key=lambda e: e["RANK"])
    threads = str(max(1, (__import__("os").cpu_count() or 1) // 3))
    assert envs == [{"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "3",
                     "OMP_NUM_THREADS": threads} for r in range(3)]


def test_a_rank_that_stops_early_is_told_apart_from_failed_slides(monkeypatch):
    rep, ev = run_fake(["fail", "crash", "silent"], monkeypatch)
    assert rep.codes == [1, 3, 2]
    # rank 0 reported both slides (one failed): finished; rank 1 reported one of two; rank 2 none
    assert rep.announced == [2, 2, None] and rep.done == [2, 1, 0]
    assert rep.stopped() == [1, 2]
    assert [s["status"] for s in rep.slides if s["slide_id"] == "t0"] == ["failed"]


def test_gpus_option_is_checked(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks.parse_gpus("3", "auto") == 3
    for text, device, msg in [("0", "auto", "at least 1"), ("two", "auto", "number or 'all'"),
                              ("2", "cuda:1", "--device must be auto or cuda")]:
        with pytest.raises(WsimambaError, match=msg):
            ranks.parse_gpus(text, device)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(WsimambaError, match="no CUDA device"):
        ranks.parse_gpus("all", "auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert ranks.parse_gpus("all", "cuda") == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3a1f,1,-1,0")  # CUDA stops at the first invalid entry
    assert ranks.count_gpus() == 2
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch

    assert ranks.count_gpus() == torch.cuda.device_count()  # NVML's count, or torch's without NVML
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(WsimambaError, match="torchrun"):
        ranks.parse_gpus("2", "auto")


def test_strip_option_removes_both_spellings():
    argv = ["extract", "s", "--gpus", "2", "--out", "o", "--gpus=all", "--workers", "4"]
    assert ranks.strip_option(argv, "--gpus") == ["extract", "s", "--out", "o", "--workers", "4"]


def test_a_rank_keeps_working_when_the_launcher_is_gone():
    import os

    r, w = os.pipe()
    os.close(r)
    p = ranks.PipeProgress(w)
    p.start(3)  # EPIPE: dropped, not raised, and the pipe is not written again
    assert p._f is None
    p.patches_done(5)
    p.close()


_TWO_INTERRUPTS = """
import os, signal, sys, time
from wsimamba.features import ranks
if sys.argv[1] == "once":
    ranks.interrupt_once()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not interrupted")
except KeyboardInterrupt:
    # finishing its files, as a rank does after a Ctrl-C; the launcher's forwarded interrupt arrives now
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("cleanup finished")
"""


@pytest.mark.parametrize("mode", ["once", "default"])
def test_a_rank_finishes_its_cleanup_through_a_second_interrupt(mode):
    """A rank of `--gpus` gets Ctrl-C from the terminal and, 2 s later, again from the launcher (for ranks
    that did not get it). With `interrupt_once` the second one does not cut the rank's cleanup short (which
    left a `.partial` file behind); Python's default handler, for contrast, raises it there."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _TWO_INTERRUPTS, mode], capture_output=True, text=True, timeout=60)
    if mode == "once":
        assert r.returncode == 0 and r.stdout.strip() == "cleanup finished", (r.stdout, r.stderr)
    else:
        assert r.returncode != 0 and "cleanup finished" not in r.stdout and "KeyboardInterrupt" in r.stderr
