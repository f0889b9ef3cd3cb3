"""CPU tile decoding in worker processes, into shared memory.

In one process, reader threads that decode tiles take turns at the GIL with the encoding thread: every
`pread` and every decoder call releases it and must win it back. On an H200 host (16 cores) twelve
such threads kept about a third of a core busy each, and the pipeline ran at 6-7k patches/s whatever
the encoder did. Here each batch is read, decoded and assembled by a worker process (a GIL of its
own) straight into a slot of a shared-memory file; the embedding process only maps the slot as a
tensor and copies it to the GPU.

This module imports no torch: its functions run in the worker processes. The embedding process's
side is `fastread.DecodeProcesses`.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from wsimamba.osthreads import name_os_thread
from wsimamba.slide.tiles import Recipe, decode_and_assemble, read_tile_bytes

MAX_OPEN_FILES = 8  # slide files a worker keeps open

_slots: mmap.mmap | None = None  # this worker's mapping of the slot file
_files: OrderedDict[str, int] = OrderedDict()


@dataclass
class DecodeJob:
    """One batch: the tiles to read (byte ranges in `path`), how to decode them, how to assemble
    the patches, and where they go (`offset` bytes into the slot file)."""

    path: str
    page: int
    tiles: np.ndarray  # tile indices (for messages)
    offsets: np.ndarray
    counts: np.ndarray
    tables: bytes | None
    colorspace: str
    recipe: Recipe
    offset: int


def attach(path: str) -> None:
    """Worker initializer: map the slot file."""
    global _slots
    name_os_thread("wsimamba-decode")
    fd = os.open(path, os.O_RDWR)
    try:
        _slots = mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _fd(path: str) -> int:
    fd = _files.pop(path, None)
    if fd is None:
        if len(_files) >= MAX_OPEN_FILES:
            os.close(_files.popitem(last=False)[1])
        fd = os.open(path, os.O_RDONLY)
    _files[path] = fd  # most recently used last
    return fd


def decode_into(job: DecodeJob) -> int:
    """Read, decode and assemble a batch into its slot; the number of patches."""
    if _slots is None:
        raise RuntimeError("decode_into runs in a worker started with attach()")
    rec = job.recipe
    raw = read_tile_bytes(_fd(job.path), job.path, job.page, job.tiles, job.offsets, job.counts)
    out = np.ndarray((len(rec), rec.size, rec.size, 3), dtype=np.uint8, buffer=_slots, offset=job.offset)
    decode_and_assemble(raw, job.tiles, job.tables, job.colorspace, job.path, job.page, rec, out)
    return len(rec)


def ready() -> int:
    """A no-op job that starts a worker (and attaches its slots) ahead of the first batch."""
    return os.getpid()
