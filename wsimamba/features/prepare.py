"""Slide preparation, everything before the embedding: open the slide, find tissue, lay the patch grid,
render the QC image, and choose the reader (native tiles or OpenSlide).

`extract_cohort` prepares the next slides while the current one is embedded, with `SlidePreparer`:
in worker processes when the extraction has workers, so that preparation (OpenSlide reads, the tissue
mask, PNG encoding: 0.3-0.5 s per slide on an H200 host) neither holds the embedding process's GIL
nor shares its fate, and several slides are prepared at once when slides are small. This module
imports no torch, so those processes start in well under a second.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from wsimamba.config import ExtractConfig
from wsimamba.errors import SlideError
from wsimamba.osthreads import name_os_thread
from wsimamba.slide.qc import png_bytes, render_qc
from wsimamba.slide.reader import open_slide, slide_id_of
from wsimamba.slide.tiles import NativeTilesUnsupported, TilePlan, plan_tiles
from wsimamba.slide.tiling import PatchGrid, make_grid
from wsimamba.slide.tissue import TissueParams, detect_tissue, load_tissue_mask


@dataclass
class PreparedSlide:
    """A slide ready to embed: its grid, its reader, and the attributes its feature file will carry."""

    path: Path
    sid: str
    grid: PatchGrid
    plan: TilePlan | None
    slide_attrs: dict
    reader_attrs: dict
    tissue_attrs: dict
    seconds: float  # spent preparing
    decoder: tuple[str, str] | None = None  # tile plans: the tile decoder and why (set by the embedding process)
    items: object = None  # tile plans: their reading, started ahead (`fastread.TileItems`; embedding process only)
    qc_png: bytes | None = None  # the QC image (`--qc`), written to out_dir/qc/ when the slide's embedding starts


def choose_reader(slide, grid: PatchGrid, requested: str, device_type: str | None = None) -> tuple[TilePlan | None, str]:
    """(plan, fallback reason): a native-tile plan, or None and why the OpenSlide path reads instead.

    `requested`: "auto" (tiles when the plan allows and the encoder runs on CUDA, else OpenSlide),
    "tiles" (a slide the plan refuses is a SlideError naming the reason), "openslide".
    With the encoder on the CPU, reading is never the bottleneck, and the tile path's extra decode and
    resize threads compete with the encoder for the cores: 1.7× slower end to end on the 2-core CI
    machine (synthetic SVS, ResNet-50), so `auto` keeps OpenSlide there.
    """
    if requested == "openslide":
        return None, ""
    try:
        plan = plan_tiles(slide, grid)
    except NativeTilesUnsupported as e:
        if requested == "tiles":
            raise SlideError(f"{slide.path}: --reader tiles cannot read this slide: {e}") from None
        return None, str(e)
    if requested == "auto" and device_type is not None and device_type != "cuda":
        return None, f"the encoder runs on {device_type}, where reading is not the bottleneck (--reader tiles forces tiles)"
    return plan, ""


def prepare_cpu(slide_path: Path, cfg: ExtractConfig, device_type: str) -> PreparedSlide:
    """Open a slide, find tissue, lay the grid, render its QC image and pick its reader (no GPU, no
    torch: it runs in `SlidePreparer`'s processes). Writes nothing: the QC image is written when the
    slide's embedding starts, so that an extraction whose encoder fails to build has written nothing.
    Raises on failure."""
    t0 = time.perf_counter()
    slide_path = Path(slide_path)
    sid = slide_id_of(slide_path)
    tparams = TissueParams(**cfg.tissue.model_dump())
    with open_slide(slide_path, cfg.mpp_override) as slide:
        slide.require_mpp()
        if cfg.tissue_masks is not None:
            tissue = load_tissue_mask(Path(cfg.tissue_masks) / f"{sid}.png", slide)
        else:
            tissue = detect_tissue(slide, tparams)
        grid = make_grid(slide, tissue, cfg.target_mpp, cfg.patch_size, cfg.overlap, cfg.min_tissue)
        if len(grid) == 0:
            raise SlideError(
                f"{slide_path}: no patch has ≥ {cfg.min_tissue:.0%} tissue "
                f"(tissue found on {tissue.mask.mean():.1%} of the thumbnail)"
            )
        qc = None
        if cfg.qc:
            thumb = tissue.thumbnail
            if thumb is None:
                thumb = slide.thumbnail(max(1.0, max(slide.dimensions) / 2048))
            qc = png_bytes(render_qc(thumb, tissue, grid, slide.dimensions))
        slide_attrs = {
            "slide_id": sid,
            "slide_path": str(slide_path.resolve()),
            "slide_backend": slide.backend,
            "mpp_source": slide.mpp_source,
            "tissue_mask_source": tissue.source,
        }
        plan, fallback = choose_reader(slide, grid, cfg.reader, device_type)
    reader_attrs = {"reader": "tiles" if plan is not None else "openslide", "reader_requested": cfg.reader,
                    "reader_fallback": fallback}
    return PreparedSlide(slide_path, sid, grid, plan, slide_attrs, reader_attrs, tparams.as_attrs(),
                         time.perf_counter() - t0, qc_png=qc)


FORKSERVER_PRELOAD = ["wsimamba.features._mpmain", "wsimamba.features.prepare", "wsimamba.features.decodeprocs"]


def _context():
    """forkserver where there is one (a clean process to fork from: no CUDA, no held locks), else spawn.

    The fork server imports the caller's main script (`_mpmain`) and the worker modules once, before
    its first child (`FORKSERVER_PRELOAD`); each child is then a fork of it and skips them. Without
    that, every decoding or preparing process re-ran a main script that imports torch (about a second
    of CPU each)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    from multiprocessing import spawn

    from wsimamba.features._mpmain import MAIN_ENV

    # read by the fork server when it starts (it inherits the environment); this process's own main
    # script, never one inherited from a parent process
    main_path = spawn.get_preparation_data("wsimamba").get("init_main_from_path")
    if main_path:
        os.environ[MAIN_ENV] = main_path
    else:
        os.environ.pop(MAIN_ENV, None)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
    return ctx


def start_fork_server() -> None:
    """Start the fork server now, where there is one, without waiting for it: it imports its preload
    modules (numpy, scipy, OpenSlide, the slide code: ~0.6 s on an H200 host) in its own process while
    the caller imports torch and builds its encoder. Without this it started at the first decoding
    process, and that process's start waited for those imports."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class SlidePreparer:
    """Prepares `paths[k]` ahead of the embedding loop: `submit(k)` starts it, `result(k)` waits for it.

    processes > 0: `fn(path, *args)` runs in that many worker processes (forkserver; spawn where there
    is none), so `fn` must be a module-level function. A slide whose preparation kills its process
    (a crash in the slide library) breaks the pool for every slide in it: each of them is retried
    alone in a process of its own, so only the slide that crashes again is recorded as failed.
    processes == 0: `fn` runs in one thread of this process.
    `finish(prep)` runs in this process, in a thread, on every result (the tile decoder probe).
    """

    def __init__(self, fn: Callable, paths: Sequence[Path], args: tuple = (), processes: int = 0,
                 finish: Callable | None = None):
        self.fn, self.paths, self.args, self.finish = fn, list(paths), tuple(args), finish
        self.processes = max(0, int(processes))
        self._threads = ThreadPoolExecutor(max_workers=max(1, self.processes), thread_name_prefix="wsimamba-prepare",
                                           initializer=name_os_thread)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._futures: dict[int, Future] = {}
        self._taken: set[int] = set()

    def submit(self, k: int) -> None:
        with self._lock:
            if 0 <= k < len(self.paths) and k not in self._futures and k not in self._taken:
                self._futures[k] = self._threads.submit(self._prepare, k)

    def peek(self, k: int) -> PreparedSlide:
        """The prepared slide k, waiting for it, without taking it; raises what its preparation raised."""
        self.submit(k)
        with self._lock:
            f = self._futures[k]
        return f.result()

    def result(self, k: int) -> PreparedSlide:
        """Take the prepared slide k (submitting it if needed); raises what its preparation raised."""
        self.submit(k)
        with self._lock:
            f = self._futures.pop(k)
            self._taken.add(k)
        return f.result()

    def _prepare(self, k: int) -> PreparedSlide:
        path = self.paths[k]
        prep = self.fn(path, *self.args) if self.processes == 0 else self._in_process(path)
        return self.finish(prep) if self.finish is not None else prep

    def _in_process(self, path: Path) -> PreparedSlide:
        try:
            return self._submit_to_pool(path).result()
        except BrokenProcessPool:
            pass
        with ProcessPoolExecutor(max_workers=1, mp_context=_context()) as alone:
            try:
                return alone.submit(self.fn, path, *self.args).result()
            except BrokenProcessPool:
                raise SlideError(f"{path}: the process preparing this slide died (a crash in the slide library?)") from None

    def _submit_to_pool(self, path: Path) -> Future:
        with self._pool_lock:
            for _ in range(2):
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=_context(),
                                                     initializer=name_os_thread, initargs=("wsimamba-prep",))
                try:
                    return self._pool.submit(self.fn, path, *self.args)
                except BrokenProcessPool:  # an earlier crash broke it: start a fresh pool
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
            raise SlideError(f"{path}: cannot start a process to prepare this slide")

    def close(self) -> None:
        """Cancel what has not started and stop the threads and processes."""
        for f in self._futures.values():
            f.cancel()
        self._threads.shutdown(wait=True, cancel_futures=True)
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        self._futures.clear()
