"""Extraction from native tiles: read raw JPEG tile bytes, decode them in bulk, cut patches, encode.

Four stages overlap, so the encoder does not wait for reading or decoding:

1. reading (`TileItems`): one item per batch of patches, made by reader threads. In a cohort the
   threads are shared by all slides (`ReadPool`, `read_pool`), with one budget of batches requested
   ahead of the embedding, served in slide order: the next slides are read while this one is
   embedded. A thread either hands the batch to a decoding process (`DecodeProcesses`: read, decode
   and assemble into a page-locked shared-memory slot; the default on CUDA), or reads the tile bytes
   itself with plain `pread`s (`TileReader`) and then decodes and assembles them (libjpeg-turbo via
   imagecodecs, with the colour space forced from the TIFF photometric) into pinned memory, or turns
   them into self-contained JPEG streams for the device decoder. Threads start in microseconds
   (forking 16 DataLoader workers cost ~0.2 s per slide on an H200 host); the decoding processes
   live for the whole cohort;
2. decoding (one thread, its own CUDA stream): `torchvision.io.decode_jpeg(list, device=...)` (nvjpeg
   on CUDA), assembly of patches with one gather, resize to the grid's patch size; or, for
   CPU-decoded batches, the copy of the patches to the device and the resize;
3. encoding (the calling thread): normalisation and the encoder (`PatchEmbedder`: CUDA graphs on
   CUDA), then a non-blocking copy of the features to the host;
4. writing (one thread, `FeatureWrites`, shared by a cohort): waits for the copy and appends to the
   feature file; a slide's file is finished there too, while the next slide is embedded.

Why processes decode on CUDA: every `pread`, decoder call and torch call releases the GIL and must
win it back. With twelve decoding threads in the embedding process (16-core H200 host), each thread,
the encoding one included, kept about a third of a core busy and the pipeline ran at 6-7k patches/s
(ResNet-50, 224 px), the GPU ~60% busy; with decoding processes, 10.5-11k once started.

Decoders (`WSIMAMBA_TILE_DECODER`): `cpu`, `device`, or `hybrid` (the default when reader threads
decode on CUDA; with decoding processes `auto` means `cpu`): batches go to the device decoder while
fewer than `HYBRID_BACKLOG` wait for it, and the CPU decodes the rest. nvjpeg issues a host-to-device
copy and a colour-conversion kernel per tile, which queue behind the encoder's kernels: on an H200
next to ResNet-50 it decoded 5.5k patches/s, against 31k alone. The two decoders agree within JPEG
rounding (the probe below checks it per slide); `cpu` or `device` give a run that does not depend
on timing.

Colour safety: before a slide is decoded on the device, `probe_device_decoder` decodes sample tiles
of it both ways and compares them with the CPU reference; a device decoder that differs by more than
`PROBE_MAX_MAE` grey levels on any tile is not used for that slide (its tiles go to the CPU decoder).
A batch the device decoder rejects is decoded on the CPU.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import mmap
import os
import queue
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsimamba.errors import SlideError, WsimambaError
from wsimamba.features.decodeprocs import DecodeJob, attach, decode_into, ready
from wsimamba.features.prepare import _context
from wsimamba.osthreads import name_os_thread
from wsimamba.slide.tiles import Recipe, TilePlan, TileReader, decode_and_assemble, decode_tile_cpu, jpeg_stream

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


PROCESSES_ENV = "WSIMAMBA_TILE_PROCESSES"  # auto | 0 | 1: CPU tile decoding in worker processes (auto: on CUDA)
SHM_DIR = "/dev/shm"
SLOT_PREFIX = "wsimamba-tiles-"  # slot files: SLOT_PREFIX + "<pid namespace>-<pid>-<random>" (`slot_owner`)
SLOT_WAIT = 5.0  # seconds a decoding-process batch waits for a free slot before a garbage collection


def _whole_pages(nbytes: int) -> int:
    """`nbytes` rounded up to whole 2 MiB (huge) pages: the unit slots are sized and page-locked in."""
    return -(-nbytes // (2 << 20)) * (2 << 20)


def processes_requested(device: torch.device) -> bool:
    """Whether CPU tile decoding runs in worker processes: `WSIMAMBA_TILE_PROCESSES` = 1 / 0, or auto
    (the default): on CUDA, where decoding threads starve the encoding thread of the GIL."""
    value = os.environ.get(PROCESSES_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise WsimambaError(f"{PROCESSES_ENV}={value!r}: use auto, 0 or 1")
    return value == "1" or (value == "auto" and device.type == "cuda")


class DecodeProcesses:
    """CPU tile decoding in `processes` worker processes (`decodeprocs`), each batch written into one
    of `slots` slots of `slot_bytes` in a shared-memory file. `decode(plan, recipe)` (called by a
    reader thread, which waits without holding the GIL) returns the batch as a uint8 tensor over its
    slot; the slot is free again when that tensor is garbage. A batch larger than a slot returns None
    (the caller decodes it in its thread). Workers that die are replaced for the next batch; the batch
    they were decoding raises. `close()` stops the workers and removes the file."""

    def __init__(self, processes: int, slots: int, slot_bytes: int, shm_dir: str = SHM_DIR):
        self.processes = max(1, int(processes))
        self.slot_bytes = _whole_pages(int(slot_bytes))
        self._pinned: dict[int, int] = {}  # slot → bytes page-locked for the GPU (see pin())
        self._pin_device: torch.device | None = None
        self.nslots = max(1, int(slots))
        size = self.nslots * self.slot_bytes
        if not os.path.isdir(shm_dir) or shutil.disk_usage(shm_dir).free < size:
            raise WsimambaError(f"{shm_dir}: not enough shared memory for {size / 2**30:.1f} GiB of decoded tiles")
        remove_stale_slots(shm_dir)
        fd, self.path = tempfile.mkstemp(prefix=f"{SLOT_PREFIX}{slot_owner()}-", dir=shm_dir)
        weakref.finalize(self, Path(self.path).unlink, missing_ok=True)  # also at exit, should close() never run
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._free: queue.Queue = queue.Queue()
        for k in range(self.nslots):
            self._free.put(k)
        self._base: int | None = None  # address of the mapping (for page-locking)
        self._unpinning: threading.Thread | None = None  # undoes the page-locking after close()
        self._ctx = _context()
        self._lock = threading.Lock()
        self._pool = None
        self._start()
        # Start the workers now, from a thread: each start waits for the fork server (the first one for
        # its imports), while the caller goes on to build the encoder.
        self._spawner = threading.Thread(target=self._spawn, args=(self._pool,), name="wsimamba-spawn", daemon=True)
        self._spawner.start()

    def _spawn(self, pool) -> None:
        name_os_thread()
        try:
            for _ in range(self.processes):
                pool.submit(ready)
        except (RuntimeError, BrokenProcessPool):  # closed meanwhile, or a worker died: decode() handles it
            pass

    def _start(self):
        self._pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=self._ctx,
                                         initializer=attach, initargs=(self.path,))

    def decode(self, plan: TilePlan, rec: Recipe) -> torch.Tensor | None:
        r = rec.size
        nbytes = len(rec) * r * r * 3
        if nbytes > self.slot_bytes:
            return None
        lv = plan.level
        slot = self._take_slot()
        if slot is None:
            return None
        try:
            job = DecodeJob(path=str(lv.path), page=lv.page, tiles=rec.tiles, offsets=lv.offsets[rec.tiles],
                            counts=lv.counts[rec.tiles], tables=lv.tables, colorspace=lv.colorspace, recipe=rec,
                            offset=slot * self.slot_bytes)
            with self._lock:
                pool = self._pool
            try:
                pool.submit(decode_into, job).result()
            except BrokenProcessPool:
                with self._lock:  # a worker died (a crash in the decoder?): new workers for later batches
                    if self._pool is pool:
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._start()
                raise SlideError(f"{lv.path}: a tile decoding process died on patches of this slide") from None
        except BaseException:
            self._free.put(slot)
            raise
        if self._pin_device is not None:
            self._pin_slot(slot, nbytes)
        arr = np.ndarray((len(rec), r, r, 3), dtype=np.uint8, buffer=self._map, offset=slot * self.slot_bytes)
        out = torch.from_numpy(arr)
        weakref.finalize(out, self._free.put, slot)
        return out

    def _take_slot(self) -> int | None:
        """A free slot; None (the caller decodes in its thread) if none frees up. The read-ahead
        budget keeps fewer batches alive than there are slots, but a failed slide's batch can stay
        referenced from its exception's traceback (a reference cycle) until the garbage collector
        runs: collect once rather than wait for it."""
        try:
            return self._free.get(timeout=SLOT_WAIT)
        except queue.Empty:
            pass
        gc.collect()
        try:
            return self._free.get(timeout=SLOT_WAIT)
        except queue.Empty:
            return None

    def pin(self, device: torch.device) -> None:
        """Page-lock the slots for `device` as they are used (each slot as far as batches fill it), so
        that their copies to the GPU are DMA at full speed. The copy is then asynchronous: whoever
        copies a batch must wait for the copy before dropping the tensor (`device_patches` does)."""
        if device.type == "cuda":
            self._pin_device = device

    def _pin_slot(self, slot: int, nbytes: int) -> None:
        want = _whole_pages(nbytes)
        with self._lock:
            have = self._pinned.get(slot, 0)
            if have >= want:
                return
            if self._base is None:
                self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            cudart = torch.cuda.cudart()
            ptr = self._base + slot * self.slot_bytes
            if have:
                cudart.cudaHostUnregister(ptr)
            if int(cudart.cudaHostRegister(ptr, want, 1)) != 0:  # portable: for every context
                warnings.warn("cannot page-lock the shared-memory tile slots; copies to the GPU stay pageable",
                              RuntimeWarning, stacklevel=2)
                self._pin_device = None
                self._pinned.pop(slot, None)
                return
            self._pinned[slot] = want

    def close(self) -> None:
        self._spawner.join()
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            if self._pinned:
                # No copy may still read a slot; then the page-locking is undone in a thread of its own.
                # While close() did it itself, an H200 run's last batch was 0.41-0.46 s from
                # extract_cohort's return (0.62-0.72 s with batches of 512); now 0.27 s. The mapping
                # stays alive until then; a process that exits first leaves that to the driver.
                torch.cuda.synchronize(self._pin_device)
                ptrs = [self._base + slot * self.slot_bytes for slot in self._pinned]
                self._unpinning = threading.Thread(target=_unpin, args=(ptrs, self._map), name="wsimamba-unpin",
                                                   daemon=True)
                self._unpinning.start()
                self._pinned.clear()
        Path(self.path).unlink(missing_ok=True)


def _unpin(ptrs: list[int], mapping: mmap.mmap) -> None:
    """Undo `cudaHostRegister` on `ptrs` (slots of `mapping`, kept alive until then)."""
    name_os_thread()
    cudart = torch.cuda.cudart()
    for ptr in ptrs:
        cudart.cudaHostUnregister(ptr)
    del mapping


def _pid_namespace() -> str:
    try:
        return "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit()) or "0"
    except OSError:
        return "0"


def slot_owner(pid: int | None = None) -> str:
    """"<pid namespace>-<pid>": whose slot file it is. The namespace keeps a container that shares
    /dev/shm (but not process ids) with another from taking that one's live files for stale ones."""
    return f"{_pid_namespace()}-{os.getpid() if pid is None else int(pid)}"


def remove_stale_slots(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove slot files left by killed runs (SIGKILL skips every clean-up): a file is named after the
    process that made it (`slot_owner`), and removed when that process, in this process's pid
    namespace, no longer exists. Returns what it removed."""
    gone = []
    ns = _pid_namespace()
    for path in glob.glob(os.path.join(shm_dir, SLOT_PREFIX + "*")):
        parts = os.path.basename(path)[len(SLOT_PREFIX):].split("-")
        if len(parts) < 3 or parts[0] != ns:
            continue  # another namespace's (or not a slot file)
        try:
            pid = int(parts[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # its process still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        try:
            os.unlink(path)
            gone.append(path)
        except OSError:
            pass
    return gone


class TileBatches:
    """Item k: patches [k * batch, (k + 1) * batch) of a plan, read (and maybe decoded) in the
    calling thread.

    Decoded here (decoder "cpu", or "hybrid" when the device has a backlog):
    {"start", "stop", "patches": uint8 (n, r, r, 3)}, in pinned memory when `pin`.
    For the device decoder: {"start", "stop", "streams", "tiles", "slots", "ox", "oy"}, "streams"
    holding the batch's tiles as self-contained JPEG streams, one uint8 tensor each.
    """

    def __init__(self, plan: TilePlan, batch_size: int, decoder: str, pin: bool = False,
                 backlog: DeviceBacklog | None = None, procs: DecodeProcesses | None = None):
        if decoder == "hybrid" and backlog is None:
            raise ValueError("hybrid decoding needs a DeviceBacklog")
        self.plan = plan
        self.batch = max(1, int(batch_size))
        if procs is not None:  # batches must fit a shared-memory slot (patches read larger than the grid's)
            self.batch = max(1, min(self.batch, procs.slot_bytes // (plan.read_size ** 2 * 3)))
        self.decoder = decoder
        self.pin = pin
        self.backlog = backlog
        self.procs = procs
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
        lv = self.plan.level
        item = {"start": start, "stop": stop}
        to_device = self.decoder == "device" or (self.decoder == "hybrid" and self.backlog.take())
        if not to_device and self.procs is not None:
            patches = self.procs.decode(self.plan, rec)
            if patches is not None:
                item["patches"] = patches
                item["slot"] = True  # a shared-memory slot: free only once copied (device_patches waits)
                return item
        raw = self.reader().read(rec.tiles)
        if not to_device:
            r = rec.size
            out = torch.empty((len(rec), r, r, 3), dtype=torch.uint8, pin_memory=self.pin)
            decode_and_assemble(raw, rec.tiles, lv.tables, lv.colorspace, lv.path, lv.page, rec, out.numpy())
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
        if item.get("slot") and device.type == "cuda":
            # the slot is reused once the item is dropped: wait for the copy, asleep (a blocking
            # event), not spinning a core as a stream synchronisation does
            copied = torch.cuda.Event(blocking=True)
            copied.record(torch.cuda.current_stream(device))
            copied.synchronize()
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
        name_os_thread("wsimamba-stage2")
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


class ReadPool:
    """Reader threads shared by the slides of a cohort, with one budget: at most `ahead` items requested
    and not yet taken by their consumer, over all the `ThreadReader`s open on the pool. Readers are
    served in the order they were opened (a cohort's slide order), so the slide being embedded always
    comes first, and the threads go on to the next slides' batches as soon as it is all requested: a
    slide of a few batches no longer leaves most threads idle at its end. `close()` stops the threads."""

    def __init__(self, threads: int, ahead: int, initializer=None, procs: "DecodeProcesses | None" = None):
        self.threads = max(1, int(threads))
        self.ahead = max(1, int(ahead))
        self.procs = procs  # CPU decoding in worker processes, for the readers that use this pool
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="wsimamba-read",
                                           initializer=initializer)
        self._lock = threading.Lock()
        self._readers: list[ThreadReader] = []
        self._outstanding = 0  # requested, not yet taken, over all open readers

    def _open(self, reader: "ThreadReader") -> None:
        with self._lock:
            self._readers.append(reader)
            self._pump()

    def _pump(self) -> None:
        """Request items while the budget allows, earliest reader first (call with the lock held): a
        reader gets items only once every reader before it is all requested."""
        for r in self._readers:
            while self._outstanding < self.ahead and r._submitted < len(r.ds):
                r._submit_next()
                self._outstanding += 1

    def _take(self, reader: "ThreadReader", k: int):
        """The future of `reader`'s item k, requesting it now if the budget had not reached it. The
        item counts against the budget until the consumer comes back for the next one (`_release`)."""
        with self._lock:
            self._release_held(reader)
            if k >= reader._submitted:  # not reached yet: request it (and anything before it) now
                while reader._submitted <= k:
                    reader._submit_next()
                    self._outstanding += 1
            f = reader._futures.pop(k)
            reader._held = True
            self._pump()
        return f

    def _release_held(self, reader: "ThreadReader") -> None:
        if reader._held:
            reader._held = False
            self._outstanding -= 1

    def _release(self, reader: "ThreadReader") -> None:
        with self._lock:
            self._release_held(reader)
            self._pump()

    def _close(self, reader: "ThreadReader") -> list:
        """Forget `reader`: cancel its items not started, free its share of the budget; the futures
        still running (to wait for)."""
        with self._lock:
            if reader not in self._readers:
                return []
            self._readers.remove(reader)
            running = []
            for f in reader._futures.values():
                if not f.cancel():
                    running.append(f)
            self._outstanding -= len(reader._futures)
            self._release_held(reader)
            reader._futures.clear()
            reader._submitted = len(reader.ds)
            self._pump()
        return running

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.procs is not None:
            self.procs.close()


class ThreadReader:
    """Items `ds[0], ds[1], ...` in order, made by reader threads at most `ahead` items ahead of the
    consumer. `pool`: a shared `ReadPool` (its budget then spans every reader open on it, and reading
    starts as soon as the budget reaches this reader, before iteration begins); without one, a private
    pool of `threads` threads. An exception in a thread is raised when its item is reached; `close()`
    cancels what has not started and waits for what has."""

    def __init__(self, ds, threads: int = 1, ahead: int = 1, initializer=None, pool: ReadPool | None = None):
        self.ds = ds
        self._own = pool is None
        self.pool = ReadPool(threads, ahead, initializer) if pool is None else pool
        self._futures: dict[int, object] = {}
        self._submitted = 0
        self._held = False  # the item last given to the consumer still counts against the budget
        self._closed = False
        self.pool._open(self)

    def _submit_next(self) -> None:
        k = self._submitted
        self._futures[k] = self.pool.executor.submit(self.ds.__getitem__, k)
        self._submitted += 1

    def __iter__(self):
        for k in range(len(self.ds)):
            if self._closed:
                return
            yield self.pool._take(self, k).result()
        self.pool._release(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        running = self.pool._close(self)
        wait(running)  # they use the caller's file handles, which are closed next
        if self._own:
            self.pool.close()


def _reader_threads(decoder: str, workers: int) -> int:
    """Reader threads for `workers`: at most `READ_THREADS` when only the device decodes."""
    return min(workers, READ_THREADS) if decoder == "device" else workers


def read_pool(workers: int, device: torch.device, slot_bytes: int = 0) -> ReadPool:
    """A cohort's reader threads: `workers` of them, on CUDA set to `device`, so that pinned memory
    they allocate belongs to it (else they would open a context on GPU 0, also under a torchrun rank
    of another GPU).

    With `slot_bytes` (the bytes of one batch of patches) and `processes_requested(device)`, CPU
    decoding runs in `workers` worker processes (`DecodeProcesses`), `workers + 4` batches requested
    ahead of the embedding over all slides; else in the threads, `2 * workers + 2` ahead. Where
    /dev/shm cannot hold the slots, the threads decode, with a warning."""
    init = _device_initializer(device)
    if slot_bytes > 0 and processes_requested(device):
        ahead = workers + 4
        try:
            procs = DecodeProcesses(workers, slots=ahead + 3, slot_bytes=slot_bytes)
            procs.pin(device)
            return ReadPool(workers, ahead, initializer=init, procs=procs)
        except WsimambaError as e:
            warnings.warn(f"tile decoding stays in threads: {e}", RuntimeWarning, stacklevel=2)
    return ReadPool(workers, 2 * workers + 2, initializer=init)


def _device_initializer(device: torch.device | None):
    """A reader-thread initializer: names the thread for the operating system (`name_os_thread`) and,
    on CUDA, sets `device`."""
    if device is None or device.type != "cuda":
        return name_os_thread
    dev = _indexed(device)

    def init() -> None:
        name_os_thread()
        torch.cuda.set_device(dev)

    return init


class TileItems:
    """Stage 1 for a plan: its `TileBatches` items in order, made by reader threads, or in the
    consuming thread when `workers == 0`. The threads: those of `pool` (a cohort's shared
    `read_pool`; reading starts at once, as soon as the pool's budget reaches this slide), else
    `workers` private ones (at most `READ_THREADS` when only the device decodes). Hybrid decoding
    shares `self.backlog` with the decoding stage. `pin` (a CUDA device): CPU-decoded batches land in
    pinned memory. Iterate once, then `close()` (idempotent)."""

    def __init__(self, plan: TilePlan, batch_size: int, decoder: str, workers: int,
                 pin: torch.device | None = None, pool: ReadPool | None = None):
        self.plan = plan
        self.decoder = decoder
        self.backlog = DeviceBacklog() if decoder == "hybrid" else None
        pin = _indexed(pin) if pin is not None and pin.type == "cuda" else None
        self.ds = TileBatches(plan, batch_size, decoder, pin=pin is not None, backlog=self.backlog,
                              procs=pool.procs if pool is not None else None)
        self._reader: ThreadReader | None = None
        if pool is not None:
            self._reader = ThreadReader(self.ds, pool=pool)
            self._items = iter(self._reader)
        elif workers > 0:
            threads = _reader_threads(decoder, workers)
            self._reader = ThreadReader(self.ds, threads, ahead=2 * threads + 2, initializer=_device_initializer(pin))
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


class FeatureWrites:
    """Stage 4, shared by a cohort's slides: one thread that waits for each batch's device→host copy
    and appends it to its slide's file, in order, and then runs each slide's finishing step (the
    file's last write and rename) after that slide's batches. The embedding loop waits only while
    more than `depth` batches are unwritten, so it goes on to the next slide's batches while the last
    one's file is being finished, and the GPU is not left idle between slides. A failed write is kept
    by its slide (`SlideWrites`): that slide's later batches are skipped, and other slides go on."""

    def __init__(self, depth: int = 2):
        self.depth = max(1, int(depth))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsimamba-write",
                                            initializer=name_os_thread)
        self._batches: deque = deque()

    def slide(self, append) -> "SlideWrites":
        """A slide's writes: `append(features (B, D) float32, start, stop)` runs in this thread."""
        return SlideWrites(self, append)

    def _batch(self, fn, *args) -> None:
        self._batches.append(self._executor.submit(fn, *args))
        while self._batches and (len(self._batches) > self.depth or self._batches[0].done()):
            wait([self._batches.popleft()])

    def after(self, fn, *args) -> Future:
        """Run `fn(*args)` in the writing thread after every batch queued so far; its future."""
        return self._executor.submit(fn, *args)

    def drain(self) -> None:
        """Wait until every queued write has run."""
        self.after(lambda: None).result()
        self._batches.clear()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._executor.shutdown(wait=True)


class SlideWrites:
    """One slide's batches in a `FeatureWrites` thread; `check()` raises the first failed write."""

    def __init__(self, owner: FeatureWrites, append):
        self.owner = owner
        self.append = append
        self.error: BaseException | None = None

    def put(self, host: torch.Tensor, ev, start: int, stop: int) -> None:
        self.owner._batch(self._write, host, ev, start, stop)

    def _write(self, host: torch.Tensor, ev, start: int, stop: int) -> None:
        if self.error is not None:
            return
        try:
            if ev is not None:
                ev.synchronize()
            self.append(host.float().numpy(), start, stop)  # float() is a no-op for float32 (the GPU path)
        except BaseException as e:  # noqa: BLE001 - the slide's owner raises it (check)
            self.error = e

    def fail(self, error: BaseException) -> None:
        """Skip this slide's writes still queued (its embedding failed)."""
        if self.error is None:
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def run_tiles(plan: TilePlan, embedder, append, batch_size: int, workers: int, requested: str = "auto",
              progress=None, started=None, choice: tuple[str, str] | None = None,
              items: TileItems | None = None, pool: ReadPool | None = None) -> TileRun:
    """Embed every patch of `plan`; `append` receives the features (B, D) float32 in order.

    `append`: a function `append(features, start, stop)`, run in a writing thread of this call, which
    returns once all are written (raising the first failed write); or a `SlideWrites` of a cohort's
    `FeatureWrites`, and then this returns as soon as the last batch is queued: the caller waits for
    the writes (`FeatureWrites.after`) and checks them (`SlideWrites.check`). A failed write stops the
    embedding at the next batch either way.

    Returns what was done (decoder, layout, batches per decoder). `started()` is called once the
    reader threads exist. `choice`: `choose_decoder`'s answer when it was made ahead (it probes the
    device decoder on sample tiles, which `prepare_slide` does off the critical path). `items`: the
    plan's stage 1, already reading (`start_items`); closed here. `pool`: the cohort's reader threads
    (`read_pool`), used when `items` is not given.

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
        items = TileItems(plan, batch_size, decoder, workers, pin=device if on_cuda else None, pool=pool)
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

    own = not isinstance(append, SlideWrites)
    writes = FeatureWrites() if own else append.owner
    out = writes.slide(append) if own else append
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(old_interval, SWITCH_INTERVAL))
    bg = _Background(iter(items), stage2, depth=3, device=device)
    try:
        for start, stop, x, ev in bg:
            out.check()
            if ev is not None:
                torch.cuda.current_stream(device).wait_event(ev)
                x.record_stream(torch.cuda.current_stream(device))
            feats = embedder.embed(x)
            if on_cuda:
                # float32 on the GPU: a CPU cast in the writing thread would wake the intra-op
                # thread pool (which then spins) for every batch. A blocking event: the writing
                # thread sleeps until the copy is done instead of spinning a core on it.
                host = feats.float().to("cpu", non_blocking=True)
                done = torch.cuda.Event(blocking=True)
                done.record(torch.cuda.current_stream(device))
            else:
                host, done = feats, None
            out.put(host, done, start, stop)
            if progress is not None:
                progress.patches_done(stop - start)
        if own:
            writes.drain()
            out.check()
    except BaseException as e:
        out.fail(e)
        raise
    finally:
        bg.close()
        if own:
            writes.close()
        items.close()
        sys.setswitchinterval(old_interval)
    dev_name = "nvjpeg" if on_cuda else "torchvision-cpu"
    cpu_name = "imagecodecs-processes" if items.ds.procs is not None else "imagecodecs"
    name = {"cpu": cpu_name, "device": dev_name, "hybrid": f"{dev_name}+{cpu_name}"}[decoder]
    return TileRun(decoder=name, layout=plan.layout, detail=detail,
                   device_fallback_batches=int(stats.get("cpu_batches_after_device_error", 0)),
                   device_batches=int(stats.get("device_batches", 0)), cpu_batches=int(stats.get("cpu_batches", 0)))


def start_items(plan: TilePlan, decoder: str, batch_size: int, workers: int, device: torch.device,
                pool: ReadPool | None = None) -> TileItems | None:
    """A plan's stage 1, started now, for `run_tiles(items=...)` later: on the cohort's `pool` (reading
    begins as soon as its budget reaches this slide), else on private reader threads with their
    budget's worth of batches requested; None without reader threads."""
    if workers <= 0 and pool is None:
        return None
    return TileItems(plan, batch_size, decoder, workers, pin=device if device.type == "cuda" else None, pool=pool)


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
