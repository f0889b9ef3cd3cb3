"""A Ctrl-C whose KeyboardInterrupt Python drops in a finalizer still stops the program (`wsimamba.interrupts`)."""

import subprocess
import sys

import pytest

_SCENARIO = """
import os, signal, sys, time


class Slide:  # closes slowly, as OpenSlide's __del__ may: the Ctrl-C arrives while it runs
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:
            pass


class Broken:
    def __del__(self):
        raise ValueError("a finalizer's own error")


def run():
    try:
        s = Slide()
        del s
        time.sleep(5)
        print("not interrupted")
        return 0
    except KeyboardInterrupt:
        print("interrupted")
        return 7


mode = sys.argv[1]
if mode == "once":
    from wsimamba.features import ranks
    ranks.interrupt_once()
elif mode == "retry":
    from wsimamba import interrupts
    assert interrupts.retry_dropped_interrupts()
    b = Broken()
    del b  # not a KeyboardInterrupt: still printed by the hook that was there before
elif mode == "alarm-taken":
    from wsimamba import interrupts
    signal.signal(signal.SIGALRM, lambda *a: None)
    print("installed" if interrupts.retry_dropped_interrupts() else "left alone")
elif mode == "entry":
    from wsimamba import cli
    cli.main = run  # the console script's entry point around a command that meets the Ctrl-C
    cli.entry()
sys.exit(run())
"""


def _run(mode):
    return subprocess.run([sys.executable, "-c", _SCENARIO, mode], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", ["once", "retry", "entry"])
def test_a_ctrl_c_during_a_finalizer_still_stops_the_program(mode):
    """`once`: a rank of `extract --gpus` (its own SIGINT handler); `retry`: Python's handler; `entry`: the
    `wsimamba` program, which installs the retry for every command. The KeyboardInterrupt arrives once the
    finalizer is done, and nothing is printed for it."""
    r = _run(mode)
    assert r.returncode == 7 and r.stdout.strip() == "interrupted", (r.stdout, r.stderr)
    assert "KeyboardInterrupt" not in r.stderr, r.stderr
    if mode == "retry":  # other exceptions in finalizers are still reported as Python reports them
        assert "Exception ignored" in r.stderr and "a finalizer's own error" in r.stderr, r.stderr
    else:
        assert r.stderr == "", r.stderr


def test_without_the_retry_python_loses_that_ctrl_c():
    """The contrast: Python's default prints the KeyboardInterrupt and carries on."""
    r = _run("default")
    assert r.returncode == 0 and r.stdout.strip() == "not interrupted", (r.stdout, r.stderr)
    assert "Exception ignored" in r.stderr and "KeyboardInterrupt" in r.stderr, r.stderr


def test_somebody_elses_alarm_handler_is_left_alone():
    r = _run("alarm-taken")
    assert r.stdout.splitlines()[0] == "left alone", (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1] == "not interrupted", (r.stdout, r.stderr)
