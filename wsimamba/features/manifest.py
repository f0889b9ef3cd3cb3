"""`manifest.csv`: one row per slide with its status, patch count, seconds and error.

Several processes (shards, torchrun ranks) may update one manifest: each update takes an exclusive
lock on `manifest.csv.lock`, reads the rows, changes one, and renames a complete new file into place,
so the manifest is never half-written and no update is lost.
"""

from __future__ import annotations

import csv
import fcntl
from contextlib import contextmanager
from pathlib import Path

from wsimamba.atomic import atomic_path

COLUMNS = ("slide_id", "status", "patches", "seconds", "error", "slide_path", "output", "reader")
MANIFEST = "manifest.csv"


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
    path = Path(out_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: "" if row.get(k) is None else str(row.get(k, "")).replace("\n", " ") for k in COLUMNS}
    with _locked(path):
        rows = read_manifest(out_dir)
        rows[clean["slide_id"]] = clean
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for sid in sorted(rows):
                w.writerow(rows[sid])
