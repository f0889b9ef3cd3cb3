"""Imported once by the multiprocessing fork server (`prepare.FORKSERVER_PRELOAD`): runs the caller's main
script there, as multiprocessing would otherwise do in every child, so that children forked from the
server find it already imported and skip it.

CPython's own `"__main__"` preload is a no-op for scripts (Python 3.11/3.12: the fork server asks the
preparation data for a `main_path` key, which `spawn.get_preparation_data` never sets), so each decoding or
preparing process re-ran a main script that imports torch: about a second of CPU per process. The path comes
from `WSIMAMBA_MP_MAIN`, set by `prepare._context()` before the server starts. A script that fails to import
here is left alone: the children then import it themselves, as before.
"""

from __future__ import annotations

import os
from multiprocessing import process, spawn

MAIN_ENV = "WSIMAMBA_MP_MAIN"


def _preload() -> None:
    path = os.environ.get(MAIN_ENV)
    if not path or not os.path.isfile(path):
        return
    process.current_process()._inheriting = True  # what multiprocessing sets while it imports a main script
    try:
        spawn.import_main_path(path)
    except Exception:  # noqa: BLE001 - children import it themselves, as without the preload
        pass
    finally:
        del process.current_process()._inheriting


_preload()
