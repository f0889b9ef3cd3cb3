"""`manifest.csv`: one row per slide with its status, patch count, seconds and error.

Several processes (shards, torchrun ranks) may update one manifest: each update takes an exclusive
lock on `manifest.csv.lock`, reads the rows, changes one, and renames a complete new file into place,
so the manifest is never half-written and no update is lost. An extraction updates it from a thread
of its own (`ManifestUpdates`), several rows per rewrite when they come faster than rewrites.
"""

from __future__ import annotations

import csv
import fcntl
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from wsimamba.atomic import atomic_path
from wsimamba.osthreads import name_os_thread

COLUMNS = ("slide_id", "status", "patches", "seconds", "error", "slide_path", "output", "reader")
MANIFEST = "manifest.csv"
MIN_PAUSE_S = 0.5  # ManifestUpdates: at least this long between rewrites,
PAUSE_FACTOR = 20  # and 20 times as long as the last one took (at most ~5% of the time rewriting)


@contextmanager
def _locked(path: Path):
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(out_dir: Path) -> dict[str, dict[str, str]]:
    """Rows of `out_dir/manifest.csv` keyed by slide_id (empty when there is none)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


def update_manifest(out_dir: Path, row: dict) -> None:
    """Insert or replace the row of `row["slide_id"]`."""
    update_manifest_rows(out_dir, [row])


def update_manifest_rows(out_dir: Path, new_rows: list[dict]) -> None:
    """Insert or replace the rows of their slide ids (the last one wins), in one rewrite."""
    path = Path(out_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    cleaned = [{k: "" if r.get(k) is None else str(r.get(k, "")).replace("\n", " ") for k in COLUMNS} for r in new_rows]
    with _locked(path):
        rows = read_manifest(out_dir)
        for clean in cleaned:
            rows[clean["slide_id"]] = clean
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for sid in sorted(rows):
                w.writerow(rows[sid])


class ManifestUpdates:
    """Updates of one manifest from a thread of their own, so that the caller (the extraction's
    embedding loop) never waits for a rewrite: `put(row)` returns at once, and rows that arrive before
    the next rewrite is due are applied together (one lock, one read, one rename for all of them).

    A rewrite reads and writes every row: ~3 ms at 1,000 slides and ~70 ms at 10,000 on the CI machine,
    which the embedding loop used to wait for after every slide. Rows not yet written when a run is
    killed are not lost: the next run rebuilds the row of every complete output that has none.
    `close()` returns once every row put is in the file, and raises what a rewrite raised (so does
    `put` after a failure); `stop()` only waits."""

    def __init__(self, out_dir: Path, update: Callable[[Path, list[dict]], None] | None = None):
        self.out_dir = Path(out_dir)
        self._update = update or update_manifest_rows
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self.rewrites = 0
        self._thread = threading.Thread(target=self._run, name="wsimamba-manifest", daemon=True)
        self._thread.start()

    def put(self, row: dict) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(row)

    def _run(self) -> None:
        name_os_thread()
        pause, last = 0.0, time.monotonic()
        done = False
        while not done:
            rows = [self._queue.get()]
            # Rewrites are paced: a rewrite is Python work under the GIL that grows with the manifest
            # (~70 ms at 10,000 rows on the CI machine), and the embedding loop shares that GIL. Rows
            # that arrive before the next rewrite is due join it; close() cuts the wait short.
            due = last + pause
            while rows[-1] is not None:
                wait = due - time.monotonic()
                try:
                    rows.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            done = rows[-1] is None
            rows = [r for r in rows if r is not None]
            if rows and self._error is None:
                t0 = time.monotonic()
                try:
                    self._update(self.out_dir, rows)
                    self.rewrites += 1
                except BaseException as e:  # noqa: BLE001 - raised to the caller at put() / close()
                    self._error = e
                last = time.monotonic()
                pause = max(MIN_PAUSE_S, PAUSE_FACTOR * (last - t0))

    def stop(self) -> None:
        """Wait until every row put is written (or a rewrite failed); raises nothing."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        """`stop()`, then raise what a rewrite raised."""
        self.stop()
        if self._error is not None:
            raise self._error
