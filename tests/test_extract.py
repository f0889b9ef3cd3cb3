"""`wsimamba extract` end to end: synth → extract → feature files a CLAM-style reader can load."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tests.conftest import EXTRACT_ARGS
from wsimamba.cli import main
from wsimamba.features.store import read_features
from wsimamba.slide.reader import open_slide
from wsimamba.slide.tiling import make_grid
from wsimamba.slide.tissue import TissueParams, detect_tissue

COORD_ATTRS = ("patch_size", "patch_level", "patch_size_level0", "target_mpp", "level0_mpp", "overlap",
               "level0_width", "level0_height", "name")
FILE_ATTRS = ("encoder", "encoder_weights_sha256", "wsimamba_version", "slide_path", "tissue_sthresh",
              "tissue_mthresh", "tissue_close", "tissue_use_otsu")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def extracted(cohort, tmp_path_factory):
    root, slides = cohort
    out = tmp_path_factory.mktemp("features")
    code = run_cli("extract", root / "slides", "--out", out, *EXTRACT_ARGS, "--workers", "0")
    assert code == 0
    return root, slides, out


def test_every_patch_inside_slide_and_on_tissue(extracted):
    root, slides, out = extracted
    for s in slides:
        feats, coords, cattrs, _ = read_features(out / f"{s.slide_id}.h5")
        size0 = int(cattrs["patch_size_level0"])
        assert size0 == 256  # 64 px at 2 µm/px on a 0.5 µm/px slide
        assert (coords >= 0).all()
        assert (coords[:, 0] + size0 <= s.width).all() and (coords[:, 1] + size0 <= s.height).all()
        with open_slide(s.path) as slide:
            tissue = detect_tissue(slide, TissueParams())
            frac = tissue.tissue_fraction(coords[:, 0], coords[:, 1], size0)
            assert (frac >= 0.25).all()
            # and the patch pixels themselves are not blank background
            for x, y in coords[:: max(1, len(coords) // 5)]:
                px = slide.read_at((int(x), int(y)), size0, 64)
                assert px.mean() < 235


def test_patch_count_matches_grid(extracted):
    root, slides, out = extracted
    total = 0
    for s in slides:
        feats, coords, cattrs, _ = read_features(out / f"{s.slide_id}.h5")
        with open_slide(s.path) as slide:
            grid = make_grid(slide, detect_tissue(slide), target_mpp=2.0, patch_size=64)
        assert len(coords) == len(grid) == feats.shape[0]
        np.testing.assert_array_equal(coords, grid.coords)
        assert 5 < len(grid) < 64  # some tissue, not the whole 8 × 8 grid
        total += len(grid)
    rows = manifest(out)
    assert sum(int(rows[s.slide_id]["patches"]) for s in slides) == total
    assert all(rows[s.slide_id]["status"] == "ok" for s in slides)


def test_clam_style_reader_and_attrs(extracted):
    root, slides, out = extracted
    s = slides[0]
    with h5py.File(out / f"{s.slide_id}.h5", "r") as f:  # what CLAM / TRIDENT loaders do
        feats = f["features"][:]
        coords = f["coords"][:]
        assert feats.dtype == np.float32 and feats.ndim == 2 and feats.shape[1] == 96  # test_resnet width
        assert coords.dtype == np.int64 and coords.shape == (feats.shape[0], 2)
        assert np.isfinite(feats).all() and feats.std() > 0
        for key in COORD_ATTRS:
            assert key in f["coords"].attrs, key
        for key in FILE_ATTRS:
            assert key in f.attrs, key
        assert f["coords"].attrs["level0_mpp"] == pytest.approx(0.5)
        assert f["coords"].attrs["target_mpp"] == pytest.approx(2.0)
        assert f["coords"].attrs["name"] == s.slide_id
        assert f.attrs["encoder"] == "timm:test_resnet"
        assert f.attrs["encoder_weights_sha256"] == "random-init"
        assert Path(f.attrs["slide_path"]).resolve() == s.path.resolve()
    # no temporaries left beside the results, one QC picture per slide
    assert not list(out.glob(".*partial*"))
    for s in slides:
        qc = Image.open(out / "qc" / f"{s.slide_id}.png")
        assert qc.format == "PNG" and max(qc.size) >= 256


def test_zarr_holds_the_same_arrays(extracted, tmp_path):
    root, slides, out = extracted
    zout = tmp_path / "z"
    assert run_cli("extract", root / "slides", "--out", zout, *EXTRACT_ARGS, "--workers", "0", "--format", "zarr") == 0
    import zarr

    store = zarr.open_group(str(zout / "features.zarr"), mode="r")
    assert sorted(store.group_keys()) == sorted(s.slide_id for s in slides)
    for s in slides:
        f_h5, c_h5, ca_h5, fa_h5 = read_features(out / f"{s.slide_id}.h5")
        f_z, c_z, ca_z, fa_z = read_features(zout / "features.zarr", s.slide_id)
        np.testing.assert_array_equal(c_h5, c_z)
        np.testing.assert_allclose(f_h5, f_z, rtol=1e-5, atol=1e-5)
        assert {k: ca_h5[k] for k in COORD_ATTRS} == {k: ca_z[k] for k in COORD_ATTRS}
        assert fa_z["encoder"] == fa_h5["encoder"]
    assert not (zout / ".partial").exists() or not any((zout / ".partial").iterdir())


def test_rerun_skips_done_and_overwrite_redoes(extracted, tmp_path):
    root, slides, out = extracted
    work = tmp_path / "f"
    shutil.copytree(out, work)
    target = work / f"{slides[0].slide_id}.h5"
    before = target.stat().st_mtime_ns
    time.sleep(0.01)
    assert run_cli("extract", root / "slides", "--out", work, *EXTRACT_ARGS, "--workers", "0") == 0
    assert target.stat().st_mtime_ns == before
    assert run_cli("extract", root / "slides", "--out", work, *EXTRACT_ARGS, "--workers", "0",
                   "--slide-list", _write(tmp_path / "list.txt", slides[0].slide_id), "--overwrite") == 0
    assert target.stat().st_mtime_ns != before
    assert manifest(work)[slides[0].slide_id]["status"] == "ok"


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="module")
def bad_cohort(cohort, tmp_path_factory):
    """Two good slides, one unreadable file and one slide that does not state its mpp."""
    from wsimamba.slide.synth import synth_slide

    root, slides = cohort
    d = tmp_path_factory.mktemp("bad") / "slides"
    d.mkdir()
    for s in slides[:2]:
        shutil.copy(s.path, d / s.path.name)
    (d / "broken.svs").write_bytes(b"this is not a slide" * 100)
    synth_slide(d / "nompp.svs", 1024, 1024, seed=3, mpp=None)
    return d, slides[:2]


def test_failing_slides_are_recorded_and_others_finish(bad_cohort, tmp_path, capsys):
    d, good = bad_cohort
    out = tmp_path / "f"
    code = run_cli("extract", d, "--out", out, *EXTRACT_ARGS, "--workers", "0")
    assert code == 1  # some slide failed
    rows = manifest(out)
    assert set(rows) == {"broken", "nompp"} | {s.slide_id for s in good}
    for s in good:
        assert rows[s.slide_id]["status"] == "ok" and (out / f"{s.slide_id}.h5").is_file()
    assert rows["broken"]["status"] == "failed" and "broken.svs" in rows["broken"]["error"]
    assert rows["nompp"]["status"] == "failed" and "--mpp-override" in rows["nompp"]["error"]
    assert not (out / "broken.h5").exists() and not (out / "nompp.h5").exists()
    errtext = capsys.readouterr().err
    assert "failed: nompp" in errtext and "Traceback" not in errtext
    # the fix the error names works, and the earlier results are kept
    code = run_cli("extract", d, "--out", out, *EXTRACT_ARGS, "--workers", "0", "--mpp-override", "0.5",
                   "--slide-list", _write(tmp_path / "l.txt", "nompp"))
    assert code == 0
    rows = manifest(out)
    assert rows["nompp"]["status"] == "ok" and rows["broken"]["status"] == "failed"
    _, _, cattrs, fattrs = read_features(out / "nompp.h5")
    assert fattrs["mpp_source"] == "override" and cattrs["level0_mpp"] == pytest.approx(0.5)


def test_next_slide_is_prepared_while_this_one_is_embedded(bad_cohort, tmp_path, monkeypatch):
    """Tissue detection and grid of slide k+1 run during slide k's embedding, once its reader has
    started; results keep the input order with skipped and failed slides among them, and a failure
    while preparing is recorded."""
    import wsimamba.features.extract as ex
    from wsimamba.config import ExtractConfig

    d, good = bad_cohort
    paths = sorted(d.iterdir(), key=lambda p: p.stem)  # broken, nompp, then the two good slides
    cfg = ExtractConfig(encoder="timm:test_resnet", random_init=True, target_mpp=2.0, patch_size=64, device="cpu",
                        batch_size=16, workers=0)
    out = tmp_path / "f"
    events = []
    real_prepare, real_embed = ex.prepare_slide, ex.start_embed

    def prepare(path, *a, **k):
        events.append(("prepare", Path(path).stem, time.perf_counter()))
        return real_prepare(path, *a, **k)

    def embed(prep, *a, **k):
        events.append(("embed-start", prep.sid, time.perf_counter()))
        time.sleep(0.3)  # long enough for the next slide's preparation to start meanwhile
        res = real_embed(prep, *a, **k)
        res.add_done_callback(lambda f: events.append(("embed-end", prep.sid, time.perf_counter())))
        return res

    monkeypatch.setattr(ex, "prepare_slide", prepare)
    monkeypatch.setattr(ex, "start_embed", embed)
    res = ex.extract_cohort(paths, out, cfg)
    assert [r.slide_path for r in res] == [str(p) for p in paths]
    assert [r.status for r in res] == ["failed", "failed", "ok", "ok"]
    rows = manifest(out)
    assert "broken.svs" in rows["broken"]["error"] and "--mpp-override" in rows["nompp"]["error"]
    first_start = next(t for kind, sid, t in events if kind == "embed-start" and sid == good[0].slide_id)
    first_end = next(t for kind, sid, t in events if kind == "embed-end" and sid == good[0].slide_id)
    second_prep = next(t for kind, sid, t in events if kind == "prepare" and sid == good[1].slide_id)
    assert second_prep < first_end, events
    # ... but only once the first slide's reader has started (after the sleep above): never while
    # DataLoader workers are being forked
    assert second_prep > first_start + 0.29, events
    # a rerun skips the finished slides and retries the failed ones, and still reports in input order
    res = ex.extract_cohort(paths, out, cfg)
    assert [(Path(r.slide_path).stem, r.status) for r in res] == [
        ("broken", "failed"), ("nompp", "failed"), (good[0].slide_id, "skipped"), (good[1].slide_id, "skipped")]


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(), reason="no forkserver")
def test_worker_processes_fork_from_a_server_that_ran_the_main_script_once(tmp_path):
    """A user's script that calls the extraction (and imports torch at its top) is imported once by
    the fork server, not once more by every preparing or decoding process forked from it."""
    log = tmp_path / "imports.txt"
    script = tmp_path / "user_script.py"
    script.write_text(f"""
import os
with open({str(log)!r}, "a") as f:
    f.write(f"{{os.getpid()}}\\n")  # every import of this script leaves its process id

if __name__ == "__main__":
    from tests.prepare_helpers import fake_prepare
    from wsimamba.features.prepare import SlidePreparer

    paths = [f"slide{{k}}.svs" for k in range(6)]
    prep = SlidePreparer(fake_prepare, paths, (0.3,), processes=3)
    for k in range(6):
        prep.submit(k)
    pids = {{prep.result(k)["pid"] for k in range(6)}}
    prep.close()
    print(" ".join(map(str, sorted(pids))))
""")
    out = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    workers = {int(v) for v in out.stdout.split()}
    imported = [int(v) for v in log.read_text().split()]
    assert len(workers) == 3
    assert len(imported) == 2  # the script itself and the fork server
    assert not workers & set(imported)


@pytest.mark.parametrize("processes", [0, 2])
def test_slide_preparer_isolates_crashes_and_keeps_going(processes):
    """Preparation in worker processes: results come from other processes and pass through `finish`
    here; a slide whose preparation kills its process is the only one recorded as failed, also when
    the crash broke the pool under other slides; an ordinary error stays that slide's error."""
    from tests.prepare_helpers import fake_prepare
    from wsimamba.errors import SlideError
    from wsimamba.features.prepare import SlidePreparer

    names = ["a", "bad", "b", "c", "d"] + (["crash", "e", "f"] if processes else [])
    prep = SlidePreparer(fake_prepare, [Path(n) for n in names], (0.05,), processes=processes,
                         finish=lambda r: {**r, "finished_in": os.getpid()})
    for k in range(len(names)):
        prep.submit(k)
    got = {}
    try:
        for k, name in enumerate(names):
            try:
                got[name] = prep.result(k)
            except SlideError as e:
                got[name] = str(e)
    finally:
        prep.close()
    assert got["bad"] == "bad: not a slide"
    for name in ("a", "b", "c", "d", "e", "f")[: 4 + 2 * bool(processes)]:
        assert got[name]["path"] == name and got[name]["finished_in"] == os.getpid()
        assert (got[name]["pid"] != os.getpid()) == bool(processes)
    if processes:
        assert "crash: the process preparing this slide died" in got["crash"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_killed_run_leaves_no_final_file_and_resumes(cohort, tmp_path):
    root, slides = cohort
    out = tmp_path / "f"
    # a slow encoder (batch of 1, big input) so the kill lands inside a slide
    args = [sys.executable, "-m", "wsimamba", "extract", str(root / "slides"), "--out", str(out),
            "--encoder", "timm:test_vit", "--random-init", "--target-mpp", "2.0", "--patch-size", "64",
            "--device", "cpu", "--batch-size", "1", "--workers", "1"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            done = list(out.glob("*.h5"))
            partial = list(out.glob(".*.h5.partial"))
            if done and partial:  # one slide finished, the next one half written
                break
            time.sleep(0.05)
        else:
            pytest.fail("extraction never reached a second slide")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finals = sorted(p.stem for p in out.glob("*.h5"))
    assert 1 <= len(finals) < len(slides)
    for sid in finals:  # every file under a final name is complete
        feats, coords, cattrs, fattrs = read_features(out / f"{sid}.h5")
        assert len(feats) == len(coords) > 0 and "encoder" in fattrs and "name" in cattrs
    assert list(out.glob(".*.h5.partial"))
    # the rerun (same encoder, bigger batches) finishes the rest and cleans the temporary up
    fast = args[: args.index("--batch-size")] + ["--batch-size", "32", "--workers", "0"]
    code = subprocess.run(fast, env=_env(), capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(s.slide_id for s in slides)
    assert not list(out.glob(".*.h5.partial"))
    assert all(r["status"] == "ok" for r in manifest(out).values())


def test_shards_cover_every_slide_once(cohort, tmp_path):
    root, slides = cohort
    out = tmp_path / "f"
    seen = []
    for i in range(3):
        sub = tmp_path / f"s{i}"
        assert run_cli("extract", root / "slides", "--out", sub, *EXTRACT_ARGS, "--workers", "0", "--shard", f"{i}/3") == 0
        seen += [p.stem for p in sub.glob("*.h5")]
    assert sorted(seen) == sorted(s.slide_id for s in slides)
    # two shards into one folder share one manifest without losing rows
    for i in range(2):
        assert run_cli("extract", root / "slides", "--out", out, *EXTRACT_ARGS, "--workers", "0", "--shard", f"{i}/2") == 0
    assert set(manifest(out)) == {s.slide_id for s in slides}


def test_select_shard_partitions_under_torchrun():
    from wsimamba.features.extract import select_shard

    rng = np.random.default_rng()
    paths = [Path(f"/x/s{int(v)}.svs") for v in rng.permutation(1000)[: rng.integers(1, 60)]]
    for n in (1, 2, 5):
        for w in (1, 3):
            parts = [select_shard(paths, (i, n), (r, w)) for i in range(n) for r in range(w)]
            flat = [p for part in parts for p in part]
            assert sorted(flat) == sorted(paths) and len(set(flat)) == len(flat)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            # deterministic whatever the input order
            assert select_shard(list(reversed(paths)), (0, n), (w - 1, w)) == parts[w - 1]


def test_torchrun_rank_takes_its_part(cohort, tmp_path, monkeypatch):
    root, slides = cohort
    outs = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        out = tmp_path / f"r{rank}"
        assert run_cli("extract", root / "slides", "--out", out, *EXTRACT_ARGS, "--workers", "0") == 0
        outs.append({p.stem for p in out.glob("*.h5")})
    assert outs[0].isdisjoint(outs[1]) and outs[0] | outs[1] == {s.slide_id for s in slides}


def test_dataloader_workers_give_the_same_features(extracted, tmp_path):
    root, slides, out = extracted
    w = tmp_path / "w"
    assert run_cli("extract", root / "slides", "--out", w, *EXTRACT_ARGS, "--workers", "2",
                   "--slide-list", _write(tmp_path / "l.txt", slides[1].slide_id)) == 0
    a, ca, _, _ = read_features(out / f"{slides[1].slide_id}.h5")
    b, cb, _, _ = read_features(w / f"{slides[1].slide_id}.h5")
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_user_tissue_masks_restrict_the_grid(cohort, tmp_path):
    root, slides = cohort
    masks = tmp_path / "masks"
    masks.mkdir()
    s = slides[0]
    m = np.zeros((64, 64), np.uint8)
    m[:, :32] = 255  # tissue only on the left half
    Image.fromarray(m).save(masks / f"{s.slide_id}.png")
    out = tmp_path / "f"
    assert run_cli("extract", root / "slides", "--out", out, *EXTRACT_ARGS, "--workers", "0",
                   "--tissue-masks", masks, "--slide-list", _write(tmp_path / "l.txt", s.slide_id),
                   "--min-tissue", "1.0") == 0
    _, coords, cattrs, fattrs = read_features(out / f"{s.slide_id}.h5")
    assert (coords[:, 0] + 256 <= s.width / 2).all()
    assert len(coords) == (s.height // 256) * ((s.width // 2) // 256)  # the mask ignores the real tissue
    assert fattrs["tissue_mask_source"].endswith(f"{s.slide_id}.png")


def test_non_pyramidal_tiff_through_tifffile(cohort, tmp_path):
    root, slides = cohort
    with open_slide(slides[0].path) as slide:
        img = slide.read_region((0, 0), 0, slide.dimensions)
    d = tmp_path / "slides"
    d.mkdir()
    # stripped, single-level: OpenSlide refuses it, tifffile reads it; 0.5 µm/px = 20000 px/cm
    tifffile.imwrite(d / "plain.tif", img, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    out = tmp_path / "f"
    assert run_cli("extract", d, "--out", out, *EXTRACT_ARGS, "--workers", "0") == 0
    f_t, c_t, cattrs, fattrs = read_features(out / "plain.h5")
    assert fattrs["slide_backend"] == "tifffile" and cattrs["level0_mpp"] == pytest.approx(0.5)
    # same pixels as the SVS (up to its JPEG) give the same grid
    with open_slide(slides[0].path) as slide:
        grid = make_grid(slide, detect_tissue(slide), target_mpp=2.0, patch_size=64)
    overlap = {tuple(c) for c in c_t} & {tuple(c) for c in grid.coords}
    assert len(overlap) >= 0.9 * len(grid.coords)


def test_gpus_splits_the_cohort_over_processes_with_one_report(extracted, tmp_path):
    """`--gpus 2` (here two CPU processes): the same features as one process, one summary line, failed
    slides reported by the launcher, and a rerun that skips what is done."""
    root, slides, ref = extracted
    folder = tmp_path / "slides"
    folder.mkdir()
    for s in slides:
        (folder / Path(s.path).name).symlink_to(Path(s.path).resolve())
    (folder / "broken.svs").write_bytes(b"not a slide" * 100)
    out = tmp_path / "g"
    cmd = [sys.executable, "-m", "wsimamba", "extract", str(folder), "--out", str(out), *EXTRACT_ARGS, "--workers", "0"]
    r = subprocess.run([*cmd, "--gpus", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # one slide failed
    summary = [ln for ln in r.stdout.splitlines() if " extracted (" in ln]
    assert len(summary) == 1 and summary[0].startswith(f"{len(slides)} extracted") and "1 failed" in summary[0], r.stdout
    assert "failed: broken:" in r.stderr and "error: rank" not in r.stderr, r.stderr
    rows = manifest(out)
    assert rows["broken"]["status"] == "failed" and all(rows[s.slide_id]["status"] == "ok" for s in slides)
    for s in slides:
        f1, c1, _, _ = read_features(ref / f"{s.slide_id}.h5")
        f2, c2, _, _ = read_features(out / f"{s.slide_id}.h5")
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
    # one process again (it leaves with os._exit after an extraction: its summary is still printed)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"0 extracted (0 patches, 0.0 patches/s), {len(slides)} already done, 1 failed" in r.stdout, (
        r.stdout, r.stderr)


def test_ctrl_c_stops_every_rank_cleanly_and_the_rerun_finishes(cohort, tmp_path):
    """A Ctrl-C (SIGINT to the process group, as a terminal sends it) during `--gpus 2`: exit code 130, one
    line saying so, no half-written file under a final name; the same command then does the rest."""
    root, slides = cohort
    out = tmp_path / "f"
    args = [sys.executable, "-m", "wsimamba", "extract", str(root / "slides"), "--out", str(out),
            "--encoder", "timm:test_vit", "--random-init", "--target-mpp", "2.0", "--patch-size", "64",
            "--device", "cpu", "--batch-size", "1", "--workers", "0", "--gpus", "2"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if list(out.glob("*.h5")) and list(out.glob(".*.h5.partial")):  # one slide done, one half written
                break
            time.sleep(0.05)
        else:
            pytest.fail("extraction never reached a second slide")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.count("error: interrupted") == 1 and "Traceback" not in err, err  # the launcher's, not each rank's
    assert not list(out.glob(".*.partial*"))
    done = sorted(p.stem for p in out.glob("*.h5"))
    assert 1 <= len(done) < len(slides)
    for sid in done:
        feats, coords, _, _ = read_features(out / f"{sid}.h5")
        assert len(feats) == len(coords) > 0
    fast = args[: args.index("--batch-size")] + ["--batch-size", "32", "--workers", "0", "--gpus", "2"]
    r = subprocess.run(fast, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(slides) - len(done)} extracted" in r.stdout and f"{len(done)} already done" in r.stdout, r.stdout
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(s.slide_id for s in slides)


def test_an_encoder_that_cannot_be_built_writes_nothing(cohort, tmp_path):
    """The first slides are prepared while the encoder is built, but nothing is written until it is: a
    weight file that does not fit fails the run with an empty output folder."""
    root, _ = cohort
    wrong = tmp_path / "wrong.pt"
    torch.save({"not.a.key": torch.zeros(3)}, wrong)
    out = tmp_path / "f"
    args = [a for a in EXTRACT_ARGS if a != "--random-init"]
    for workers in ("0", "2"):
        assert run_cli("extract", root / "slides", "--out", out, *args, "--weights", wrong, "--workers", workers) == 1
        assert not out.exists()


def test_the_first_slide_is_prepared_while_the_encoder_is_built(cohort, tmp_path, monkeypatch):
    import wsimamba.features.extract as ex
    from wsimamba.config import ExtractConfig

    root, slides = cohort
    events = []
    real_prepare, real_create = ex.prepare_slide, ex.create_encoder

    def prepare(path, *a, **k):
        events.append(("prepare", time.perf_counter()))
        return real_prepare(path, *a, **k)

    def create(*a, **k):
        time.sleep(0.5)
        enc = real_create(*a, **k)
        events.append(("encoder", time.perf_counter()))
        return enc

    monkeypatch.setattr(ex, "prepare_slide", prepare)
    monkeypatch.setattr(ex, "create_encoder", create)
    cfg = ExtractConfig(encoder="timm:test_resnet", random_init=True, target_mpp=2.0, patch_size=64, device="cpu",
                        batch_size=16, workers=0)
    res = ex.extract_cohort([slides[0].path], tmp_path / "f", cfg)
    assert [r.status for r in res] == ["ok"]
    assert [k for k, _ in events] == ["prepare", "encoder"], events
    assert (tmp_path / "f" / "qc" / f"{slides[0].slide_id}.png").is_file()


def test_encoder_weights_are_required_loaded_and_recorded(cohort, tmp_path):
    import timm

    from wsimamba.errors import EncoderError
    from wsimamba.features.encoders import create_encoder

    with pytest.raises(EncoderError, match="--weights"):
        create_encoder("resnet50-trunc")
    with pytest.raises(EncoderError, match="unknown encoder 'nope'"):
        create_encoder("nope", random_init=True)
    with pytest.raises(EncoderError, match="no such weight file"):
        create_encoder("timm:test_resnet", weights=tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"not.a.key": torch.zeros(3)}, wrong)
    with pytest.raises(EncoderError, match="missing .* keys"):
        create_encoder("timm:test_resnet", weights=wrong)
    # a real state dict round-trips: same weights, same features, its hash recorded
    torch.manual_seed(11)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    wfile = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, wfile)
    enc = create_encoder("timm:test_resnet", weights=wfile)
    x = torch.randn(2, 3, 64, 64)
    ref.eval()
    torch.testing.assert_close(enc.model(x), ref(x))
    assert len(enc.weights_sha256) == 64
    root, slides = cohort
    out = tmp_path / "f"
    args = [a for a in EXTRACT_ARGS if a != "--random-init"]
    assert run_cli("extract", root / "slides", "--out", out, *args, "--weights", wfile, "--workers", "0",
                   "--slide-list", _write(tmp_path / "l.txt", slides[0].slide_id)) == 0
    _, _, _, fattrs = read_features(out / f"{slides[0].slide_id}.h5")
    assert fattrs["encoder_weights_sha256"] == enc.weights_sha256


def test_resnet50_trunc_is_clam_shaped():
    from wsimamba.features.encoders import create_encoder

    enc = create_encoder("resnet50-trunc", random_init=True)
    assert enc.dim == 1024 and enc.input_size is None
    with torch.no_grad():
        assert enc.model(torch.randn(1, 3, 64, 64)).shape == (1, 1024)
    # torchvision ResNet-50 state dicts load (layer4 and fc are ignored)
    import torchvision

    sd = torchvision.models.resnet50(weights=None).state_dict()
    from wsimamba.features.encoders import _apply_weights

    _apply_weights("resnet50-trunc", enc.model, _save(sd))
    torch.testing.assert_close(enc.model.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])


def _save(sd) -> Path:
    import tempfile

    p = Path(tempfile.mkdtemp()) / "r50.pt"
    torch.save(sd, p)
    return p


def _run_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "wsimamba", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    r = _run_subprocess("extract", tmp_path / "nowhere", "--random-init")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {tmp_path / 'nowhere'}: no such slide folder"]
    r = _run_subprocess("extract", tmp_path, "--overlap", "300", "--random-init")
    assert r.returncode == 1 and "overlap (300) must be smaller than patch_size (256)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _run_subprocess("extract", tmp_path, "--shard", "3/2", "--random-init")
    assert r.returncode == 1 and r.stderr.startswith("error: --shard '3/2'")
    r = _run_subprocess("extract", tmp_path, "--no-such-flag")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--no-such-flag" in r.stderr
    r = _run_subprocess("--debug", "extract", tmp_path / "nowhere", "--random-init")
    assert r.returncode != 0 and "Traceback" in r.stderr
    for cmd in ("synth", "extract", "demo"):
        r = _run_subprocess(cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout


def test_slide_list_naming_unknown_slides_is_an_error(cohort, tmp_path, capsys):
    root, slides = cohort
    code = run_cli("extract", root / "slides", "--out", tmp_path / "f", *EXTRACT_ARGS,
                   "--slide-list", _write(tmp_path / "l.txt", "ghost_slide"))
    assert code == 1
    assert "ghost_slide" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50-trunc", "timm:test_vit"])
def test_cuda_graph_embedder_matches_eager_and_keeps_earlier_outputs(name):
    """On CUDA a batch shape seen twice is captured and replayed: its features equal the eager
    embedder's (bf16 rounding), earlier results are not overwritten by later replays, and other
    shapes (a slide's last, partial batch) run eager."""
    from wsimamba.features.encoders import create_encoder
    from wsimamba.features.extract import PatchEmbedder

    enc = create_encoder(name, random_init=True, seed=int(torch.seed() % 1000))
    dev = torch.device("cuda")
    graphs = PatchEmbedder(enc, dev, cuda_graphs=True)
    eager = PatchEmbedder(enc, dev, cuda_graphs=False)
    size = enc.input_size or 64
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    batches = [torch.randint(0, 256, (n, size + 3, size + 3, 3), dtype=torch.uint8, generator=g).to(dev)
               for n in (32, 32, 32, 19, 32)]  # resized on the way in, like span-layout patches
    outs = [graphs.embed(b) for b in batches]  # not synchronised in between: replays queue up
    assert len(graphs._graphs) == 1 and next(iter(graphs._graphs.values())) is not None
    for b, out in zip(batches, outs):
        ref = eager.embed(b).float()
        err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        assert err < 2e-2, err
    assert not torch.equal(outs[1], outs[2])


@pytest.mark.gpu
def test_encoder_built_on_the_gpu_loads_the_weights_and_is_reproducible(tmp_path):
    """create_encoder(device="cuda") builds and initialises on the GPU: parameters live there, weights
    from a file are exactly the file's, a random init is the same for the same seed (and differs for
    another), and the caller's CUDA random stream is left as it was."""
    import timm

    from wsimamba.features.encoders import create_encoder

    dev = torch.device("cuda", torch.cuda.current_device())
    seed = int(torch.seed() % 1000)
    torch.manual_seed(seed + 1)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=0)
    wfile = tmp_path / "w.pt"
    torch.save(ref.state_dict(), wfile)
    enc = create_encoder("timm:test_vit", weights=wfile, device="cuda")
    assert {p.device for p in enc.model.parameters()} == {dev}
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k].cpu(), v), k
    before = torch.cuda.get_rng_state(dev)
    a = create_encoder("timm:test_vit", random_init=True, seed=seed, device="cuda")
    b = create_encoder("timm:test_vit", random_init=True, seed=seed, device="cuda")
    c = create_encoder("timm:test_vit", random_init=True, seed=seed + 1, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(dev), before)
    pa, pb, pc = (torch.cat([p.flatten() for p in e.model.parameters()]) for e in (a, b, c))
    assert pa.device == dev and torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize("name", ["resnet50-trunc", "timm:test_vit"])
def test_embedder_fast_path_matches_the_plain_model(name):
    from wsimamba.features.encoders import create_encoder
    from wsimamba.features.extract import PatchEmbedder

    enc = create_encoder(name, random_init=True, seed=int(torch.seed() % 1000))
    # the plain model, run the slow way: one batch, no fusion, contiguous layout
    size = enc.input_size or 48
    batch = torch.randint(0, 256, (7, size, size, 3), dtype=torch.uint8)
    x = batch.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)
    import copy

    plain = copy.deepcopy(enc.model).eval()
    with torch.no_grad():
        ref = plain(x).numpy()
    fast = PatchEmbedder(enc, torch.device("cpu"), cpu_micro_batch=3)(batch)  # 7 = 3 + 3 + 1
    np.testing.assert_allclose(fast, ref, rtol=1e-3, atol=1e-4)
