"""Module-level stand-ins for `prepare_cpu`, picklable into `SlidePreparer`'s worker processes."""

import os
import time
from pathlib import Path

from wsimamba.errors import SlideError


def fake_prepare(path, delay: float) -> dict:
    name = Path(path).name
    time.sleep(delay)
    if name.startswith("crash"):
        os._exit(3)  # what a segfault in a slide library does to the process
    if name.startswith("bad"):
        raise SlideError(f"{path}: not a slide")
    return {"path": str(path), "pid": os.getpid()}
