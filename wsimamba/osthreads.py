"""Operating-system names for the threads and processes wsimamba starts.

Python before 3.14 leaves every thread (and every forked worker) named after the executable, so
`top -H`, `py-spy` or `benchmarks/utilisation.py` cannot tell a decoding process from the encoding
thread. `name_os_thread()` gives the calling thread the name it has in Python (or the one given),
cut to the 15 bytes Linux keeps. Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading

_PR_SET_NAME = 15
_libc = None


def name_os_thread(name: str | None = None) -> None:
    """Name the calling thread for the operating system (Linux): `name`, else its Python name."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    text = (name or threading.current_thread().name).encode("utf-8", "replace")[:15]
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: names are only a diagnostic
        pass
