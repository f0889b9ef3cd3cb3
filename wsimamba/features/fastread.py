"""Extraction from native tiles: read raw JPEG tile bytes, decode them in bulk, cut patches, encode.

Four stages overlap, so the encoder does not wait for reading or decoding:

1. reading (DataLoader worker processes, or a thread when `workers == 0`): one item per batch of
   patches; the worker reads the tile bytes the batch needs (`TileReader`, plain `pread`s) and either
   decodes and assembles them itself (`decoder="cpu"`: libjpeg-turbo via imagecodecs with the colour
   space forced from the TIFF photometric) or packs the self-contained JPEG streams into one uint8
   tensor (`decoder="device"`);
2. decoding (one thread, its own CUDA stream): `torchvision.io.decode_jpeg(list, device=...)` (nvjpeg
   on CUDA), assembly of patches with one gather, resize to the grid's patch size; or, for CPU-decoded
   batches, the copy of pinned patches to the device and the resize;
3. encoding (the calling thread): normalisation and the encoder, then a non-blocking copy of the
   features to the host;
4. writing (one thread): waits for the copy and appends to the feature file.

Colour safety: before a slide is decoded on the device, `probe_device_decoder` decodes sample tiles
of it both ways and compares them with the CPU reference; a device decoder that differs by more than
`PROBE_MAX_MAE` grey levels on any tile is not used for that slide (its tiles go to the CPU decoder).
A batch the device decoder rejects is decoded on the CPU.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from wsimamba.errors import WsimambaError
from wsimamba.slide.tiles import Recipe, TilePlan, TileReader, assemble_copies, decode_tile_cpu, jpeg_stream

PROBE_TILES = 8
PROBE_MAX_MAE = 2.0
DECODERS = ("auto", "cpu", "device")
DECODER_ENV = "WSIMAMBA_TILE_DECODER"  # auto | cpu | device: which decoder the tile reader uses

warnings.filterwarnings("ignore", message=r".*(decod|encod).*deprecated.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r".*TorchCodec.*", category=DeprecationWarning)


def requested_decoder() -> str:
    value = os.environ.get(DECODER_ENV, "auto").strip().lower() or "auto"
    if value not in DECODERS:
        raise WsimambaError(f"{DECODER_ENV}={value!r}: use one of {', '.join(DECODERS)}")
    return value


# ---------------------------------------------------------------------------------------------
# Stage 1: tile bytes per batch of patches


class TileBatches(Dataset):
    """Item k: patches [k * batch, (k + 1) * batch) of a plan.

    decoder "cpu": {"start", "stop", "patches": uint8 (n, r, r, 3)} decoded and assembled here.
    decoder "device": {"start", "stop", "data": uint8 (total,), "lengths": int64 (T,), "tiles",
    "slots", "ox", "oy"}: the batch's tiles as self-contained JPEG streams packed end to end.
    """

    def __init__(self, plan: TilePlan, batch_size: int, decoder: str):
        self.plan = plan
        self.batch = max(1, int(batch_size))
        self.decoder = decoder
        self._reader: TileReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return -(-len(self.plan) // self.batch)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None  # never ship an open file to a worker
        return state

    def reader(self) -> TileReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = TileReader(self.plan.level)
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, k: int) -> dict:
        start = k * self.batch
        stop = min(len(self.plan), start + self.batch)
        rec = self.plan.recipe(start, stop)
        raw = self.reader().read(rec.tiles)
        lv = self.plan.level
        item = {"start": start, "stop": stop}
        if self.decoder == "cpu":
            tiles = [decode_tile_cpu(b, lv.tables, lv.colorspace) for b in raw]
            r = rec.size
            out = np.empty((len(rec), r, r, 3), np.uint8)
            item["patches"] = torch.from_numpy(assemble_copies(tiles, rec, out))
            return item
        streams = [jpeg_stream(b, lv.tables, lv.splice) for b in raw]
        item["data"] = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
        item["lengths"] = torch.tensor([len(s) for s in streams], dtype=torch.int64)
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
        streams = list(torch.split(item["data"], item["lengths"].tolist()))
        try:
            tiles = decode_streams(streams, device)
        except RuntimeError:
            # a stream the device decoder rejects: decode this batch with the reference decoder
            lv = plan.level
            if stats is not None:
                stats["cpu_batches"] = stats.get("cpu_batches", 0) + 1
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

    decoder: str  # "nvjpeg", "torchvision-cpu" or "imagecodecs"
    layout: str
    detail: str
    device_fallback_batches: int = 0

    def attrs(self) -> dict:
        return {
            "reader_decoder": self.decoder,
            "reader_layout": self.layout,
            "reader_detail": self.detail,
            "reader_device_fallback_batches": self.device_fallback_batches,
        }


def choose_decoder(plan: TilePlan, device: torch.device, requested: str) -> tuple[str, str]:
    """("cpu" | "device", why). Device decoding on CUDA by default, after the colour probe."""
    if requested == "cpu" or (requested == "auto" and device.type != "cuda"):
        return "cpu", "CPU decoding requested" if requested == "cpu" else "no CUDA device"
    ok, detail = probe_device_decoder(plan, device)
    return ("device", detail) if ok else ("cpu", detail)


# ---------------------------------------------------------------------------------------------
# The pipeline


class _Background:
    """Runs `fn(item)` over `items` in a thread, `depth` results ahead; iterate to get them in order.
    An exception in the thread is raised here; `close()` stops the thread early."""

    _END = object()

    def __init__(self, items, fn, depth: int, device: torch.device):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
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


def run_tiles(plan: TilePlan, embedder, append, batch_size: int, workers: int, requested: str = "auto",
              progress=None, started=None) -> TileRun:
    """Embed every patch of `plan`; `append(features (B, D) float32, start, stop)` receives them in
    order. Returns what was done (decoder, layout). `started()` is called once the worker processes
    exist."""
    device = embedder.device
    decoder, detail = choose_decoder(plan, device, requested)
    ds = TileBatches(plan, batch_size, decoder)
    on_cuda = device.type == "cuda"
    if workers > 0:
        loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=min(workers, len(ds)),
                            pin_memory=on_cuda and decoder == "cpu", prefetch_factor=4, persistent_workers=False)
        items = iter(loader)  # made here: its pinning thread takes this thread's (the rank's) device
    else:
        items = (ds[k] for k in range(len(ds)))
    if started is not None:
        started()
    stats: dict = {}
    stream = torch.cuda.Stream(device=device) if on_cuda else None

    @torch.inference_mode()
    def stage2(item):
        if stream is None:
            return item["start"], item["stop"], device_patches(item, plan, device, stats), None
        with torch.cuda.stream(stream):
            x = device_patches(item, plan, device, stats)
            ev = torch.cuda.Event()
            ev.record(stream)
        return item["start"], item["stop"], x, ev

    bg = _Background(items, stage2, depth=3, device=device)
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
        del items
    name = {"cpu": "imagecodecs", "device": "nvjpeg" if on_cuda else "torchvision-cpu"}[decoder]
    return TileRun(decoder=name, layout=plan.layout, detail=detail,
                   device_fallback_batches=int(stats.get("cpu_batches", 0)))


def read_patches(plan: TilePlan, decoder: str = "cpu", device: torch.device | str = "cpu",
                 batch_size: int = 64) -> np.ndarray:
    """Every patch of a plan, uint8 (N, patch_size, patch_size, 3), read in this process with the
    same stages the pipeline uses (for tests and inspection)."""
    device = torch.device(device)
    ds = TileBatches(plan, batch_size, decoder)
    out = [device_patches(ds[k], plan, device).cpu().numpy() for k in range(len(ds))]
    ps = plan.patch_size
    return np.concatenate(out) if out else np.zeros((0, ps, ps, 3), np.uint8)
