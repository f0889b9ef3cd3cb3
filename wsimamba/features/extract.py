"""The extraction loop: slides → tissue → patch grid → encoder → one feature file per slide.

Per-slide errors never stop the cohort: a failing slide is recorded in the manifest and skipped.
Completed slides are skipped on a rerun unless `overwrite`. Work is split deterministically over
shards (`--shard I/N`) and over torchrun ranks (RANK / WORLD_SIZE / LOCAL_RANK).
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import wsimamba
from wsimamba.config import ExtractConfig
from wsimamba.errors import SlideError, WsimambaError
from wsimamba.features.encoders import Encoder, check_encoder, create_encoder
from wsimamba.features.manifest import ManifestUpdates, read_manifest
from wsimamba.features.prepare import PreparedSlide, SlidePreparer, choose_reader, prepare_cpu  # noqa: F401 (re-exported)
from wsimamba.features.store import FeatureWriter, final_path, is_complete, read_features, remove_output
from wsimamba.osthreads import name_os_thread
from wsimamba.slide.qc import write_png_atomic
from wsimamba.slide.reader import find_slides, open_slide, slide_id_of
from wsimamba.slide.tiling import PatchGrid


PREPARE_PROCESSES = 3  # at most; slides prepared at once ahead of the embedding
READ_AHEAD_SLIDES = 2  # native tiles: slides whose reading may start while the current one is embedded


@dataclass
class SlideResult:
    slide_id: str
    slide_path: str
    status: str  # "ok", "failed" or "skipped" (complete from an earlier run)
    patches: int = 0
    seconds: float = 0.0
    error: str = ""
    output: str = ""
    reader: str = ""  # "tiles" or "openslide": what read the patches


class ExtractProgress:
    """Progress events of an extraction; the CLI draws a bar from them. Defaults do nothing."""

    def start(self, n_slides: int) -> None: ...

    def slide_start(self, slide_id: str, n_patches: int) -> None: ...

    def patches_done(self, n: int) -> None: ...

    def slide_end(self, result: SlideResult) -> None: ...


# ---------------------------------------------------------------------------------------------
# Which slides this process handles


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (0 ≤ I < N) → (I, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise WsimambaError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise WsimambaError(f"--shard {text!r}: need 0 ≤ I < N")
    return i, n


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) outside it."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise WsimambaError("RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise WsimambaError(f"RANK={rank} WORLD_SIZE={world} is not a valid torchrun rank")
    return rank, world, local


def select_shard(paths: Sequence[Path], shard: tuple[int, int] = (0, 1), rank: tuple[int, int] = (0, 1)) -> list[Path]:
    """The slides of shard `shard` = (I, N), then of torchrun rank (r, W) inside it.

    Slides are ordered by id and dealt round-robin, so every slide lands in exactly one
    (shard, rank) and counts differ by at most one.
    """
    i, n = shard
    r, w = rank
    part = n * w
    k = i * w + r
    ordered = sorted(paths, key=lambda p: slide_id_of(p))
    return ordered[k::part]


def resolve_slides(slides_dir: Path, slide_list: Path | None = None) -> list[Path]:
    """Slide files of a folder, restricted to the ids or file names in `slide_list` when given.

    `slide_list`: one id or file name per line, or a CSV whose header has a `slide_id` column.
    """
    paths = find_slides(slides_dir)
    if slide_list is None:
        return paths
    slide_list = Path(slide_list)
    if not slide_list.is_file():
        raise WsimambaError(f"{slide_list}: no such slide list")
    lines = [ln.strip() for ln in slide_list.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if lines and "slide_id" in [c.strip() for c in lines[0].split(",")]:
        import csv

        with open(slide_list, newline="") as f:
            wanted = [row["slide_id"].strip() for row in csv.DictReader(f) if row.get("slide_id", "").strip()]
    else:
        wanted = lines
    by_id = {slide_id_of(p): p for p in paths}
    by_name = {p.name: p for p in paths}
    chosen, missing = [], []
    for item in wanted:
        p = by_name.get(item) or by_id.get(item) or by_id.get(slide_id_of(Path(item)))
        (chosen if p is not None else missing).append(p if p is not None else item)
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise WsimambaError(f"{slide_list}: {len(missing)} slides not found in {slides_dir}: {shown}")
    return sorted(set(chosen), key=lambda p: slide_id_of(p))


# ---------------------------------------------------------------------------------------------
# Reading patches


class PatchDataset(Dataset):
    """Patches of one slide as uint8 (patch_size, patch_size, 3) tensors.

    The slide is opened lazily, so each DataLoader worker process holds its own handle.
    """

    def __init__(self, slide_path: Path, grid: PatchGrid, mpp_override: float | None):
        self.slide_path = Path(slide_path)
        self.coords = grid.coords
        self.size0 = grid.patch_size_level0
        self.out_size = grid.patch_size
        self.level = grid.patch_level
        self.mpp_override = mpp_override
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None  # never ship an open handle to a worker
        return state

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.slide_path, self.mpp_override)
        x, y = self.coords[i]
        return torch.from_numpy(self._slide.read_at((int(x), int(y)), self.size0, self.out_size, level=self.level))


# ---------------------------------------------------------------------------------------------
# Encoding


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise WsimambaError(f"--device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsimambaError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _fuse_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold eval-mode BatchNorm into the preceding convolutions (same function, one pass fewer over
    every activation); models torch.fx cannot trace are returned unchanged."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    except Exception:  # tracing is best effort: dynamic control flow in some timm models
        return model


class PatchEmbedder:
    """Runs an encoder on uint8 patch batches: resize, normalise, then the model.

    CUDA: bf16 autocast and channels_last, whole batches, and CUDA graphs: a batch shape seen a second
    time is captured (resize, normalisation and model together) and replayed from then on, so a batch
    costs a handful of Python calls instead of hundreds of kernel launches. In the tile pipeline every
    launch is a release and re-acquisition of the GIL, which the reader threads hold in turn, so the
    eager encoder waited for the GIL more than it ran. `cuda_graphs=False` (or the environment
    variable `WSIMAMBA_CUDA_GRAPHS=0`) keeps it eager; a shape whose capture fails runs eager, with a
    warning. CPU: channels_last, BatchNorm folded into the convolutions, and micro-batches of
    `cpu_micro_batch` patches, because on a CPU large batches push activations out of cache
    (ResNet-50 to layer3 at 256 px: ~25 ms/patch in batches of 4, ~45-50 in batches of 32, on the
    2-core CI machine).
    """

    MAX_GRAPHS = 4  # batch shapes captured at most (the full batch and a few others)

    def __init__(self, encoder: Encoder, device: torch.device, cpu_micro_batch: int = 4,
                 cuda_graphs: bool | None = None):
        self.encoder = encoder
        self.device = device
        model = encoder.model.to(device).eval()
        if device.type != "cuda":
            model = _fuse_batchnorm(model)
        self.model = model.to(memory_format=torch.channels_last)
        self.micro = None if device.type == "cuda" else max(1, cpu_micro_batch)
        self.mean = torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(encoder.std, device=device).view(1, 3, 1, 1)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("WSIMAMBA_CUDA_GRAPHS", "1").strip() not in ("0", "false", "no", "off")
        self.cuda_graphs = bool(cuda_graphs) and device.type == "cuda"
        self._seen: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple | None] = {}  # shape → (graph, static input, static output), None: eager
        self._pool = None

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """batch uint8 (B, H, W, 3) → float32 (B, dim)."""
        return self.embed(batch).float().cpu().numpy()

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """batch uint8 (B, H, W, 3), on any device → features (B, dim) on this device, not synchronised."""
        if self.cuda_graphs:
            key = (tuple(batch.shape), batch.dtype)
            entry = self._graphs.get(key, False)
            if entry is False:
                self._seen[key] = self._seen.get(key, 0) + 1
                if self._seen[key] >= 2 and len(self._graphs) < self.MAX_GRAPHS:
                    entry = self._graphs[key] = self._capture(batch)
            if entry:
                graph, static_in, static_out = entry
                static_in.copy_(batch, non_blocking=True)
                graph.replay()
                return static_out.clone()  # the next replay overwrites static_out
        return self._forward(batch)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        size = self.encoder.input_size
        if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            # no cast cache: a captured graph must not depend on tensors cached outside it
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                out = self.model(x)
        else:
            out = torch.cat([self.model(part) for part in x.split(self.micro)])
        return out

    def _capture(self, batch: torch.Tensor):
        """(graph, static input, static output) for batches shaped like `batch`, or None (eager) when
        the encoder cannot be captured."""
        import warnings

        try:
            static_in = torch.empty(batch.shape, dtype=batch.dtype, device=self.device)
            static_in.copy_(batch)
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (cuDNN algorithms, lazy allocations)
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all shapes: replays never overlap
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_out = self._forward(static_in)
            return graph, static_in, static_out
        except Exception as e:  # noqa: BLE001 - an encoder that cannot be captured still runs eager
            warnings.warn(f"encoder {self.encoder.name}: CUDA graph capture failed for batches of shape "
                          f"{tuple(batch.shape)} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "running eager", RuntimeWarning, stacklevel=3)
            return None


# ---------------------------------------------------------------------------------------------
# One slide


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) > 1:  # e.g. an error re-raised from a DataLoader worker carries its traceback
        return lines[-1]
    msg = lines[0]
    return msg if isinstance(e, WsimambaError) else f"{type(e).__name__}: {msg}"


def prepare_slide(slide_path: Path, cfg: ExtractConfig, device: torch.device) -> PreparedSlide:
    """Open a slide, find tissue, lay the grid, render its QC image, pick its reader and (tiles) its
    decoder. Raises on failure; writes nothing (`start_embed` writes the QC image). `extract_cohort`
    runs this ahead for the next slides while the current one is embedded (the CPU part in worker
    processes: `wsimamba.features.prepare`)."""
    return with_decoder(prepare_cpu(slide_path, cfg, device.type), device)


def with_decoder(prep: PreparedSlide, device: torch.device) -> PreparedSlide:
    """Choose the tile decoder of a prepared slide (probes the device decoder's colours on a few tiles)."""
    if prep.plan is not None:
        from wsimamba.features.fastread import choose_decoder, processes_requested, requested_decoder

        requested = requested_decoder()
        if requested == "auto" and processes_requested(device):
            # decoding processes keep up with the encoder on their own; nvjpeg next to the encoder
            # slows it down (its per-tile copies and kernels queue between the encoder's)
            prep.decoder = ("cpu", "CPU decoding in worker processes")
        else:
            prep.decoder = choose_decoder(prep.plan, device, requested)
    return prep


def start_embed(prep: PreparedSlide, out_dir: Path, cfg: ExtractConfig, embedder: PatchEmbedder,
                progress: ExtractProgress | None = None, started=None, writes=None, pool=None) -> Future:
    """Write a prepared slide's QC image, embed its patches and write its feature file; the future gives
    its `SlideResult` once the file is complete under its final name, or raises what failed (nothing is
    then left under the final name). `started()`, if given, is called once the reader's threads or
    worker processes exist.

    `writes` (a cohort's `fastread.FeatureWrites`) and `pool` (its `fastread.ReadPool`), for native
    tiles: the slide's last feature writes and its file's finishing are queued in the writing thread,
    and this returns as soon as every batch is embedded, so the next slide's batches follow on the GPU
    without a pause. Otherwise (and for the OpenSlide reader) the future is complete on return."""
    progress = progress or ExtractProgress()
    t0 = time.perf_counter()
    grid, reader_attrs = prep.grid, dict(prep.reader_attrs)
    if prep.qc_png is not None:
        write_png_atomic(prep.qc_png, Path(out_dir) / "qc" / f"{prep.sid}.png")
        prep.qc_png = None
    progress.slide_start(prep.sid, len(grid))
    writer = FeatureWriter(out_dir, prep.sid, embedder.encoder.dim, cfg.format)

    def finish() -> SlideResult:
        if writer.n != len(grid):
            raise SlideError(f"{prep.path}: {writer.n} of {len(grid)} patches were embedded")
        enc = embedder.encoder
        file_attrs = {
            "encoder": enc.name,
            "encoder_weights_sha256": enc.weights_sha256,
            "encoder_weights_path": enc.weights_path,
            "encoder_input_size": enc.input_size or grid.patch_size,
            "feature_dim": enc.dim,
            "wsimamba_version": wsimamba.__version__,
            "min_tissue": cfg.min_tissue,
            **prep.tissue_attrs,
            **prep.slide_attrs,
            **reader_attrs,
        }
        out = writer.finalize(grid.coords_attrs(prep.sid), file_attrs)
        return SlideResult(
            slide_id=prep.sid, slide_path=str(prep.path), status="ok", patches=len(grid),
            seconds=prep.seconds + time.perf_counter() - t0, output=str(out), reader=reader_attrs["reader"],
        )

    def append(feats, start, stop):
        writer.append(feats, grid.coords[start:stop])

    sink = None
    try:
        if prep.plan is not None:
            from wsimamba.features.fastread import requested_decoder, run_tiles

            sink = writes.slide(append) if writes is not None else append
            items, prep.items = prep.items, None
            run = run_tiles(prep.plan, embedder, sink, cfg.batch_size, cfg.workers, requested_decoder(), progress,
                            started=started, choice=prep.decoder, items=items, pool=pool)
            reader_attrs.update(run.attrs())
            if writes is not None:
                def finish_queued() -> SlideResult:
                    try:
                        sink.check()
                        return finish()
                    except BaseException:
                        writer.abort()
                        raise

                return writes.after(finish_queued)
        else:
            _read_with_openslide(prep.path, grid, cfg, embedder, writer, progress, started=started)
        res = finish()
    except BaseException:
        if writes is not None and sink is not None:
            writes.after(writer.abort).result()  # after the slide's queued writes (skipped: run_tiles failed them)
        else:
            writer.abort()
        raise
    done: Future = Future()
    done.set_result(res)
    return done


def embed_slide(prep: PreparedSlide, out_dir: Path, cfg: ExtractConfig, embedder: PatchEmbedder,
                progress: ExtractProgress | None = None, started=None) -> SlideResult:
    """Embed a prepared slide's patches and write its feature file. Raises on failure (nothing is left
    under the final name). `started()`, if given, is called once the reader's workers exist."""
    return start_embed(prep, out_dir, cfg, embedder, progress, started).result()


def extract_slide(
    slide_path: Path,
    out_dir: Path,
    cfg: ExtractConfig,
    embedder: PatchEmbedder,
    progress: ExtractProgress | None = None,
) -> SlideResult:
    """Extract one slide into `out_dir`. Raises on failure (the caller records it)."""
    return embed_slide(prepare_slide(slide_path, cfg, embedder.device), out_dir, cfg, embedder, progress)


def _read_with_openslide(slide_path: Path, grid: PatchGrid, cfg: ExtractConfig, embedder: PatchEmbedder,
                         writer: FeatureWriter, progress: ExtractProgress, started=None) -> None:
    """The general path: DataLoader workers call `Slide.read_at` per patch. `started()` is called once
    the worker processes exist."""
    ds = PatchDataset(slide_path, grid, cfg.mpp_override)
    on_cuda = embedder.device.type == "cuda"
    # small slides: smaller reading batches, so that every worker gets a share of the patches
    read_batch = max(1, min(cfg.batch_size, -(-len(ds) // max(1, cfg.workers))))
    loader = DataLoader(
        ds,
        batch_size=read_batch,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=on_cuda,
        prefetch_factor=4 if cfg.workers > 0 else None,
        persistent_workers=False,
    )
    offset = 0
    batches = iter(loader)  # forks the workers
    if started is not None:
        started()
    for batch in batches:
        feats = embedder(batch)
        b = feats.shape[0]
        writer.append(feats, grid.coords[offset : offset + b])
        offset += b
        progress.patches_done(b)


# ---------------------------------------------------------------------------------------------
# A cohort


def extract_cohort(
    slide_paths: Sequence[Path],
    out_dir: Path,
    cfg: ExtractConfig,
    shard: tuple[int, int] = (0, 1),
    progress: ExtractProgress | None = None,
) -> list[SlideResult]:
    """Extract this process's share of `slide_paths` into `out_dir`; returns one result per slide.

    Encoder problems (unknown name, missing or unfitting weights) raise before anything is written;
    slide problems are recorded in `out_dir/manifest.csv` and in the returned results.
    """
    progress = progress or ExtractProgress()
    out_dir = Path(out_dir)
    rank, world, local_rank = distributed_env()
    mine = select_shard(slide_paths, shard, (rank, world))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.tissue_masks is not None and not Path(cfg.tissue_masks).is_dir():
        raise WsimambaError(f"--tissue-masks {cfg.tissue_masks}: no such folder")
    check_encoder(cfg.encoder, cfg.weights, cfg.random_init)
    # Native-tile slides share one pool of reader threads (and, on CUDA, of decoding processes) and one
    # writing thread.
    from wsimamba.features.fastread import FeatureWrites, read_pool, start_items

    complete = {p: is_complete(out_dir, slide_id_of(p), cfg.format) and not cfg.overwrite for p in mine}
    todo = [p for p in mine if not complete[p]]
    pool = None

    # The first slides are prepared, and the first one's tiles read and decoded, while the encoder is
    # built (preparing writes nothing: the QC image is written when the slide's embedding starts); the
    # next slides are prepared (opened, tissue found, grid laid, QC rendered, reader picked) while the
    # current one is embedded, so the GPU does not wait for that between slides: in up to
    # `PREPARE_PROCESSES` worker processes when the extraction has workers (one per 4 workers), else in
    # a thread. Preparation of later slides starts once the current slide's reader has started: in a
    # thread, so as never to fork DataLoader workers while that thread is inside OpenSlide (a child
    # could inherit a lock nobody will release).
    procs = min(PREPARE_PROCESSES, max(1, cfg.workers // 4), len(todo)) if cfg.workers > 0 else 0
    if procs:
        preparer = SlidePreparer(prepare_cpu, todo, (cfg, device.type), processes=procs,
                                 finish=lambda prep: with_decoder(prep, device))
    else:
        preparer = SlidePreparer(prepare_slide, todo, (cfg, device))
    ahead = procs + 1 if procs else 1  # processes: keep the pool one slide ahead of its workers

    def prepare_ahead(k: int) -> None:
        for j in range(k, k + ahead):
            preparer.submit(j)

    # The next slides' tiles start being read (and decoded on the CPU) as soon as they are prepared,
    # while the current slide is still being embedded, up to the pool's budget of batches: a small
    # slide's batches keep only some of the readers busy otherwise, and its first batch arrives only
    # after one reader has decoded it. A slide's last writes and the finishing of its file happen in
    # the writing thread while the next slide is embedded; results are recorded in slide order as
    # they complete.
    writes = FeatureWrites()
    readahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsimamba-readahead",
                                   initializer=name_os_thread)
    reading: dict[int, object] = {}
    started_items: dict[int, object] = {}  # slide → its TileItems started ahead (closed when the slide is done)

    def read_ahead(k: int) -> None:
        if pool is None or k >= len(todo) or k in reading:
            return

        def attach() -> None:
            prep = preparer.peek(k)  # a failed preparation raises here; the main loop reports it
            if prep.plan is not None and prep.decoder is not None:
                prep.items = start_items(prep.plan, prep.decoder[0], cfg.batch_size, cfg.workers, device, pool=pool)
                started_items[k] = prep.items

        reading[k] = readahead.submit(attach)

    def on_started(i: int) -> None:
        prepare_ahead(i + 1)
        for k in range(i + 1, i + 1 + READ_AHEAD_SLIDES):
            read_ahead(k)

    inflight: deque = deque()  # (slide path, start time, future of its SlideResult), in slide order
    results: list[SlideResult] = []
    manifest_updates: ManifestUpdates | None = None  # rows written by a thread: the loop never waits for a rewrite

    def record(block: bool) -> None:
        while inflight and (block or inflight[0][2].done()):
            path, t0, fut = inflight.popleft()
            try:
                res = fut.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                res = SlideResult(slide_id_of(path), str(path), "failed", seconds=time.perf_counter() - t0,
                                  error=_one_line(e))
            manifest_updates.put({**res.__dict__, "seconds": f"{res.seconds:.2f}"})
            results.append(res)
            progress.slide_end(res)

    def close() -> None:
        readahead.shutdown(wait=True, cancel_futures=True)
        for items in started_items.values():
            items.close()
        writes.close()  # an interrupted run still finishes the files of slides already embedded
        if pool is not None:
            pool.close()
        preparer.close()
        if manifest_updates is not None:
            manifest_updates.stop()  # the rows of slides already recorded reach the file

    try:  # everything started above is stopped if anything fails before the loop's own cleanup
        # Slots hold a batch read at twice the grid's patch side (a 40x scan cut at 20x); shared memory
        # is only used as far as batches fill it, and larger reads come in smaller batches. No pool
        # (and no processes) for a rerun whose slides are all done.
        if cfg.workers > 0 and todo:
            pool = read_pool(cfg.workers, device, slot_bytes=cfg.batch_size * (2 * cfg.patch_size) ** 2 * 3)
        prepare_ahead(0)
        read_ahead(0)
        encoder = create_encoder(cfg.encoder, weights=cfg.weights, random_init=cfg.random_init, seed=cfg.seed,
                                 device=device if device.type == "cuda" else None)
        embedder = PatchEmbedder(encoder, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(out_dir)
        manifest_updates = ManifestUpdates(out_dir)
        progress.start(len(mine))
        for path in mine:
            sid = slide_id_of(path)
            if complete[path]:
                res = SlideResult(sid, str(path), "skipped", output=str(final_path(out_dir, sid, cfg.format)))
                row = manifest.get(sid)
                if row is None or row.get("status") != "ok":
                    # complete output without a manifest row (e.g. the manifest was deleted): rebuild it
                    try:
                        feats, _, _, _ = read_features(final_path(out_dir, sid, cfg.format))
                        res.patches = int(feats.shape[0])
                    except WsimambaError:
                        pass
                    manifest_updates.put({**res.__dict__, "status": "ok", "seconds": ""})
                else:
                    res.patches = int(row.get("patches") or 0)
                results.append(res)
                progress.slide_end(res)
            elif cfg.overwrite:
                remove_output(out_dir, sid, cfg.format)
    except BaseException:
        close()
        raise

    try:
        for i, path in enumerate(todo):
            t0 = time.perf_counter()
            try:
                if i in reading:
                    reading.pop(i).exception()  # wait until its reading has started (or failed to)
                prep = preparer.result(i)
                fut = start_embed(prep, out_dir, cfg, embedder, progress, started=lambda: on_started(i),
                                  writes=writes, pool=pool)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                fut = Future()
                fut.set_exception(e)
            finally:
                items = started_items.pop(i, None)
                if items is not None:
                    items.close()  # run_tiles closed it, unless the slide failed before reading
            on_started(i)  # when the slide failed before its readers started
            inflight.append((path, t0, fut))
            record(block=False)
        record(block=True)
        manifest_updates.close()  # every row in the file; raises what a rewrite raised
    finally:
        close()
    order = {str(p): k for k, p in enumerate(mine)}
    results.sort(key=lambda r: order.get(r.slide_path, len(order)))
    return results


def extract_folder(
    slides_dir: Path,
    out_dir: Path,
    cfg: ExtractConfig,
    slide_list: Path | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: ExtractProgress | None = None,
) -> list[SlideResult]:
    """`wsimamba extract SLIDES_DIR --out OUT_DIR`: resolve the slides, then `extract_cohort`."""
    paths = resolve_slides(slides_dir, slide_list)
    if not paths:
        raise WsimambaError(f"{slides_dir}: no slide files found")
    return extract_cohort(paths, out_dir, cfg, shard, progress)
