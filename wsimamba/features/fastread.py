"""Extraction from native tiles: read raw JPEG tile bytes, decode them in bulk, cut patches, encode.

Four stages overlap, so the encoder does not wait for reading or decoding:

1. reading (`workers` threads of this process; `TileItems`): one item per batch of patches; a
   thread reads the tile bytes the batch needs with plain `pread`s (`TileReader`), then either
   turns them into self-contained JPEG streams for the device decoder or decodes and assembles
   them itself (libjpeg-turbo via imagecodecs, which releases the GIL, with the colour space forced
   from the TIFF photometric) into pinned memory. Threads, not processes: they start in
   microseconds (forking 16 DataLoader workers cost ~0.2 s per slide on an H200 host), and decoded
   patches need no copy between processes;
2. decoding (one thread, its own CUDA stream): `torchvision.io.decode_jpeg(list, device=...)` (nvjpeg
   on CUDA), assembly of patches with one gather, resize to the grid's patch size; or, for
   CPU-decoded batches, the copy of pinned patches to the device and the resize;
3. encoding (the calling thread): normalisation and the encoder, then a non-blocking copy of the
   features to the host;
4. writing (one thread): waits for the copy and appends to the feature file.

Decoders (`WSIMAMBA_TILE_DECODER`): `cpu`, `device`, or `hybrid` (the default on CUDA): batches go to
the device decoder while fewer than `HYBRID_BACKLOG` wait for it, and the reader threads decode the
rest on the CPU. nvjpeg issues a host-to-device copy and a colour-conversion kernel per tile, which
queue behind the encoder's kernels: on an H200 next to ResNet-50 it decoded 5.5k patches/s, against
31k alone, while 12 reader threads decode 14k/s on the CPU. The two decoders agree within JPEG
rounding (the probe below checks it per slide); `cpu` or `device` give a run that does not depend
on timing.

Colour safety: before a slide is decoded on the device, `probe_device_decoder` decodes sample tiles
of it both ways and compares them with the CPU reference; a device decoder that differs by more than
`PROBE_MAX_MAE` grey levels on any tile is not used for that slide (its tiles go to the CPU decoder).
A batch the device decoder rejects is decoded on the CPU.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wsimamba.errors import WsimambaError
from wsimamba.slide.tiles import Recipe, TilePlan, TileReader, assemble_copies, decode_tile_cpu, jpeg_stream

PROBE_TILES = 8
PROBE_MAX_MAE = 2.0
READ_THREADS = 4  # reader threads when only the device decodes (at most; never more than `workers`)
HYBRID_BACKLOG = 2  # hybrid decoding: reader threads decode on the CPU while this many batches wait for the device
SWITCH_INTERVAL = 0.001  # seconds; Python's thread switch interval while a tile pipeline runs (see run_tiles)
DECODERS = ("auto", "cpu", "device", "hybrid")
DECODER_ENV = "WSIMAMBA_TILE_DECODER"  # auto | cpu | device | hybrid: which decoder the tile reader uses

warnings.filterwarnings("ignore", message=r".*(decod|encod).*deprecated.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r".*TorchCodec.*", category=DeprecationWarning)


def requested_decoder() -> str:
    value = os.environ.get(DECODER_ENV, "auto").strip().lower() or "auto"
    if value not in DECODERS:
        raise WsimambaError(f"{DECODER_ENV}={value!r}: use one of {', '.join(DECODERS)}")
    return value


# ---------------------------------------------------------------------------------------------
# Stage 1: tile bytes per batch of patches


class DeviceBacklog:
    """Hybrid decoding: how many batches wait for the device decoder. A reader thread hands its batch
    to the device while fewer than `limit` wait, and decodes it on the CPU itself otherwise."""

    def __init__(self, limit: int = HYBRID_BACKLOG):
        self.limit = max(1, int(limit))
        self.waiting = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.waiting < self.limit:
                self.waiting += 1
                return True
            return False

    def release(self) -> None:
        with self._lock:
            self.waiting -= 1


class TileBatches:
    """Item k: patches [k * batch, (k + 1) * batch) of a plan, read (and maybe decoded) in the
    calling thread.

    Decoded here (decoder "cpu", or "hybrid" when the device has a backlog):
    {"start", "stop", "patches": uint8 (n, r, r, 3)}, in pinned memory when `pin`.
    For the device decoder: {"start", "stop", "streams", "tiles", "slots", "ox", "oy"}, "streams"
    holding the batch's tiles as self-contained JPEG streams, one uint8 tensor each.
    """

    def __init__(self, plan: TilePlan, batch_size: int, decoder: str, pin: bool = False,
                 backlog: DeviceBacklog | None = None):
        if decoder == "hybrid" and backlog is None:
            raise ValueError("hybrid decoding needs a DeviceBacklog")
        self.plan = plan
        self.batch = max(1, int(batch_size))
        self.decoder = decoder
        self.pin = pin
        self.backlog = backlog
        self._reader: TileReader | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return -(-len(self.plan) // self.batch)

    def reader(self) -> TileReader:
        with self._lock:  # one file descriptor for all threads: pread is positionless
            if self._reader is None:
                self._reader = TileReader(self.plan.level)
            return self._reader

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __getitem__(self, k: int) -> dict:
        start = k * self.batch
        stop = min(len(self.plan), start + self.batch)
        rec = self.plan.recipe(start, stop)
        raw = self.reader().read(rec.tiles)
        lv = self.plan.level
        item = {"start": start, "stop": stop}
        to_device = self.decoder == "device" or (self.decoder == "hybrid" and self.backlog.take())
        if not to_device:
            tiles = [decode_tile_cpu(b, lv.tables, lv.colorspace) for b in raw]
            r = rec.size
            out = torch.empty((len(rec), r, r, 3), dtype=torch.uint8, pin_memory=self.pin)
            assemble_copies(tiles, rec, out.numpy())
            item["patches"] = out
            return item
        streams = [jpeg_stream(b, lv.tables, lv.splice) for b in raw]
        item["streams"] = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
        item.update(tiles=torch.from_numpy(rec.tiles), slots=torch.from_numpy(rec.slots),
                    ox=torch.from_numpy(rec.ox), oy=torch.from_numpy(rec.oy))
        return item


def recipe_of(item: dict, plan: TilePlan) -> Recipe:
    lv = plan.level
    return Recipe(tiles=item["tiles"].numpy(), slots=item["slots"].numpy(), ox=item["ox"].numpy(),
                  oy=item["oy"].numpy(), size=plan.read_size, tile_w=lv.tile_w, tile_h=lv.tile_h)


# ---------------------------------------------------------------------------------------------
# Stage 2: decoding and assembly on the device


def decode_streams(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Self-contained JPEG streams (uint8 1-D CPU tensors) → uint8 (3, h, w) RGB tensors on `device`
    (nvjpeg on CUDA, libjpeg-turbo on the CPU), decoded as one batch."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
    return list(out)


def assemble_gather(tiles: list[torch.Tensor], rec: Recipe, device: torch.device) -> torch.Tensor:
    """Patches uint8 (n, r, r, 3) from decoded tiles ((3, tile_h, tile_w) each) with one gather.

    Pixel (y, x) of patch p lies at (oy + y, ox + x) relative to the patch's first tile, so in the
    tile of row (oy + y) // th, column (ox + x) // tw of its span, at ((oy + y) % th, (ox + x) % tw).
    """
    th, tw, r = rec.tile_h, rec.tile_w, rec.size
    for t in tiles:
        if tuple(t.shape) != (3, th, tw):
            raise WsimambaError(f"a decoded tile is {tuple(t.shape)}, expected (3, {th}, {tw})")
    stack = torch.stack(tiles).permute(0, 2, 3, 1)  # (T, th, tw, 3)
    n = len(rec)
    ar = torch.arange(r, device=device, dtype=torch.int64)
    y = torch.as_tensor(rec.oy, device=device).long()[:, None] + ar  # (n, r)
    x = torch.as_tensor(rec.ox, device=device).long()[:, None] + ar
    slots = torch.as_tensor(rec.slots, device=device).long()
    p = torch.arange(n, device=device)[:, None, None]
    slot = slots[p, (y // th)[:, :, None], (x // tw)[:, None, :]]  # (n, r, r)
    return stack[slot, (y % th)[:, :, None], (x % tw)[:, None, :]]


def resize_patches(patches: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (n, r, r, 3) → uint8 (n, size, size, 3): bilinear with antialiasing, rounded, which is
    what `Slide.read_at` does with PIL."""
    if patches.shape[1] == size and patches.shape[2] == size:
        return patches
    x = patches.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def device_patches(item: dict, plan: TilePlan, device: torch.device, stats: dict | None = None) -> torch.Tensor:
    """A stage-1 item → uint8 (n, patch_size, patch_size, 3) patches on `device`."""
    if "patches" in item:
        patches = item["patches"].to(device, non_blocking=True)
    else:
        rec = recipe_of(item, plan)
        streams = item["streams"]
        try:
            tiles = decode_streams(streams, device)
        except RuntimeError:
            # a stream the device decoder rejects: decode this batch with the reference decoder
            lv = plan.level
            if stats is not None:
                stats["cpu_batches_after_device_error"] = stats.get("cpu_batches_after_device_error", 0) + 1
            raw = [bytes(s.numpy().tobytes()) for s in streams]
            tiles = [torch.from_numpy(decode_tile_cpu(b, None, lv.colorspace)).permute(2, 0, 1).to(device) for b in raw]
        patches = assemble_gather(tiles, rec, device)
    return resize_patches(patches, plan.patch_size)


def probe_device_decoder(plan: TilePlan, device: torch.device, n: int = PROBE_TILES) -> tuple[bool, str]:
    """Decode sample tiles of the plan on `device` and with the CPU reference; (trusted, detail).

    Samples tiles under patches spread over the grid (tissue, so colours are informative). Trusted
    when every tile decodes to the reference's shape within PROBE_MAX_MAE mean absolute error.
    """
    lv = plan.level
    picks = np.unique(np.linspace(0, len(plan) - 1, num=min(n, len(plan))).round().astype(np.int64))
    tiles = np.unique(np.concatenate([plan.recipe(int(p), int(p) + 1).tiles for p in picks]))[: 2 * n]
    with TileReader(lv) as reader:
        raw = reader.read(tiles)
    streams = [torch.frombuffer(bytearray(jpeg_stream(b, lv.tables, lv.splice)), dtype=torch.uint8) for b in raw]
    try:
        got = decode_streams(streams, device)
    except RuntimeError as e:
        return False, f"device decoder failed on sample tiles ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    worst = 0.0
    for b, g in zip(raw, got):
        ref = decode_tile_cpu(b, lv.tables, lv.colorspace)
        g = g.permute(1, 2, 0).cpu().numpy()
        if g.shape != ref.shape:
            return False, f"device decoder gave {g.shape} for a {ref.shape} tile"
        worst = max(worst, float(np.abs(g.astype(np.int16) - ref.astype(np.int16)).mean()))
    if worst > PROBE_MAX_MAE:
        return False, f"device decoder differs from the reference by {worst:.1f} grey levels ({lv.colorspace} JPEG)"
    return True, f"max tile MAE {worst:.2f} vs reference on {len(raw)} tiles"


@dataclass
class TileRun:
    """What the tile reader did for one slide (recorded in the feature file)."""

    decoder: str  # "nvjpeg", "torchvision-cpu", "imagecodecs", or hybrid: "nvjpeg+imagecodecs" (...)
    layout: str
    detail: str
    device_fallback_batches: int = 0
    device_batches: int = 0  # batches decoded by the device decoder
    cpu_batches: int = 0  # batches decoded by imagecodecs in the reader threads

    def attrs(self) -> dict:
        return {
            "reader_decoder": self.decoder,
            "reader_layout": self.layout,
            "reader_detail": self.detail,
            "reader_device_fallback_batches": self.device_fallback_batches,
            "reader_device_batches": self.device_batches,
            "reader_cpu_batches": self.cpu_batches,
        }


def choose_decoder(plan: TilePlan, device: torch.device, requested: str) -> tuple[str, str]:
    """("cpu" | "device" | "hybrid", why). `auto` is hybrid on CUDA and cpu elsewhere; any decoding
    on the device needs the colour probe to pass, else the slide is decoded on the CPU."""
    if requested == "cpu" or (requested == "auto" and device.type != "cuda"):
        return "cpu", "CPU decoding requested" if requested == "cpu" else "no CUDA device"
    ok, detail = probe_device_decoder(plan, device)
    if not ok:
        return "cpu", detail
    return ("hybrid" if requested == "auto" else requested), detail


# ---------------------------------------------------------------------------------------------
# The pipeline


def _indexed(device: torch.device) -> torch.device:
    """A CUDA device with its index ("cuda" means the calling thread's current device)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Background:
    """Runs `fn(item)` over `items` in a thread, `depth` results ahead; iterate to get them in order.
    An exception in the thread is raised here; `close()` stops the thread early."""

    _END = object()

    def __init__(self, items, fn, depth: int, device: torch.device):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        device = _indexed(device)
        self.thread = threading.Thread(target=self._run, args=(items, fn, device), daemon=True)
        self.thread.start()

    def _put(self, x) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items, fn, device):
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # a new thread starts on GPU 0 otherwise
            for item in items:
                if self.stop.is_set() or not self._put((fn(item), None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put((None, e))

    def __iter__(self):
        while True:
            value, err = self.q.get()
            if err is not None:
                raise err
            if value is self._END:
                return
            yield value

    def close(self) -> None:
        self.stop.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=30)


class ThreadReader:
    """Items `ds[0], ds[1], ...` in order, made by `threads` threads at most `ahead` items ahead of
    the consumer; the first `start` items are requested right away, before iteration begins (so a
    slide's first batches can be read while the previous slide is still being embedded). An
    exception in a thread is raised when its item is reached; `close()` cancels what has not started."""

    def __init__(self, ds, threads: int, ahead: int, start: int = 0, initializer=None):
        self.ds = ds
        self.ahead = max(1, ahead)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="wsimamba-read",
                                       initializer=initializer)
        self._futures: dict[int, object] = {}
        self._submitted = 0
        self._fill(start)

    def _fill(self, upto: int) -> None:
        upto = min(len(self.ds), upto)
        while self._submitted < upto:
            self._futures[self._submitted] = self.pool.submit(self.ds.__getitem__, self._submitted)
            self._submitted += 1

    def __iter__(self):
        for k in range(len(self.ds)):
            self._fill(k + self.ahead)
            yield self._futures.pop(k).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _reader_threads(decoder: str, workers: int) -> int:
    """Reader threads for `workers`: at most `READ_THREADS` when only the device decodes."""
    return min(workers, READ_THREADS) if decoder == "device" else workers


class TileItems:
    """Stage 1 for a plan: its `TileBatches` items in order, made by `workers` reader threads (at
    most `READ_THREADS` when only the device decodes), or in the consuming thread when
    `workers == 0`. `prefetch`: items to start reading at once, before iteration. Hybrid decoding
    shares `self.backlog` with the decoding stage. `pin` (a CUDA device): CPU-decoded batches land in
    pinned memory, allocated by threads set to that device (else they would open a context on GPU 0,
    also under a torchrun rank of another GPU). Iterate once, then `close()` (idempotent)."""

    def __init__(self, plan: TilePlan, batch_size: int, decoder: str, workers: int,
                 pin: torch.device | None = None, prefetch: int = 0):
        self.plan = plan
        self.decoder = decoder
        self.backlog = DeviceBacklog() if decoder == "hybrid" else None
        pin = _indexed(pin) if pin is not None and pin.type == "cuda" else None
        self.ds = TileBatches(plan, batch_size, decoder, pin=pin is not None, backlog=self.backlog)
        self._reader: ThreadReader | None = None
        if workers > 0:
            threads = _reader_threads(decoder, workers)
            init = None if pin is None else (lambda: torch.cuda.set_device(pin))
            self._reader = ThreadReader(self.ds, threads, ahead=2 * threads + 2, start=prefetch, initializer=init)
            self._items = iter(self._reader)
        else:
            self._items = (self.ds[k] for k in range(len(self.ds)))

    def __iter__(self):
        return self._items

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._items = iter(())
        self.ds.close()


def decode_item(item: dict, plan: TilePlan, device: torch.device, stats: dict, backlog: DeviceBacklog | None = None) -> torch.Tensor:
    """`device_patches` plus bookkeeping: counts device / CPU batches in `stats` and frees the
    item's place in the device backlog."""
    on_device = "streams" in item
    try:
        x = device_patches(item, plan, device, stats)
    finally:
        if on_device and backlog is not None:
            backlog.release()
    key = "device_batches" if on_device else "cpu_batches"
    stats[key] = stats.get(key, 0) + 1
    return x


def run_tiles(plan: TilePlan, embedder, append, batch_size: int, workers: int, requested: str = "auto",
              progress=None, started=None, choice: tuple[str, str] | None = None,
              items: TileItems | None = None) -> TileRun:
    """Embed every patch of `plan`; `append(features (B, D) float32, start, stop)` receives them in
    order. Returns what was done (decoder, layout, batches per decoder). `started()` is called once
    the reader threads exist. `choice`: `choose_decoder`'s answer when it was made ahead (it probes
    the device decoder on sample tiles, which `prepare_slide` does off the critical path). `items`:
    the plan's stage 1, already reading (`start_items`); closed here.

    While it runs, Python's thread switch interval is at most `SWITCH_INTERVAL` (1 ms instead of
    5): every torch call releases the GIL, and with reader threads busy the encoding and decoding
    threads otherwise wait up to an interval to get it back. On an H200 this raised the device
    decoder's pipeline from 5.8k to 9.0k patches/s (ResNet-50, 256 px).
    """
    device = embedder.device
    decoder, detail = choice if choice is not None else choose_decoder(plan, device, requested)
    on_cuda = device.type == "cuda"
    if items is not None and (items.plan is not plan or items.decoder != decoder):
        items.close()
        raise ValueError("run_tiles: the items were started for another plan or decoder")
    if items is None:
        items = TileItems(plan, batch_size, decoder, workers, pin=device if on_cuda else None)
    backlog = items.backlog
    if started is not None:
        try:
            started()
        except BaseException:
            items.close()
            raise
    stats: dict = {}
    stream = torch.cuda.Stream(device=device) if on_cuda else None

    @torch.inference_mode()
    def stage2(item):
        if stream is None:
            return item["start"], item["stop"], decode_item(item, plan, device, stats, backlog), None
        with torch.cuda.stream(stream):
            x = decode_item(item, plan, device, stats, backlog)
            ev = torch.cuda.Event()
            ev.record(stream)
        return item["start"], item["stop"], x, ev

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(old_interval, SWITCH_INTERVAL))
    bg = _Background(iter(items), stage2, depth=3, device=device)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsimamba-write")
    pending: list = []

    def write(host: torch.Tensor, ev, start: int, stop: int):
        if ev is not None:
            ev.synchronize()
        append(host.float().numpy(), start, stop)

    try:
        for start, stop, x, ev in bg:
            if ev is not None:
                torch.cuda.current_stream(device).wait_event(ev)
                x.record_stream(torch.cuda.current_stream(device))
            feats = embedder.embed(x)
            if on_cuda:
                host = feats.to("cpu", non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(device))
            else:
                host, done = feats, None
            pending.append(pool.submit(write, host, done, start, stop))
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.pop(0).result()
            if progress is not None:
                progress.patches_done(stop - start)
        for f in pending:
            f.result()
    finally:
        bg.close()
        pool.shutdown(wait=True)
        items.close()
        sys.setswitchinterval(old_interval)
    dev_name = "nvjpeg" if on_cuda else "torchvision-cpu"
    name = {"cpu": "imagecodecs", "device": dev_name, "hybrid": f"{dev_name}+imagecodecs"}[decoder]
    return TileRun(decoder=name, layout=plan.layout, detail=detail,
                   device_fallback_batches=int(stats.get("cpu_batches_after_device_error", 0)),
                   device_batches=int(stats.get("device_batches", 0)), cpu_batches=int(stats.get("cpu_batches", 0)))


def start_items(plan: TilePlan, decoder: str, batch_size: int, workers: int, device: torch.device) -> TileItems | None:
    """A plan's stage 1, started now with half its reader threads' worth of batches requested, for
    `run_tiles(items=...)` later; None without reader threads."""
    if workers <= 0:
        return None
    threads = _reader_threads(decoder, workers)
    return TileItems(plan, batch_size, decoder, workers, pin=device if device.type == "cuda" else None,
                     prefetch=max(1, threads // 2))


def read_patches(plan: TilePlan, decoder: str = "cpu", device: torch.device | str = "cpu",
                 batch_size: int = 64, workers: int = 0, stats: dict | None = None) -> np.ndarray:
    """Every patch of a plan, uint8 (N, patch_size, patch_size, 3), read with the same stages the
    pipeline uses, decoding in this thread (for tests and inspection). `stats` receives the batch
    counts per decoder."""
    device = torch.device(device)
    stats = {} if stats is None else stats
    items = TileItems(plan, batch_size, decoder, workers)
    try:
        out = [decode_item(item, plan, device, stats, items.backlog).cpu().numpy() for item in items]
    finally:
        items.close()
    ps = plan.patch_size
    return np.concatenate(out) if out else np.zeros((0, ps, ps, 3), np.uint8)
