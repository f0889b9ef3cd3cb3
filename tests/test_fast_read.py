"""The native-tile reader (`--reader tiles`): same pixels and features as OpenSlide, right colours for
RGB-coded JPEG, every patch in its place, and the fallback to OpenSlide where tiles cannot be used."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tests.conftest import EXTRACT_ARGS
from wsimamba.cli import main
from wsimamba.features.fastread import ThreadReader, assemble_gather, choose_decoder, probe_device_decoder, read_patches
from wsimamba.features.store import read_features
from wsimamba.slide.reader import open_slide
from wsimamba.slide.synth import _aperio_description
from wsimamba.slide.tiles import (
    NativeTilesUnsupported,
    TileLevel,
    TilePlan,
    TileReader,
    assemble_copies,
    classify_layout,
    decode_tile_cpu,
    jpeg_info,
    jpeg_stream,
    merge_tables,
    plan_tiles,
    _segments,
)
from wsimamba.slide.tiling import PatchGrid

MPP = 0.5
# torchvision 0.29 warns on every decode_jpeg call that its codecs move to TorchCodec
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# Test slides


def pattern_image(width: int, height: int, tile: int, seed: int) -> np.ndarray:
    """Saturated colours, one per tile, under a smooth pattern whose phase depends on the position,
    so that every patch position has its own content (a misplaced tile cannot go unnoticed)."""
    rng = np.random.default_rng(seed)
    ty, tx = -(-height // tile), -(-width // tile)
    base = rng.uniform(0, 1, (ty, tx, 3))
    base[..., rng.integers(0, 3, (ty, tx))[..., None] == np.arange(3)] *= 0.3  # one weak channel: saturated
    base = 60 + 150 * base
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = base[(yy // tile).astype(int), (xx // tile).astype(int)]
    wave = 25 * np.sin(xx / 9.7 + yy / 23.3)[..., None] * np.array([1.0, -0.6, 0.4])
    wave += 15 * np.cos(yy / 13.1 - xx / 31.7)[..., None] * np.array([-0.3, 1.0, 0.5])
    return np.clip(img + wave, 0, 255).astype(np.uint8)


def _downsample(img: np.ndarray, factor: int = 4) -> np.ndarray:
    h, w = -(-img.shape[0] // factor), -(-img.shape[1] // factor)
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))


def _tiles_of(img: np.ndarray, tile: int):
    h, w = img.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = np.zeros((tile, tile, 3), np.uint8)
            part = img[y : y + tile, x : x + tile]
            t[: part.shape[0], : part.shape[1]] = part
            yield t


def _aperio_rgb_tiles(img: np.ndarray, tile: int, quality: int = 90) -> tuple[bytes, list[bytes]]:
    """Tiles as Aperio writes them: JPEG with RGB components (no colour transform), no JFIF or Adobe
    marker, component ids 0, 1, 2, and the quantisation / Huffman tables shared in JPEGTables."""
    import imagecodecs

    tables = None
    out = []
    for t in _tiles_of(img, tile):
        full = imagecodecs.jpeg8_encode(t, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling="444")
        segs = list(_segments(full))
        head = [full[a:b] for m, a, b in segs if m in (0xDB, 0xC4)]
        frame = bytearray()
        for m, a, b in segs:
            if m in (0xC0, 0xDA):
                seg = bytearray(full[a:b])
                if m == 0xC0:
                    for k in range(seg[9]):
                        seg[10 + 3 * k] = k  # ids 0, 1, 2 instead of 'R', 'G', 'B'
                else:
                    for k in range(seg[4]):
                        seg[5 + 2 * k] = k
                frame += seg
        scan_end = segs[-1][2]
        t_tables = b"\xff\xd8" + b"".join(head) + b"\xff\xd9"
        assert tables is None or tables == t_tables  # one table set for the page, as in JPEGTables
        tables = t_tables
        out.append(b"\xff\xd8" + bytes(frame) + full[scan_end:])
    return tables, out


def write_pattern_slide(path: Path, size: tuple[int, int] = (2048, 2048), tile: int = 256, kind: str = "rgb-aperio",
                        seed: int = 0) -> np.ndarray:
    """kind: 'rgb-aperio' (RGB-coded JPEG tiles with JPEGTables, Aperio description), 'ycc-tiff'
    (YCbCr JPEG, generic pyramidal TIFF), 'deflate-tiff' (zlib tiles, generic pyramidal TIFF).
    Levels: 0 and a 4× downsample. Returns level 0."""
    w, h = size
    img = pattern_image(w, h, tile, seed)
    levels = [img, _downsample(img)]
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            lh, lw = lvl.shape[:2]
            if kind == "rgb-aperio":
                tables, tiles = _aperio_rgb_tiles(lvl, tile)
                tw.write(iter(tiles), shape=lvl.shape, dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                         photometric="rgb", subsampling=(1, 1), compressionargs={"outcolorspace": "RGB"},
                         jpegtables=tables, metadata=None, subfiletype=0,
                         description=_aperio_description(w, h, lw, lh, tile, 90, MPP, path.stem))
            else:
                per_cm = 1e4 / (MPP * 4**k)
                tw.write(lvl, tile=(tile, tile), photometric="rgb", metadata=None,
                         compression="jpeg" if kind == "ycc-tiff" else "zlib",
                         subfiletype=1 if k else 0, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                         description=f"pattern {path.stem}")
    return img


@pytest.fixture(scope="module")
def slides(cohort, tmp_path_factory):
    """name → path: synthetic SVS and TIFF (YCbCr), RGB-JPEG Aperio-like, YCbCr pattern TIFF with
    128-px tiles, a deflate TIFF and a slide whose level 1 is not an exact 4× downsample."""
    from wsimamba.slide.synth import synth_slide

    root, cohort_slides = cohort
    d = tmp_path_factory.mktemp("fastread") / "slides"
    d.mkdir()
    paths = {}
    paths["synth_svs"] = d / "synth_svs.svs"
    shutil.copy(cohort_slides[0].path, paths["synth_svs"])
    paths["synth_tiff"] = d / "synth_tiff.tiff"
    synth_slide(paths["synth_tiff"], 2048, 2048, seed=5, mpp=MPP, tumor_fraction=0.05)
    paths["rgb_aperio"] = d / "rgb_aperio.svs"
    write_pattern_slide(paths["rgb_aperio"], kind="rgb-aperio", seed=1)
    paths["ycc_tiff"] = d / "ycc_tiff.tiff"
    write_pattern_slide(paths["ycc_tiff"], tile=128, kind="ycc-tiff", seed=2)
    paths["deflate"] = d / "deflate.tiff"
    write_pattern_slide(paths["deflate"], kind="deflate-tiff", seed=3)
    paths["misaligned"] = d / "misaligned.svs"
    write_pattern_slide(paths["misaligned"], size=(2050, 2050), kind="rgb-aperio", seed=4)
    return paths


def full_grid(slide, target_mpp: float, patch_size: int, overlap: int = 0, max_patches: int = 40, seed: int = 0) -> PatchGrid:
    """Every grid position over the whole slide (at most `max_patches`, an ordered random subset)."""
    scale = target_mpp / slide.mpp
    size0 = int(round(patch_size * scale))
    step0 = int(round((patch_size - overlap) * scale))
    level = slide.best_level_for_downsample(scale)
    w0, h0 = slide.dimensions
    gy, gx = np.meshgrid(np.arange(0, h0 - size0 + 1, step0), np.arange(0, w0 - size0 + 1, step0), indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)
    if len(coords) > max_patches:
        keep = np.sort(np.random.default_rng(seed).choice(len(coords), max_patches, replace=False))
        coords = coords[keep]
    return PatchGrid(coords=coords, tissue=np.ones(len(coords), np.float32), patch_size=patch_size,
                     patch_size_level0=size0, patch_level=level,
                     read_size=int(round(size0 / slide.level_downsamples[level])), target_mpp=target_mpp,
                     level0_mpp=slide.mpp, overlap=overlap, level0_width=w0, level0_height=h0)


def openslide_patches(slide, grid: PatchGrid) -> np.ndarray:
    return np.stack([slide.read_at((int(x), int(y)), grid.patch_size_level0, grid.patch_size, level=grid.patch_level)
                     for x, y in grid.coords])


def mae(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=axis)


# (target_mpp, patch_size, overlap) on 0.5 µm/px slides → layout on 256-px tiles
GRIDS = {
    "level1-crop": (2.0, 64, 0),  # 256 level-0 px read as 64 px at level 1
    "tile": (0.5, 256, 0),
    "crop": (0.5, 128, 0),
    "block-resized": (1.0, 256, 0),  # 512 px (2×2 tiles) resized to 256
    "span": (0.5, 224, 0),
    "span-overlap": (0.5, 256, 64),
}


# ---------------------------------------------------------------------------------------------
# JPEG streams and colour


def test_rgb_aperio_file_is_what_real_aperio_files_are(slides):
    import openslide

    path = slides["rgb_aperio"]
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert int(page.photometric) == 2 and int(page.compression) == 7 and page.is_tiled
        tables = page.jpegtables
        assert tables, "tiles share JPEGTables"
        with open(path, "rb") as fh:
            fh.seek(page.dataoffsets[3])
            tile = fh.read(page.databytecounts[3])
    info = jpeg_info(merge_tables(tile, tables))
    # RGB components that a decoder guessing from markers would take for YCbCr
    assert not info.jfif and info.adobe_transform is None and info.ids == (0, 1, 2)
    assert info.sampling == ((1, 1),) * 3 and info.guessed_colorspace == "YCbCr"
    osr = openslide.OpenSlide(str(path))
    assert osr.properties["openslide.vendor"] == "aperio"
    assert osr.properties["tiff.ImageDescription"].startswith("Aperio Image Library")
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    ref = np.asarray(osr.read_region((3 * 256, 0), 0, (256, 256)))[..., :3]
    # the pitfall is real here: decoding as YCbCr is far off; forcing RGB is what OpenSlide gives
    naive = np.asarray(Image.open(io.BytesIO(merge_tables(tile, tables))).convert("RGB"))
    assert mae(naive, ref) > 20
    assert mae(decode_tile_cpu(tile, bytes(tables), "RGB"), ref) <= 1.0
    osr.close()


@pytest.mark.parametrize("name", ["rgb_aperio", "synth_svs", "ycc_tiff"])
def test_spliced_streams_decode_right_with_marker_guessing_decoders(slides, name):
    from torchvision.io import decode_jpeg

    with open_slide(slides[name]) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 256))
    lv = plan.level
    assert lv.splice == ("RGB" if name == "rgb_aperio" else None)
    with TileReader(lv) as reader:
        raw = reader.read([0, 5, 9])
    for b in raw:
        ref = decode_tile_cpu(b, lv.tables, lv.colorspace)
        stream = jpeg_stream(b, lv.tables, lv.splice)
        assert stream[:2] == b"\xff\xd8" and stream[-2:] == b"\xff\xd9"
        pil = np.asarray(Image.open(io.BytesIO(stream)).convert("RGB"))
        tv = decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8)).permute(1, 2, 0).numpy()
        assert mae(pil, ref) <= 0.5 and mae(tv, ref) <= 0.5
        info = jpeg_info(stream)
        assert info.guessed_colorspace == ("RGB" if lv.colorspace == "RGB" else "YCbCr")


def test_probe_catches_wrong_colours_and_routes_to_cpu(slides):
    with open_slide(slides["rgb_aperio"]) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 256))
    ok, detail = probe_device_decoder(plan, torch.device("cpu"))
    assert ok, detail
    assert choose_decoder(plan, torch.device("cpu"), "device")[0] == "device"
    plan.level.splice = None  # streams as they are in the file: a guessing decoder takes them for YCbCr
    ok, detail = probe_device_decoder(plan, torch.device("cpu"))
    assert not ok and "grey levels" in detail
    assert choose_decoder(plan, torch.device("cpu"), "device")[0] == "cpu"


# ---------------------------------------------------------------------------------------------
# Geometry


def test_recipe_assembles_every_layout_like_cropping_the_level(seed):
    """Random tile sizes, patch sizes and positions: both assemblers equal a plain crop of the image."""
    rng = np.random.default_rng(seed)
    for _ in range(12):
        tw = int(rng.choice([16, 32, 48]))
        th = tw
        across, down = int(rng.integers(2, 6)), int(rng.integers(2, 6))
        level_img = rng.integers(0, 256, (down * th, across * tw, 3), dtype=np.uint8)
        r = int(rng.integers(1, min(across, down) * tw))
        n = int(rng.integers(1, 9))
        lx = rng.integers(0, across * tw - r + 1, n).astype(np.int64)
        ly = rng.integers(0, down * th - r + 1, n).astype(np.int64)
        lv = TileLevel(path=Path("/dev/null"), page=0, width=across * tw, height=down * th, tile_w=tw, tile_h=th,
                       offsets=np.zeros(across * down, np.int64), counts=np.ones(across * down, np.int64), tables=None,
                       photometric=6, colorspace="YCBCR", splice=None)
        plan = TilePlan(level=lv, level_index=0, lx=lx, ly=ly, read_size=r, patch_size=r,
                        layout=classify_layout(lx, ly, r, tw, th))
        rec = plan.recipe(0, n)
        tiles = [level_img[(t // across) * th : (t // across + 1) * th, (t % across) * tw : (t % across + 1) * tw]
                 for t in rec.tiles]
        want = np.stack([level_img[y : y + r, x : x + r] for x, y in zip(lx, ly)])
        got = assemble_copies(tiles, rec, np.zeros_like(want))
        np.testing.assert_array_equal(got, want)
        gathered = assemble_gather([torch.from_numpy(t).permute(2, 0, 1) for t in tiles], rec, torch.device("cpu"))
        np.testing.assert_array_equal(gathered.numpy(), want)
    assert classify_layout(np.array([0, 256]), np.array([0, 0]), 256, 256, 256) == "tile"
    assert classify_layout(np.array([0, 512]), np.array([0, 0]), 512, 256, 256) == "block"
    assert classify_layout(np.array([64, 128]), np.array([0, 128]), 128, 256, 256) == "crop"
    assert classify_layout(np.array([0, 224]), np.array([0, 0]), 224, 256, 256) == "span"


@pytest.mark.parametrize("name", ["rgb_aperio", "ycc_tiff", "synth_svs", "synth_tiff"])
@pytest.mark.parametrize("decoder", ["cpu", "device", "hybrid"])
def test_patches_equal_openslide_and_sit_in_place(slides, name, decoder):
    """Every layout; `device` runs the GPU path's code (spliced streams, torchvision decode, gather
    assembly, resize) with torchvision's CPU decoder; `hybrid` mixes both decoders' batches."""
    layouts = set()
    with open_slide(slides[name]) as slide:
        for key, (tmpp, ps, ov) in GRIDS.items():
            if decoder != "cpu" and key not in ("level1-crop", "block-resized", "span-overlap"):
                continue  # the device path shares the rest with the cpu path; keep the test short
            grid = full_grid(slide, tmpp, ps, ov, max_patches=24 if ps > 100 else 40)
            plan = plan_tiles(slide, grid)
            layouts.add(plan.layout)
            # the pipeline's items come from reader threads; read them so here too (and in this thread for cpu)
            got = read_patches(plan, decoder, "cpu", batch_size=7, workers=0 if decoder == "cpu" else 3)
            ref = openslide_patches(slide, grid)
            assert got.shape == ref.shape == (len(grid), ps, ps, 3)
            per_patch = mae(got, ref, axis=(1, 2, 3))
            assert per_patch.max() <= 2.0, (key, per_patch.max())
            if name in ("rgb_aperio", "ycc_tiff"):
                # by content: each patch is nearest to OpenSlide's patch at its own position
                dist = np.stack([mae(got, ref[j][None], axis=(1, 2, 3)) for j in range(len(ref))], 1)
                np.testing.assert_array_equal(dist.argmin(1), np.arange(len(ref)))
                assert (dist + np.eye(len(ref)) * 1e3).min() > 5 * max(per_patch.max(), 0.5)
    if decoder == "cpu":
        assert layouts == {"crop", "tile", "block", "span"}  # 128-px tiles: 'tile' from the 128-px grid


def test_hybrid_hands_the_device_at_most_its_backlog(slides):
    """Hybrid decoding: batches go to the device decoder while fewer than `limit` wait for it; the
    reader decodes the others itself, and a released place is taken again."""
    from wsimamba.features.fastread import DeviceBacklog, TileBatches, decode_item

    with open_slide(slides["synth_svs"]) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 128, 0, max_patches=40))
    backlog = DeviceBacklog(limit=2)
    ds = TileBatches(plan, 8, "hybrid", backlog=backlog)
    items = [ds[k] for k in range(4)]
    assert ["streams" in it for it in items] == [True, True, False, False]
    assert items[2]["patches"].shape == (8, 128, 128, 3)
    stats: dict = {}
    decoded = [decode_item(it, plan, torch.device("cpu"), stats, backlog) for it in items[:3]]
    assert backlog.waiting == 0 and stats == {"device_batches": 2, "cpu_batches": 1}
    assert "streams" in ds[4]
    ref = read_patches(plan, "cpu", "cpu", batch_size=8)
    assert mae(np.concatenate([d.numpy() for d in decoded]), ref[:24]) <= 2.0
    ds.close()


def test_run_tiles_lowers_the_switch_interval_only_while_it_runs(slides):
    """The 1 ms switch interval holds while the pipeline runs and the caller's value comes back
    afterwards, also when writing fails; features arrive in order, one row per patch."""
    import sys

    from wsimamba.features.fastread import SWITCH_INTERVAL, run_tiles

    class Embedder:
        device = torch.device("cpu")

        def embed(self, x):
            return x.float().mean(dim=(1, 2))  # (B, 3) per patch

    with open_slide(slides["synth_svs"]) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 128, 0, max_patches=30))
    seen, rows = [], []

    def append(feats, start, stop):
        seen.append(sys.getswitchinterval())
        rows.append((start, stop, feats.shape))

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        run = run_tiles(plan, Embedder(), append, 8, 2, "cpu")
        assert sys.getswitchinterval() == pytest.approx(0.004)
        assert seen and all(v == pytest.approx(SWITCH_INTERVAL) for v in seen)
        assert [(a, b) for a, b, _ in rows] == [(k, min(k + 8, 30)) for k in range(0, 30, 8)]
        assert run.cpu_batches == 4 and run.device_batches == 0 and run.decoder == "imagecodecs"

        def failing(feats, start, stop):
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            run_tiles(plan, Embedder(), failing, 8, 2, "cpu")
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)


def test_thread_reader_keeps_order_bounds_lookahead_and_raises_in_place():
    """Items finish out of order in the threads, yet come out in index order; no more than `ahead`
    are started beyond the consumer; an item's exception surfaces at that item; close() cancels."""
    import threading
    import time

    rng = np.random.default_rng()
    delays = rng.uniform(0, 0.004, size=41)
    started: list[int] = []
    lock = threading.Lock()

    class Items:
        def __len__(self):
            return len(delays)

        def __getitem__(self, k):
            with lock:
                started.append(k)
            time.sleep(delays[k])
            if k == 29:
                raise ValueError("tile 29 is cut short")
            return k

    reader = ThreadReader(Items(), threads=4, ahead=5)
    got = []
    with pytest.raises(ValueError, match="tile 29"):
        for k in reader:
            got.append(k)
            with lock:
                assert max(started) < k + 1 + 5  # never more than `ahead` past the consumer
    reader.close()
    assert got == list(range(29))
    assert max(started) < 29 + 5


def test_shared_read_pool_serves_readers_in_order_within_one_budget():
    """Readers open on one pool: the second one's items are requested only once the first is all
    requested, yet before the first is consumed; never more than `ahead` items are requested and not
    yet consumed over both; closing a reader mid-way cancels what has not started, waits for what
    has, and frees its share for the next reader."""
    import threading
    import time

    from wsimamba.features.fastread import ReadPool

    rng = np.random.default_rng()
    lock = threading.Lock()
    log: list[tuple[str, int]] = []  # (reader, item) in the order requested
    running: dict[str, int] = {}

    class Items:
        def __init__(self, name, n):
            self.name, self.n = name, n

        def __len__(self):
            return self.n

        def __getitem__(self, k):
            with lock:
                log.append((self.name, k))
                running[self.name] = running.get(self.name, 0) + 1
            time.sleep(rng.uniform(0, 0.003))
            with lock:
                running[self.name] -= 1
            return self.name, k

    ahead = int(rng.integers(3, 7))
    pool = ReadPool(threads=3, ahead=ahead)
    a, b, c = Items("a", int(rng.integers(5, 9))), Items("b", int(rng.integers(4, 8))), Items("c", 30)
    ra, rb, rc = ThreadReader(a, pool=pool), ThreadReader(b, pool=pool), ThreadReader(c, pool=pool)
    consumed = 0
    got_a = []
    for item in ra:
        got_a.append(item)
        consumed += 1
        with lock:
            requested = len(log)
            first_b = next((i for i, (name, _) in enumerate(log) if name == "b"), None)
        assert requested <= consumed + ahead  # the budget spans both readers (the item in hand counts)
        if first_b is not None:  # b starts only after every item of a was requested
            assert [name for name, _ in log[:first_b]] == ["a"] * len(a)
    assert got_a == [("a", k) for k in range(len(a))]
    time.sleep(0.05)
    with lock:
        assert any(name == "b" for name, _ in log), "b was not read ahead while a was consumed"
        names = [name for name, _ in log]
        if "c" in names:  # c only after every item of b was requested
            assert names[: names.index("c")].count("b") == len(b)
    rb_items = iter(rb)
    assert next(rb_items) == ("b", 0)
    rb.close()  # mid-way: b's unstarted items are cancelled, its running ones awaited
    with lock:
        assert running.get("b", 0) == 0
        b_requested = sum(name == "b" for name, _ in log)
    got_c = list(rc)
    assert got_c == [("c", k) for k in range(30)]
    with lock:
        assert sorted(k for name, k in log if name == "c") == list(range(30))
        assert sum(name == "b" for name, _ in log) == b_requested  # nothing of b ran after its close
    rc.close()
    ra.close()
    assert pool._outstanding == 0
    pool.close()


def _shm_files() -> set:
    import glob

    return set(glob.glob("/dev/shm/wsimamba-tiles-*"))


def test_decoding_processes_give_the_threads_pixels_and_free_their_slots(slides, monkeypatch):
    """CPU decoding in worker processes (into shared-memory slots) gives exactly the pixels of the
    in-thread decoder for every layout, also when patches read larger than a slot allows (the
    batches shrink to fit); every slot is free again once the patches are dropped; close() removes
    the shared-memory file."""
    from wsimamba.features.fastread import TileItems, decode_item, read_pool

    monkeypatch.setenv("WSIMAMBA_TILE_PROCESSES", "1")
    before = _shm_files()
    pool = read_pool(2, torch.device("cpu"), slot_bytes=7 * 128 * 128 * 3)
    assert pool.procs is not None and pool.ahead == 6
    procs = pool.procs
    try:
        layouts, shrunk = set(), False
        for name in ("rgb_aperio", "synth_tiff"):
            with open_slide(slides[name]) as slide:
                for key, (tmpp, ps, ov) in GRIDS.items():
                    grid = full_grid(slide, tmpp, ps, ov, max_patches=24 if ps > 100 else 40)
                    plan = plan_tiles(slide, grid)
                    layouts.add(plan.layout)
                    items = TileItems(plan, 7, "cpu", 2, pool=pool)
                    assert items.ds.batch == max(1, min(7, procs.slot_bytes // (3 * plan.read_size ** 2)))
                    shrunk = shrunk or items.ds.batch < 7
                    parts, stats = [], {}
                    for item in items:
                        parts.append(decode_item(item, plan, torch.device("cpu"), stats).numpy().copy())
                        del item
                    items.close()
                    got = np.concatenate(parts)
                    ref = read_patches(plan, "cpu", "cpu", batch_size=7)
                    np.testing.assert_array_equal(got, ref, err_msg=f"{name} {key}")
        assert layouts == {"crop", "tile", "block", "span"}
        assert shrunk  # some grid read patches larger than a slot holds 7 of
        import gc

        gc.collect()
        assert procs._free.qsize() == procs.nslots
    finally:
        pool.close()
    assert _shm_files() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="operating-system thread names: Linux")
def test_reader_threads_and_decoding_processes_carry_their_names(slides, monkeypatch):
    """The operating system sees the pool's reader threads as wsimamba-read_N and its decoding
    processes as wsimamba-decode (what top -H and benchmarks/utilisation.py show)."""
    import threading

    from wsimamba.features.fastread import TileItems, decode_item, read_pool

    monkeypatch.setenv("WSIMAMBA_TILE_PROCESSES", "1")
    pool = read_pool(2, torch.device("cpu"), slot_bytes=8 * 256 * 256 * 3)
    try:
        with open_slide(slides["synth_tiff"]) as slide:
            plan = plan_tiles(slide, full_grid(slide, *GRIDS["tile"], max_patches=16))
        items = TileItems(plan, 8, "cpu", 2, pool=pool)
        for item in items:
            decode_item(item, plan, torch.device("cpu"), {})
        items.close()
        readers = [t for t in threading.enumerate() if t.name.startswith("wsimamba-read")]
        assert readers
        for t in readers:
            assert Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip() == t.name[:15]
        pids = list(pool.procs._pool._processes)
        assert pids
        for pid in pids:
            assert Path(f"/proc/{pid}/comm").read_text().strip() == "wsimamba-decode"
    finally:
        pool.close()


def test_a_corrupt_tile_names_its_file_in_the_reader_threads(slides, tmp_path):
    """In the reader threads too (no decoding processes), a tile that does not decode fails its
    batch with a SlideError naming the file and the tile."""
    from wsimamba.errors import SlideError

    src = slides["synth_svs"]
    with open_slide(src) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 128, 0, max_patches=16))
    first = int(plan.recipe(0, 8).tiles[0])
    with _reading_from(plan, _corrupt_tile_copy(src, plan, first, tmp_path / "bad.svs")):
        with pytest.raises(SlideError, match=rf"bad\.svs: tile {first} of page \d+ (does not decode|decodes to)"):
            read_patches(plan, "cpu", "cpu", batch_size=8, workers=2)


def _corrupt_tile_copy(src: Path, plan: TilePlan, tile: int, dest: Path) -> Path:
    """A copy of `src` whose tile `tile` (of the plan's level) keeps its SOI marker and is zero after it."""
    off, n = int(plan.level.offsets[tile]), int(plan.level.counts[tile])
    data = bytearray(src.read_bytes())
    data[off + 2: off + n] = bytes(n - 2)
    dest.write_bytes(bytes(data))
    return dest


@contextlib.contextmanager
def _reading_from(plan: TilePlan, path: Path):
    """The plan reads its tiles from `path` (a damaged copy of its slide) while inside."""
    src = plan.level.path
    plan.level.path = path
    try:
        yield
    finally:
        plan.level.path = src


def test_slot_files_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    """A killed run leaves its shared-memory slot file behind; the next run removes files whose
    process is gone and keeps those of running processes, those of another pid namespace (a container
    sharing /dev/shm), and files not named like slots."""
    import os
    import subprocess
    import sys

    from wsimamba.features.fastread import SLOT_PREFIX, DecodeProcesses, remove_stale_slots, slot_owner

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"{SLOT_PREFIX}{slot_owner(int(dead))}-abc"
    live = tmp_path / f"{SLOT_PREFIX}{slot_owner()}-def"
    foreign = tmp_path / f"{SLOT_PREFIX}1-{dead}-ghi"  # same dead pid, another namespace
    other = tmp_path / f"{SLOT_PREFIX}notapid"
    for f in (stale, live, foreign, other):
        f.write_bytes(b"x")
    assert remove_stale_slots(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and foreign.exists() and other.exists()
    stale.write_bytes(b"x")
    procs = DecodeProcesses(1, slots=1, slot_bytes=1 << 20, shm_dir=str(tmp_path))  # sweeps on start
    try:
        assert not stale.exists() and live.exists()
        assert os.path.basename(procs.path).startswith(f"{SLOT_PREFIX}{slot_owner()}-")
    finally:
        procs.close()
    assert not os.path.exists(procs.path)


def test_decoding_processes_report_bad_tiles_and_survive_a_dead_worker(slides, tmp_path, monkeypatch):
    """A tile cut short raises a SlideError naming the file at its batch, and its slot comes back; a
    worker that dies fails the batch it was decoding with a SlideError, and the next batches decode
    in fresh workers."""
    import os

    from wsimamba.errors import SlideError
    from wsimamba.features.fastread import DecodeProcesses

    src = slides["synth_svs"]
    with open_slide(src) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 128, 0, max_patches=16))
    rec = plan.recipe(0, 8)
    ref = read_patches(plan, "cpu", "cpu", batch_size=8)[:8]
    procs = DecodeProcesses(2, slots=2, slot_bytes=8 * plan.read_size ** 2 * 3)
    try:
        out = procs.decode(plan, rec)
        np.testing.assert_array_equal(out.numpy(), ref)
        del out
        # a truncated copy of the slide: the last tile the batch needs lies past the end
        cut = tmp_path / "cut.svs"
        last = int(rec.tiles[np.argmax(plan.level.offsets[rec.tiles])])
        cut.write_bytes(src.read_bytes()[: int(plan.level.offsets[last]) + 10])
        with _reading_from(plan, cut):
            with pytest.raises(SlideError, match=r"cut\.svs: tile \d+ of page \d+ is cut short"):
                procs.decode(plan, rec)
        assert procs._free.qsize() == 2  # the failed batch gave its slot back, the dropped patches theirs
        # a corrupt tile (its bytes overwritten) names the file and the tile
        first = int(rec.tiles[0])
        with _reading_from(plan, _corrupt_tile_copy(src, plan, first, tmp_path / "bad.svs")):
            with pytest.raises(SlideError, match=rf"bad\.svs: tile {first} of page \d+ (does not decode|decodes to)"):
                procs.decode(plan, rec)
        assert procs._free.qsize() == 2
        procs._pool.submit(os._exit, 3)  # a worker dies
        import time

        time.sleep(0.5)
        with pytest.raises(SlideError, match="decoding process died"):
            procs.decode(plan, rec)
        again = procs.decode(plan, rec)
        np.testing.assert_array_equal(again.numpy(), ref)
        # a slot kept alive by a reference cycle (as a failed batch's traceback can) is collected;
        # with every slot really in use, the batch is left to the caller's thread instead of waiting forever
        monkeypatch.setattr("wsimamba.features.fastread.SLOT_WAIT", 0.2)

        class Cycle:
            pass

        del again
        import gc

        gc.disable()  # only the decoder's own collection may free the cycle
        try:
            cyc = Cycle()
            cyc.self, cyc.patches = cyc, procs.decode(plan, rec)
            del cyc
            held = procs.decode(plan, rec)  # the other slot
            third = procs.decode(plan, rec)  # waits, collects the cycle, gets its slot
        finally:
            gc.enable()
        np.testing.assert_array_equal(third.numpy(), ref)
        assert procs.decode(plan, rec) is None  # both slots held by live tensors
        del held, third
    finally:
        procs.close()


def test_fallback_reasons(slides):
    with open_slide(slides["deflate"]) as slide:
        with pytest.raises(NativeTilesUnsupported, match="ZLIB|DEFLATE|not JPEG"):
            plan_tiles(slide, full_grid(slide, 0.5, 256))
    with open_slide(slides["misaligned"]) as slide:
        assert slide.level_downsamples[1] != 4.0
        with pytest.raises(NativeTilesUnsupported, match="not aligned"):
            plan_tiles(slide, full_grid(slide, 2.0, 64))
        plan_tiles(slide, full_grid(slide, 0.5, 256))  # level 0 of the same file is fine
    with open_slide(slides["synth_svs"]) as slide:
        grid = full_grid(slide, 0.5, 256)
        shifted = grid.coords + 3  # off the tile grid but at integer pixels: cut across tile borders
        grid.coords = shifted[(shifted[:, 0] + 256 <= 2048) & (shifted[:, 1] + 256 <= 2048)]
        assert plan_tiles(slide, grid).layout == "span"
        grid.coords = np.array([[2048 - 200, 0]])
        with pytest.raises(NativeTilesUnsupported, match="past the edge"):
            plan_tiles(slide, grid)


# ---------------------------------------------------------------------------------------------
# Through `wsimamba extract`


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


GOOD = ("synth_svs", "synth_tiff", "rgb_aperio", "ycc_tiff")
# 4 µm/px: 512 level-0 px per patch, read as 128 px at level 1 and resized to 64 (16 patches a slide)
CLI_ARGS = [a if a != "2.0" else "4.0" for a in EXTRACT_ARGS]


@pytest.fixture(scope="module")
def cli_slides(slides, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "slides"
    d.mkdir()
    for name in (*GOOD, "deflate", "misaligned"):
        (d / slides[name].name).symlink_to(slides[name])
    return d


@pytest.fixture(scope="module")
def extracted_both(cli_slides, tmp_path_factory):
    outs = {}
    good = tmp_path_factory.mktemp("lists") / "good.txt"
    good.write_text("\n".join(GOOD) + "\n")
    # tiles: the fast path; auto: on the CPU it reads with OpenSlide and records why, per slide
    for reader in ("openslide", "tiles", "auto"):
        out = tmp_path_factory.mktemp(f"out_{reader}")
        only_good = ["--slide-list", good] if reader != "auto" else []
        assert run_cli("extract", cli_slides, "--out", out, *CLI_ARGS, "--workers", "0", "--no-qc",
                       "--reader", reader, *only_good) == 0
        outs[reader] = out
    return outs


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_extract_readers_give_the_same_features(extracted_both):
    ref, fast = extracted_both["openslide"], extracted_both["tiles"]
    rows = manifest(fast)
    for name in GOOD:
        f_ref, c_ref, _, a_ref = read_features(ref / f"{name}.h5")
        f_fast, c_fast, _, a_fast = read_features(fast / f"{name}.h5")
        assert len(c_fast) > 5
        np.testing.assert_array_equal(c_ref, c_fast)
        assert _cosine(f_ref, f_fast).min() >= 0.999, name
        assert a_ref["reader"] == "openslide" and a_fast["reader"] == "tiles"
        assert a_fast["reader_decoder"] == "imagecodecs"
        assert a_fast["reader_layout"] == ("tile" if name == "ycc_tiff" else "crop")
        assert rows[name]["reader"] == "tiles"
    assert manifest(ref)["rgb_aperio"]["reader"] == "openslide"


def test_auto_falls_back_and_records_why(extracted_both):
    out = extracted_both["auto"]
    rows = manifest(out)
    cases = [("deflate", "not JPEG"), ("misaligned", "not aligned")] + [(name, "runs on cpu") for name in GOOD]
    for name, why in cases:
        assert rows[name]["status"] == "ok" and rows[name]["reader"] == "openslide"
        _, _, _, attrs = read_features(out / f"{name}.h5")
        assert attrs["reader"] == "openslide" and attrs["reader_requested"] == "auto"
        assert why in attrs["reader_fallback"], (name, attrs["reader_fallback"])


def test_reader_tiles_fails_unsuitable_slides_only(cli_slides, extracted_both, tmp_path, capsys):
    out = tmp_path / "f"
    lst = tmp_path / "list.txt"
    lst.write_text("deflate\nrgb_aperio\n")
    code = run_cli("extract", cli_slides, "--out", out, *CLI_ARGS, "--workers", "2", "--no-qc",
                   "--reader", "tiles", "--slide-list", lst)
    assert code == 1
    rows = manifest(out)
    assert rows["rgb_aperio"]["status"] == "ok" and rows["rgb_aperio"]["reader"] == "tiles"
    err = rows["deflate"]["error"]
    assert rows["deflate"]["status"] == "failed" and "\n" not in err
    assert "--reader tiles cannot read this slide" in err and "deflate.tiff" in err and "not JPEG" in err
    assert not (out / "deflate.h5").exists()
    # reader threads give what the in-process reader gave
    a, ca, _, _ = read_features(out / "rgb_aperio.h5")
    b, cb, _, _ = read_features(extracted_both["tiles"] / "rgb_aperio.h5")
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert "failed: deflate" in capsys.readouterr().err


def test_next_slides_tiles_are_read_while_this_one_is_embedded(cli_slides, extracted_both, tmp_path, monkeypatch):
    """With reader threads, slide k+1's tile reading starts before slide k's embedding ends, and
    slide k+1 is then embedded from those very items; the features are the in-process reader's."""
    import time

    import wsimamba.features.fastread as fr
    from wsimamba.config import ExtractConfig
    from wsimamba.features.extract import extract_cohort

    events = []
    real_start, real_run = fr.start_items, fr.run_tiles

    def start_items(plan, *a, **k):
        items = real_start(plan, *a, **k)
        events.append(("read-ahead", plan.level.path.stem, time.perf_counter(), id(items)))
        return items

    def run_tiles(plan, *a, items=None, started=None, **k):
        events.append(("run-start", plan.level.path.stem, time.perf_counter(), id(items) if items else None))

        def slow_start():
            started()
            time.sleep(0.5)  # a slow slide: the next one's reading must start meanwhile

        out = real_run(plan, *a, items=items, started=slow_start, **k)
        events.append(("run-end", plan.level.path.stem, time.perf_counter(), None))
        return out

    monkeypatch.setattr(fr, "start_items", start_items)
    monkeypatch.setattr(fr, "run_tiles", run_tiles)
    cfg = ExtractConfig(encoder="timm:test_resnet", random_init=True, target_mpp=4.0, patch_size=64, device="cpu",
                        batch_size=16, workers=2, reader="tiles", qc=False)
    paths = [next(cli_slides.glob(n + ".*")) for n in ("synth_svs", "rgb_aperio", "ycc_tiff")]
    res = extract_cohort(paths, tmp_path / "f", cfg)
    assert [r.status for r in res] == ["ok"] * 3
    names = [e[1] for e in events if e[0] == "run-start"]  # the order they were embedded in
    assert sorted(names) == sorted(p.stem for p in paths)
    for prev, name in zip(names, names[1:]):
        ahead = next(e for e in events if e[0] == "read-ahead" and e[1] == name)
        prev_end = next(e for e in events if e[0] == "run-end" and e[1] == prev)
        run = next(e for e in events if e[0] == "run-start" and e[1] == name)
        assert ahead[2] < prev_end[2], events  # read while the previous slide was still embedding
        assert run[3] == ahead[3], events  # and embedded from those items
    f, c, _, _ = read_features(tmp_path / "f" / "rgb_aperio.h5")
    f_ref, c_ref, _, _ = read_features(extracted_both["tiles"] / "rgb_aperio.h5")
    np.testing.assert_array_equal(c, c_ref)
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)


def test_files_are_finished_while_the_next_slide_is_embedded_and_a_failed_write_fails_its_slide_only(
        cli_slides, extracted_both, tmp_path, monkeypatch):
    """A slide's feature file is finished (last writes, attributes, rename) in the writing thread
    while the next slide is already being embedded; a write that fails fails that slide alone (no
    file under its final name, the error in the manifest), and the other slides' features are the
    in-process reader's."""
    import threading
    import time

    import wsimamba.features.fastread as fr
    from wsimamba.config import ExtractConfig
    from wsimamba.features.extract import extract_cohort
    from wsimamba.features.store import FeatureWriter

    events = []
    real_finalize, real_append, real_run = FeatureWriter.finalize, FeatureWriter.append, fr.run_tiles

    def finalize(self, *a, **k):
        t0 = time.perf_counter()
        time.sleep(0.3)
        out = real_finalize(self, *a, **k)
        events.append(("finalized", self.slide_id, t0, time.perf_counter(), threading.current_thread().name))
        return out

    def append(self, feats, coords):
        if self.slide_id == "rgb_aperio" and self.n >= 4:
            raise OSError(28, "No space left on device")
        return real_append(self, feats, coords)

    def run_tiles(plan, *a, **k):
        events.append(("run-start", plan.level.path.stem, time.perf_counter()))
        return real_run(plan, *a, **k)

    monkeypatch.setattr(FeatureWriter, "finalize", finalize)
    monkeypatch.setattr(FeatureWriter, "append", append)
    monkeypatch.setattr(fr, "run_tiles", run_tiles)
    cfg = ExtractConfig(encoder="timm:test_resnet", random_init=True, target_mpp=4.0, patch_size=64, device="cpu",
                        batch_size=4, workers=2, reader="tiles", qc=False)
    paths = [next(cli_slides.glob(n + ".*")) for n in ("synth_svs", "rgb_aperio", "ycc_tiff", "synth_tiff")]
    out = tmp_path / "f"
    res = extract_cohort(paths, out, cfg)
    assert [(r.slide_id, r.status) for r in res] == [  # by id, the order they are embedded in
        ("rgb_aperio", "failed"), ("synth_svs", "ok"), ("synth_tiff", "ok"), ("ycc_tiff", "ok")]
    assert "No space left on device" in res[0].error and "\n" not in res[0].error
    assert manifest(out)["rgb_aperio"]["status"] == "failed"
    assert not (out / "rgb_aperio.h5").exists() and not list(out.glob(".*.partial"))
    fin = {e[1]: e for e in events if e[0] == "finalized"}
    runs = {e[1]: e[2] for e in events if e[0] == "run-start"}
    assert set(fin) == {"synth_svs", "ycc_tiff", "synth_tiff"}
    assert all(e[4].startswith("wsimamba-write") for e in fin.values())
    assert runs["synth_tiff"] < fin["synth_svs"][3], events  # next slide embedded while the file was finished
    assert runs["ycc_tiff"] < fin["synth_tiff"][3], events
    for name in ("synth_svs", "ycc_tiff", "synth_tiff"):
        f, c, _, _ = read_features(out / f"{name}.h5")
        f_ref, c_ref, _, _ = read_features(extracted_both["tiles"] / f"{name}.h5")
        np.testing.assert_array_equal(c, c_ref)
        np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-5)
    # a rerun retries only the failed slide
    monkeypatch.setattr(FeatureWriter, "append", real_append)
    res = extract_cohort(paths, out, cfg)
    assert [r.status for r in res] == ["ok", "skipped", "skipped", "skipped"]


@pytest.mark.parametrize("decoder", ["cpu", "hybrid"])
def test_extract_with_decoding_processes(cli_slides, extracted_both, tmp_path, monkeypatch, decoder):
    """WSIMAMBA_TILE_PROCESSES=1 (the default on CUDA) on a CPU machine: `wsimamba extract` decodes
    tiles in worker processes, gives the in-process reader's features, and leaves no shared memory."""
    monkeypatch.setenv("WSIMAMBA_TILE_PROCESSES", "1")
    monkeypatch.setenv("WSIMAMBA_TILE_DECODER", decoder)
    before = _shm_files()
    out = tmp_path / "f"
    assert run_cli("extract", cli_slides, "--out", out, *CLI_ARGS, "--workers", "2", "--no-qc",
                   "--reader", "tiles", "--slide-list", _list(tmp_path, "rgb_aperio", "synth_svs", "ycc_tiff"),
                   "--batch-size", "4") == 0
    for name in ("rgb_aperio", "synth_svs", "ycc_tiff"):
        f, c, _, attrs = read_features(out / f"{name}.h5")
        f_ref, c_ref, _, _ = read_features(extracted_both["tiles"] / f"{name}.h5")
        np.testing.assert_array_equal(c, c_ref)
        np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-4)
        assert attrs["reader_device_batches"] + attrs["reader_cpu_batches"] == -(-len(c) // 4)
        assert attrs["reader_decoder"] == {"cpu": "imagecodecs-processes", "hybrid": "torchvision-cpu+imagecodecs-processes"}[decoder]
    assert _shm_files() == before


def _list(tmp_path: Path, *names: str) -> Path:
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(names) + "\n")
    return lst


def test_interrupted_tile_run_with_decoding_processes_stops_cleanly_and_resumes(cli_slides, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, decoding processes included) in the middle of a
    native-tile extraction with decoding processes: the command exits (130) instead of hanging, what
    is under a final name is complete, its shared-memory file is gone, and a rerun finishes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "f"
    env = dict(os.environ, WSIMAMBA_TILE_PROCESSES="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "wsimamba", "extract", str(cli_slides), "--out", str(out), "--encoder",
            "timm:test_vit", "--random-init", "--target-mpp", "2.0", "--patch-size", "64", "--device", "cpu",
            "--batch-size", "1", "--workers", "2", "--reader", "tiles", "--no-qc",
            "--slide-list", str(_list(tmp_path, "rgb_aperio", "synth_svs", "synth_tiff", "ycc_tiff"))]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("*.h5")):
            time.sleep(0.05)
        assert list(out.glob("*.h5")), "no slide finished"
        assert _shm_files_of(proc.pid)  # the run's slot file exists while it runs
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 130, proc.stderr.read()[-2000:]
    assert not _shm_files_of(proc.pid)
    done = sorted(p.stem for p in out.glob("*.h5"))
    assert 1 <= len(done) < 4
    for sid in done:
        feats, coords, _, attrs = read_features(out / f"{sid}.h5")
        assert len(feats) == len(coords) > 0 and attrs["reader_decoder"] == "imagecodecs-processes"
    rerun = subprocess.run(args[:args.index("--batch-size")] + ["--batch-size", "16"] + args[args.index("--workers"):],
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.stem for p in out.glob("*.h5")) == ["rgb_aperio", "synth_svs", "synth_tiff", "ycc_tiff"]
    assert not list(out.glob(".*.partial"))


def _shm_files_of(pid: int) -> list:
    import glob

    return glob.glob(f"/dev/shm/wsimamba-tiles-*-{pid}-*")


@pytest.mark.parametrize("decoder", ["device", "hybrid"])
def test_device_decoder_path_through_extract(cli_slides, extracted_both, tmp_path, monkeypatch, decoder):
    """WSIMAMBA_TILE_DECODER=device / hybrid on a CPU machine: the GPU path's stages with
    torchvision's CPU decoder (hybrid: and imagecodecs in the reader threads)."""
    monkeypatch.setenv("WSIMAMBA_TILE_DECODER", decoder)
    out = tmp_path / "f"
    lst = tmp_path / "list.txt"
    lst.write_text("rgb_aperio\nsynth_tiff\n")
    assert run_cli("extract", cli_slides, "--out", out, *CLI_ARGS, "--workers", "2", "--no-qc",
                   "--reader", "tiles", "--slide-list", lst, "--batch-size", "4") == 0
    for name in ("rgb_aperio", "synth_tiff"):
        f, c, _, attrs = read_features(out / f"{name}.h5")
        f_ref, c_ref, _, _ = read_features(extracted_both["openslide"] / f"{name}.h5")
        np.testing.assert_array_equal(c, c_ref)
        assert _cosine(f, f_ref).min() >= 0.999
        assert "MAE" in attrs["reader_detail"]
        batches = -(-len(c) // 4)
        assert attrs["reader_device_batches"] + attrs["reader_cpu_batches"] == batches
        if decoder == "device":
            assert attrs["reader_decoder"] == "torchvision-cpu" and attrs["reader_cpu_batches"] == 0
        else:
            assert attrs["reader_decoder"] == "torchvision-cpu+imagecodecs" and attrs["reader_device_batches"] >= 1
    monkeypatch.setenv("WSIMAMBA_TILE_DECODER", "gpu-please")
    assert run_cli("extract", cli_slides, "--out", tmp_path / "g", *CLI_ARGS, "--no-qc", "--reader", "tiles",
                   "--slide-list", lst) == 1


def test_reader_config_key_is_validated():
    from wsimamba.config import ExtractConfig, build_config
    from wsimamba.errors import ConfigError

    assert build_config(ExtractConfig, {"random_init": True}).reader == "auto"
    with pytest.raises(ConfigError, match="reader"):
        build_config(ExtractConfig, {"random_init": True, "reader": "fast"})


# ---------------------------------------------------------------------------------------------
# GPU (run with `pytest -m gpu tests/test_fast_read.py` on a CUDA machine)


# YCbCr slides with tissue-like content, where nvjpeg must pass the colour probe. Not rgb_aperio
# (nvjpeg ignores the Adobe transform flag: 74-112 grey levels off on an H200) and not ycc_tiff,
# whose saturated high-frequency test pattern puts nvjpeg's chroma upsampling 3.2 grey levels from
# libjpeg's (H200, 2026-11-26): both must go to the CPU decoder, and the pixel checks still apply.
NVJPEG_TRUSTED = ("synth_svs", "synth_tiff")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rgb_aperio", "ycc_tiff", "synth_svs", "synth_tiff"])
def test_gpu_patches_equal_openslide(slides, name):
    """The production choice on CUDA (probe, then hybrid nvjpeg + CPU decoding, or the CPU decoder
    alone) gives OpenSlide's pixels; where the probe trusts nvjpeg, so does nvjpeg alone."""
    dev = torch.device("cuda", torch.cuda.current_device())
    with open_slide(slides[name]) as slide:
        for key in ("level1-crop", "tile", "block-resized", "span-overlap"):
            tmpp, ps, ov = GRIDS[key]
            grid = full_grid(slide, tmpp, ps, ov)
            plan = plan_tiles(slide, grid)
            decoder, detail = choose_decoder(plan, dev, "auto")
            if name in NVJPEG_TRUSTED:
                assert decoder == "hybrid", detail
            ref = openslide_patches(slide, grid)
            for used in (decoder, "device") if decoder == "hybrid" else (decoder,):
                got = read_patches(plan, used, dev, batch_size=16)
                per_patch = mae(got, ref, axis=(1, 2, 3))
                print(f"{name} {key}: decoder={used} ({detail}); max patch MAE {per_patch.max():.2f}")
                assert per_patch.max() <= 2.0, (key, used, detail, per_patch.max())


@pytest.mark.gpu
def test_page_locked_slots_are_released_after_close(slides):
    """close() returns before the slots' page-locking is undone (a thread does it); once that thread is
    done, no slot is registered with CUDA any more."""
    from wsimamba.features.fastread import DecodeProcesses

    with open_slide(slides["synth_svs"]) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 128, 0, max_patches=16))
    rec = plan.recipe(0, 8)
    procs = DecodeProcesses(1, slots=2, slot_bytes=8 * plan.read_size ** 2 * 3)
    procs.pin(torch.device("cuda", torch.cuda.current_device()))
    out = procs.decode(plan, rec).cuda(non_blocking=True)
    ptrs = [procs._base + slot * procs.slot_bytes for slot in procs._pinned]
    assert len(ptrs) == 1
    procs.close()
    procs._unpinning.join(timeout=30)
    assert not procs._unpinning.is_alive()
    # registering the slot again succeeds only if it is not registered any more (else
    # cudaErrorHostMemoryAlreadyRegistered); the mapping lives as long as `procs`
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(ptrs[0], 4096, 1)) == 0
    assert int(cudart.cudaHostUnregister(ptrs[0])) == 0
    torch.cuda.synchronize()
    assert out.shape[0] == 8


@pytest.mark.gpu
@pytest.mark.xfail(strict=False, reason="records whether nvjpeg honours the Adobe APP14 transform flag; "
                   "when it does not, the probe sends RGB-coded tiles to the CPU decoder")
def test_nvjpeg_decodes_rgb_coded_tiles_with_the_adobe_marker(slides):
    with open_slide(slides["rgb_aperio"]) as slide:
        plan = plan_tiles(slide, full_grid(slide, 0.5, 256))
    ok, detail = probe_device_decoder(plan, torch.device("cuda", torch.cuda.current_device()))
    assert ok, detail


@pytest.mark.gpu
def test_gpu_extract_matches_openslide_and_uses_the_ranks_device(cli_slides, extracted_both, tmp_path, monkeypatch):
    n = torch.cuda.device_count()
    local = n - 1  # the last GPU: a rank other than 0 when there are several
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", str(local))
    args = list(CLI_ARGS)
    args[args.index("--device") + 1] = "auto"
    before = [torch.cuda.memory_allocated(i) for i in range(n)]
    # auto: decoding processes (page-locked slots); threads: in-process readers with hybrid decoding
    for out, reader, procs in (("openslide", "openslide", "auto"), ("auto", "auto", "auto"), ("threads", "auto", "0")):
        monkeypatch.setenv("WSIMAMBA_TILE_PROCESSES", procs)
        assert run_cli("extract", cli_slides, "--out", tmp_path / out, *args, "--workers", "2", "--no-qc",
                       "--reader", reader) == 0
    for name in GOOD:
        f_ref, c_ref, _, _ = read_features(tmp_path / "openslide" / f"{name}.h5")
        for out in ("auto", "threads"):
            f, c, _, attrs = read_features(tmp_path / out / f"{name}.h5")
            np.testing.assert_array_equal(c, c_ref)
            assert _cosine(f, f_ref).min() >= 0.999, (name, out)
            assert attrs["reader"] == "tiles"
        _, _, _, attrs = read_features(tmp_path / "auto" / f"{name}.h5")
        assert attrs["reader_decoder"] == "imagecodecs-processes" and attrs["reader_device_batches"] == 0
        _, _, _, attrs = read_features(tmp_path / "threads" / f"{name}.h5")
        assert attrs["reader_decoder"] in ("nvjpeg+imagecodecs", "imagecodecs")
        if name in NVJPEG_TRUSTED:
            assert attrs["reader_decoder"] == "nvjpeg+imagecodecs" and attrs["reader_device_batches"] >= 1
    if n > 1:
        assert torch.cuda.memory_allocated(0) == before[0]  # nothing of this rank landed on GPU 0
