"""manifest.csv: concurrent updates from several processes, and the extraction's writing thread."""

from __future__ import annotations

import csv
import multiprocessing as mp
import threading

import pytest

from wsimamba.features.manifest import ManifestUpdates, read_manifest, update_manifest, update_manifest_rows


def _rows(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _hammer(out, worker: int, n: int) -> None:
    for i in range(n):
        update_manifest(out, {"slide_id": f"w{worker}_s{i:02d}", "status": "ok", "patches": i})


def test_updates_from_several_processes_all_land(tmp_path):
    ctx = mp.get_context("spawn" if "fork" not in mp.get_all_start_methods() else "fork")
    procs = [ctx.Process(target=_hammer, args=(tmp_path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = _rows(tmp_path)
    assert [r["slide_id"] for r in rows] == sorted(f"w{w}_s{i:02d}" for w in range(4) for i in range(25))
    assert all(r["patches"] == str(int(r["slide_id"][-2:])) for r in rows)


def test_rows_of_one_rewrite_replace_older_ones_and_the_last_wins(tmp_path):
    update_manifest(tmp_path, {"slide_id": "a", "status": "failed", "error": "two\nlines"})
    update_manifest_rows(tmp_path, [{"slide_id": "b", "status": "ok"}, {"slide_id": "a", "status": "failed"},
                                    {"slide_id": "a", "status": "ok", "patches": 7}])
    got = read_manifest(tmp_path)
    assert sorted(got) == ["a", "b"] and got["a"]["status"] == "ok" and got["a"]["patches"] == "7"
    update_manifest(tmp_path, {"slide_id": "c", "status": "failed", "error": "two\nlines"})
    assert read_manifest(tmp_path)["c"]["error"] == "two lines"


def test_the_writing_thread_never_makes_the_caller_wait_and_batches_rows(tmp_path):
    release = threading.Event()
    calls = []

    def slow_update(out, rows):
        calls.append(len(rows))
        if len(calls) == 1:
            release.wait(10)  # the first rewrite is stuck until every row below has been put
        update_manifest_rows(out, rows)

    updates = ManifestUpdates(tmp_path, update=slow_update)
    for i in range(40):
        updates.put({"slide_id": f"s{i:02d}", "status": "ok", "patches": i})
    puts_done_before_release = not release.is_set()
    release.set()
    updates.close()
    assert puts_done_before_release
    assert sum(calls) == 40 and len(calls) <= 3, calls  # the rows that waited went in one rewrite
    assert [r["slide_id"] for r in _rows(tmp_path)] == [f"s{i:02d}" for i in range(40)]


def test_a_failed_rewrite_is_raised_to_the_caller(tmp_path):
    def broken(out, rows):
        raise OSError(28, "No space left on device")

    updates = ManifestUpdates(tmp_path, update=broken)
    updates.put({"slide_id": "a"})
    updates.stop()  # waits, raises nothing
    with pytest.raises(OSError, match="No space left"):
        updates.put({"slide_id": "b"})
    with pytest.raises(OSError, match="No space left"):
        updates.close()


def test_rewrites_are_paced(tmp_path):
    """Rows coming every 20 ms are written at most every MIN_PAUSE_S (0.5 s), not one rewrite each."""
    import time

    from wsimamba.features.manifest import MIN_PAUSE_S

    updates = ManifestUpdates(tmp_path)
    t0 = time.monotonic()
    for i in range(30):
        updates.put({"slide_id": f"s{i:02d}", "status": "ok"})
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    updates.close()
    # the first row at once, then one rewrite per pause at most, and the last rows at close()
    assert updates.rewrites <= elapsed / MIN_PAUSE_S + 2 < 30, (updates.rewrites, elapsed)
    assert len(_rows(tmp_path)) == 30
