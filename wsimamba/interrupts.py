"""A Ctrl-C that Python would drop reaches the program anyway.

Python runs a signal handler wherever the main thread is. When that is a finalizer (an `__del__`, such as
OpenSlide's closing a slide, or a weakref callback), the KeyboardInterrupt it raises cannot leave it: Python
prints it with a traceback ("Exception ignored in ...") and carries on as if no Ctrl-C had come (seen in CI,
in `extract --gpus`). `retry_dropped_interrupts` replaces that printout: a dropped KeyboardInterrupt is raised
again by SIGALRM a moment later, by then outside the finalizer (or it is dropped and retried once more).

This module imports no torch.
"""

from __future__ import annotations

import signal
import sys
import threading

RETRY_S = 0.05  # how soon a dropped KeyboardInterrupt is raised again

_retry = False  # a KeyboardInterrupt was dropped and has not been raised again yet
_previous_hook = None


def _raise_again(signum, frame) -> None:  # noqa: ARG001
    global _retry
    if _retry:
        _retry = False
        raise KeyboardInterrupt


def _hook(unraisable) -> None:
    """`sys.unraisablehook`: a dropped KeyboardInterrupt is not printed but raised again soon; anything else
    goes to the hook that was there before."""
    global _retry
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        _retry = True
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    (_previous_hook or sys.__unraisablehook__)(unraisable)


def retry_dropped_interrupts() -> bool:
    """Install the retry for this process (idempotent). Only from the main thread, which owns signal handlers;
    elsewhere, or where SIGALRM already has a handler of its own, nothing is installed and False returned."""
    global _previous_hook
    if sys.unraisablehook is _hook:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None, _raise_again):
        return False  # somebody else's alarm: leave it alone
    signal.signal(signal.SIGALRM, _raise_again)
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _hook
    return True
