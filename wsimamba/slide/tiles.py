"""Native JPEG tiles of TIFF-based slides: where they are, how to cut a patch grid from them, and how
to turn their bytes into the pixels OpenSlide would give.

The fast extraction path (`wsimamba.features.fastread`) reads raw tile bytes with plain file reads,
decodes many tiles at once (on the GPU, or in CPU worker processes) and cuts patches out of them.
This module holds everything about the file side:

- `TileLevel`: one pyramid level's TIFF page: tile size, byte offsets / counts, JPEGTables,
  photometric interpretation, and how each tile's stream must be rewritten for a decoder that
  guesses the colour space from markers (nvjpeg, libjpeg without an explicit colour space).
- `plan_tiles(slide, grid)`: decides whether a patch grid can be cut from native tiles and returns
  a `TilePlan`; raises `NativeTilesUnsupported` with a one-line reason otherwise.
- `TileReader`: raw tile bytes by plain reads (`os.pread`), no decoding.
- `decode_tile_cpu`: the reference decoder (imagecodecs / libjpeg-turbo with the colour space
  forced from the TIFF photometric, as OpenSlide does), and `jpeg_stream` for marker-guessing ones.

Colour: a TIFF JPEG tile's components are YCbCr (photometric 6) or RGB (photometric 2; real Aperio
files). OpenSlide forces libjpeg's colour space from the photometric tag. A decoder that guesses
from markers (JFIF → YCbCr; Adobe APP14 transform 0 → RGB, 1 → YCbCr; else component ids
'R','G','B' → RGB, else YCbCr) would apply the YCbCr→RGB transform to RGB-coded tiles without JFIF
or Adobe marker (component ids 1, 2, 3 or 0, 1, 2), which is ~50 grey levels off. `jpeg_stream` therefore
drops JFIF / Adobe segments and inserts an Adobe APP14 marker whose transform matches the photometric
whenever the guess would be wrong.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsimamba.errors import SlideError

PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6
COMPRESSION_JPEG = 7
# OpenSlide backends whose levels are plain TIFF pages of JPEG tiles painted at integer offsets.
TIFF_VENDORS = ("aperio", "generic-tiff")
# JPEG frame types decoders handle: baseline, extended sequential, progressive (Huffman).
_SOF_OK = {0xC0, 0xC1, 0xC2}
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0: no colour transform
_ADOBE_YCC = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01"  # APP14, transform 1: YCbCr


class NativeTilesUnsupported(SlideError):
    """The slide (or this patch grid) cannot be read from native tiles; the message says why."""


# ---------------------------------------------------------------------------------------------
# JPEG markers


@dataclass
class JpegInfo:
    """What a JPEG stream's header says about colour. `ids`: component ids in frame order."""

    sof: int
    precision: int
    ids: tuple[int, ...]
    sampling: tuple[tuple[int, int], ...]
    jfif: bool
    adobe_transform: int | None

    @property
    def guessed_colorspace(self) -> str:
        """The colour space libjpeg assumes for 3 components when none is forced ('RGB' or 'YCbCr')."""
        if self.jfif:
            return "YCbCr"
        if self.adobe_transform is not None:
            return "RGB" if self.adobe_transform == 0 else "YCbCr"
        if self.ids == (82, 71, 66):  # 'R', 'G', 'B'
            return "RGB"
        return "YCbCr"


def _segments(data: bytes, start: int = 2):
    """(marker, segment start, segment end) of the marker segments from `start` up to SOS or EOI."""
    i, n = start, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            return
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        yield marker, i, i + 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows
            return
        i += 2 + length


def merge_tables(tile: bytes, tables: bytes | None) -> bytes:
    """An abbreviated TIFF tile stream plus the page's JPEGTables → one self-contained stream."""
    if not tables:
        return tile
    # tables = SOI, DQT/DHT..., EOI; tile = SOI, [SOF, SOS, data], EOI
    return tables[:-2] + tile[2:]


def jpeg_info(stream: bytes) -> JpegInfo:
    """Frame and colour markers of a self-contained JPEG stream. Raises ValueError when malformed."""
    if stream[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no SOI)")
    jfif, adobe, sof = False, None, None
    for marker, a, b in _segments(stream):
        if marker == 0xE0 and stream[a + 4 : a + 9] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and stream[a + 4 : a + 9] == b"Adobe" and b - a >= 16:
            adobe = stream[a + 15]
        elif marker in _SOF_ALL:
            precision = stream[a + 4]
            ncomp = stream[a + 9]
            comps = [stream[a + 10 + 3 * k : a + 13 + 3 * k] for k in range(ncomp)]
            sof = (marker, precision, tuple(c[0] for c in comps), tuple((c[1] >> 4, c[1] & 15) for c in comps))
    if sof is None:
        raise ValueError("no JPEG frame header (SOF) before the scan")
    return JpegInfo(sof[0], sof[1], sof[2], sof[3], jfif, adobe)


def _strip_colour_markers(stream: bytes) -> bytes:
    """`stream` without its JFIF (APP0) and Adobe (APP14) segments."""
    parts, last = [stream[:2]], 2
    for marker, a, b in _segments(stream):
        if marker in (0xE0, 0xEE):
            parts.append(stream[last:a])
            last = b
    parts.append(stream[last:])
    return b"".join(parts)


def jpeg_stream(tile: bytes, tables: bytes | None, splice: str | None) -> bytes:
    """A self-contained stream a marker-guessing decoder (nvjpeg, PIL) decodes to OpenSlide's pixels.

    splice: None (the merged stream already decodes right), or 'RGB' / 'YCbCr': drop JFIF / Adobe
    markers and insert an Adobe APP14 marker with that colour transform.
    """
    stream = merge_tables(tile, tables)
    if splice is None:
        return stream
    stream = _strip_colour_markers(stream)
    return stream[:2] + (_ADOBE_RGB if splice == "RGB" else _ADOBE_YCC) + stream[2:]


def decode_tile_cpu(tile: bytes, tables: bytes | None, colorspace: str) -> np.ndarray:
    """Reference decode of one TIFF JPEG tile: uint8 (h, w, 3) RGB.

    libjpeg-turbo through imagecodecs with the JPEG colour space forced to `colorspace` ('RGB' or
    'YCBCR', from the TIFF photometric), which is what OpenSlide does.
    """
    import imagecodecs

    out = imagecodecs.jpeg8_decode(tile, tables=tables or None, colorspace=colorspace, outcolorspace="RGB")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return out


def decode_tile_checked(tile: bytes, tables: bytes | None, colorspace: str, path, page: int, index: int,
                        tile_w: int, tile_h: int) -> np.ndarray:
    """`decode_tile_cpu` for tile `index` of page `page` of `path`, raising a SlideError that names them
    when the tile does not decode or decodes to another size than the level's tiles."""
    try:
        out = decode_tile_cpu(tile, tables, colorspace)
    except Exception as e:  # noqa: BLE001 - a corrupt tile: name it
        raise SlideError(f"{path}: tile {index} of page {page} does not decode "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if out.shape[:2] != (tile_h, tile_w):
        raise SlideError(f"{path}: tile {index} of page {page} decodes to {out.shape[1]}x{out.shape[0]} px, "
                         f"not {tile_w}x{tile_h}")
    return out


# ---------------------------------------------------------------------------------------------
# One pyramid level as a TIFF page


@dataclass
class TileLevel:
    """The TIFF page holding one pyramid level.

    offsets, counts: int64 (tiles_down * tiles_across,), row-major tile byte ranges in the file.
    colorspace: the JPEG colour space OpenSlide forces ('RGB' or 'YCBCR').
    splice: what `jpeg_stream` must do for marker-guessing decoders (None, 'RGB' or 'YCbCr').
    """

    path: Path
    page: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    counts: np.ndarray
    tables: bytes | None
    photometric: int
    colorspace: str
    splice: str | None
    jpeg: JpegInfo | None = field(default=None, repr=False)

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_h)


def _page_reason(page) -> str | None:
    """Why a TIFF page's tiles cannot be decoded as plain 8-bit RGB JPEG, or None."""
    if not page.is_tiled:
        return "the level is stored in strips, not tiles"
    comp = int(page.compression)
    if comp != COMPRESSION_JPEG:
        name = getattr(page.compression, "name", str(comp))
        return f"tiles are {name}-compressed, not JPEG"
    photometric = int(page.photometric)
    if photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR):
        name = getattr(page.photometric, "name", str(photometric))
        return f"photometric {name} (only RGB and YCbCr JPEG tiles are read natively)"
    if page.samplesperpixel != 3 or page.extrasamples:
        return f"{page.samplesperpixel} samples per pixel (need 3)"
    if page.bitspersample != 8:
        return f"{page.bitspersample} bits per sample (need 8)"
    if int(page.planarconfig) != 1:
        return "planar (separate) channels"
    if getattr(page, "tiledepth", 1) not in (0, 1):
        return "3-D tiles"
    orient = page.tags.get("Orientation")
    if orient is not None and int(orient.value) != 1:
        return f"orientation {int(orient.value)} (only top-left is read natively)"
    return None


def tile_level(path: Path, level: int, level_size: tuple[int, int]) -> TileLevel:
    """The page of `path` that holds the pyramid level of `level_size` (w, h) pixels.

    OpenSlide's levels of aperio / generic-tiff slides are the tiled pages of the main IFD chain in
    file order; the first tiled page of this size is the level. Raises NativeTilesUnsupported.
    """
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises many types on foreign or corrupt files
        raise NativeTilesUnsupported(f"not a TIFF file tifffile can parse ({type(e).__name__}: {e})") from e
    with tif:
        w, h = level_size
        page = None
        for p in tif.pages:
            if p.is_tiled and (int(p.imagewidth), int(p.imagelength)) == (w, h):
                page = p
                break
        if page is None:
            raise NativeTilesUnsupported(f"no tiled TIFF page of {w}x{h} px for pyramid level {level}")
        reason = _page_reason(page)
        if reason:
            raise NativeTilesUnsupported(f"level {level}: {reason}")
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        tables = page.jpegtables or None
        tables = bytes(tables) if tables else None
        lvl = TileLevel(
            path=path, page=int(page.index), width=w, height=h, tile_w=int(page.tilewidth),
            tile_h=int(page.tilelength), offsets=offsets, counts=counts, tables=tables,
            photometric=int(page.photometric),
            colorspace="RGB" if int(page.photometric) == PHOTOMETRIC_RGB else "YCBCR", splice=None,
        )
        if offsets.size != lvl.tiles_across * lvl.tiles_down:
            raise NativeTilesUnsupported(
                f"level {level}: {offsets.size} tile offsets for a {lvl.tiles_across}x{lvl.tiles_down} tile grid"
            )
    present = np.flatnonzero(counts > 0)
    if present.size == 0:
        raise NativeTilesUnsupported(f"level {level}: no tile holds data")
    with TileReader(lvl) as reader:
        sample = reader.read([int(present[0])])[0]
    try:
        info = jpeg_info(merge_tables(sample, lvl.tables))
    except (ValueError, IndexError, struct.error) as e:
        raise NativeTilesUnsupported(f"level {level}: tile {int(present[0])} is not a readable JPEG stream ({e})") from e
    if info.sof not in _SOF_OK:
        raise NativeTilesUnsupported(f"level {level}: JPEG frame type 0x{info.sof:02X} (lossless / arithmetic) is not decoded natively")
    if info.precision != 8 or len(info.ids) != 3:
        raise NativeTilesUnsupported(f"level {level}: {info.precision}-bit JPEG with {len(info.ids)} components (need 8-bit, 3)")
    want = "RGB" if lvl.photometric == PHOTOMETRIC_RGB else "YCbCr"
    lvl.jpeg = info
    lvl.splice = None if info.guessed_colorspace == want else want
    return lvl


# ---------------------------------------------------------------------------------------------
# Raw bytes


def read_tile_bytes(fd: int, path, page: int, tiles, offsets, counts) -> list[bytes]:
    """Bytes of tiles `tiles` (for messages) at byte ranges (`offsets`, `counts`, one per tile) of the
    open file `fd`, in the order given; read in file order, which is what a disk or network file
    system serves fastest. A range the file cuts short is a SlideError naming the file and tile."""
    out: list[bytes | None] = [None] * len(tiles)
    for k in np.argsort(np.asarray(offsets), kind="stable"):
        n, off = int(counts[k]), int(offsets[k])
        data = os.pread(fd, n, off)
        if len(data) != n:
            raise SlideError(f"{path}: tile {int(tiles[k])} of page {page} is cut short "
                             f"({len(data)} of {n} bytes at offset {off})")
        out[k] = data
    return out  # type: ignore[return-value]


def decode_and_assemble(raw: list[bytes], tiles, tables: bytes | None, colorspace: str, path, page: int,
                        recipe: "Recipe", out):
    """Decode a batch's tiles (`raw`, the bytes of tiles `tiles`) with `decode_tile_checked` and cut
    its patches into `out` (n, size, size, 3); returns `out`."""
    decoded = [decode_tile_checked(b, tables, colorspace, path, page, int(t), recipe.tile_w, recipe.tile_h)
               for b, t in zip(raw, tiles)]
    return assemble_copies(decoded, recipe, out)


class TileReader:
    """Raw bytes of tiles by plain positional reads (no decoding). One open file per instance;
    create it inside each worker process."""

    def __init__(self, level: TileLevel):
        self.level = level
        self._fd = os.open(level.path, os.O_RDONLY)

    def read(self, tiles) -> list[bytes]:
        """Bytes of `tiles` (indices into the level's row-major tile grid), in the order given.

        Reads in file order, which is what a disk or network file system serves fastest.
        """
        tiles = np.asarray(tiles, dtype=np.int64)
        lv = self.level
        return read_tile_bytes(self._fd, lv.path, lv.page, tiles, lv.offsets[tiles], lv.counts[tiles])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# The plan: patch grid → tiles


@dataclass
class TilePlan:
    """How to cut every patch of a grid out of native tiles of one level.

    lx, ly: int64 (N,) top-left of each patch in level pixels (exact integers).
    read_size: patch side in level pixels (then resized to the grid's patch_size).
    layout: 'tile' (patch = one tile), 'block' (a k×k block of whole tiles), 'crop' (inside one
    tile) or 'span' (a crop across tile borders).
    """

    level: TileLevel
    level_index: int
    lx: np.ndarray
    ly: np.ndarray
    read_size: int
    patch_size: int
    layout: str

    def __len__(self) -> int:
        return int(self.lx.size)

    def recipe(self, start: int, stop: int) -> "Recipe":
        """Which tiles patches [start, stop) need and where each patch sits in them."""
        lv, r = self.level, self.read_size
        tw, th = lv.tile_w, lv.tile_h
        lx, ly = self.lx[start:stop], self.ly[start:stop]
        tx0, ty0 = lx // tw, ly // th
        nx, ny = (lx + r - 1) // tw - tx0 + 1, (ly + r - 1) // th - ty0 + 1  # tiles spanned per patch
        kx, ky = int(nx.max()), int(ny.max())
        ii = np.arange(ky)[None, :, None]
        jj = np.arange(kx)[None, None, :]
        ids = (ty0[:, None, None] + ii) * lv.tiles_across + (tx0[:, None, None] + jj)
        valid = (ii < ny[:, None, None]) & (jj < nx[:, None, None])
        tiles, inv = np.unique(ids[valid], return_inverse=True)  # sorted ids ≈ file order
        slots = np.full(ids.shape, -1, np.int32)
        slots[valid] = inv.astype(np.int32)
        return Recipe(tiles=tiles.astype(np.int64), slots=slots, ox=(lx - tx0 * tw).astype(np.int32),
                      oy=(ly - ty0 * th).astype(np.int32), size=r, tile_w=tw, tile_h=th)

    def describe(self) -> str:
        lv = self.level
        return (f"{self.layout}: level {self.level_index} page {lv.page}, {lv.tile_w}x{lv.tile_h} JPEG tiles "
                f"({lv.colorspace}), {self.read_size} px read per patch")


@dataclass
class Recipe:
    """How to assemble a batch of n patches of side `size` from decoded tiles.

    tiles: int64 (T,) tile indices to decode (sorted); decoded tile k is "slot" k.
    slots: int32 (n, ky, kx): slot of the tile in row i, column j of the tiles each patch spans
    (-1 past a patch's own span). ox, oy: int32 (n,) the patch's top-left inside its first tile.
    """

    tiles: np.ndarray
    slots: np.ndarray
    ox: np.ndarray
    oy: np.ndarray
    size: int
    tile_w: int
    tile_h: int

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    def copies(self):
        """(patch, slot, src x, src y, dst x, dst y, w, h) for every tile piece of every patch."""
        r, tw, th = self.size, self.tile_w, self.tile_h
        n, ky, kx = self.slots.shape
        for p in range(n):
            ox, oy = int(self.ox[p]), int(self.oy[p])
            for i in range(ky):
                y0, y1 = max(0, i * th - oy), min(r, (i + 1) * th - oy)
                if y1 <= y0:
                    continue
                for j in range(kx):
                    s = int(self.slots[p, i, j])
                    x0, x1 = max(0, j * tw - ox), min(r, (j + 1) * tw - ox)
                    if s < 0 or x1 <= x0:
                        continue
                    yield p, s, x0 + ox - j * tw, y0 + oy - i * th, x0, y0, x1 - x0, y1 - y0


def assemble_copies(tiles, recipe: Recipe, out):
    """Fill `out` (n, size, size, 3) from decoded tiles (each (tile_h, tile_w, 3)) by slice copies.

    Works on numpy arrays and torch tensors alike (CPU workers use it with numpy)."""
    for p, s, sx, sy, dx, dy, w, h in recipe.copies():
        out[p, dy : dy + h, dx : dx + w] = tiles[s][sy : sy + h, sx : sx + w]
    return out


def classify_layout(lx: np.ndarray, ly: np.ndarray, r: int, tw: int, th: int) -> str:
    """'tile', 'block', 'crop' or 'span' for patches of side r at level pixels (lx, ly)."""
    if lx.size == 0:
        return "tile"
    ox, oy = lx % tw, ly % th
    if r == tw == th and not ox.any() and not oy.any():
        return "tile"
    if tw == th and r % tw == 0 and not ox.any() and not oy.any():
        return "block"
    if ((ox + r) <= tw).all() and ((oy + r) <= th).all():
        return "crop"
    return "span"


def grid_level_coords(coords: np.ndarray, downsample: float, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray] | None:
    """Level coordinates of level-0 `coords` (N, 2), or None when any is not an exact integer.

    OpenSlide paints a level at `coord / downsample`; a fractional position is resampled by cairo,
    which native tiles cannot reproduce.
    """
    f = np.asarray(coords, np.float64) / float(downsample)
    r = np.rint(f)
    if f.size and np.abs(f - r).max() > tol:
        return None
    r = r.astype(np.int64)
    return r[:, 0].copy(), r[:, 1].copy()


def plan_tiles(slide, grid) -> TilePlan:
    """Decide whether `grid` can be cut from native tiles of `slide`; the plan, or
    NativeTilesUnsupported naming the reason.

    Rules: OpenSlide reads the slide as aperio or generic-tiff; the grid's level is a tiled TIFF page
    of 8-bit 3-component JPEG (YCbCr or RGB photometric, top-left orientation); every patch sits at
    exact integer level coordinates inside the level; every tile it needs holds data.
    """
    backend = getattr(slide, "backend", "")
    if backend != "openslide":
        raise NativeTilesUnsupported(f"read by the {backend} backend, not OpenSlide (native tiles need an OpenSlide TIFF slide)")
    vendor = getattr(slide, "vendor", "unknown")
    if vendor not in TIFF_VENDORS:
        raise NativeTilesUnsupported(f"OpenSlide format {vendor!r} (native tiles are read for {', '.join(TIFF_VENDORS)})")
    level = int(grid.patch_level)
    ds = float(slide.level_downsamples[level])
    r = max(1, int(round(grid.patch_size_level0 / ds)))  # what Slide.read_at reads
    lc = grid_level_coords(grid.coords, ds)
    if lc is None:
        raise NativeTilesUnsupported(
            f"patches fall between level-{level} pixels (downsample {ds:.6g}): the grid is not aligned to the level"
        )
    lx, ly = lc
    lw, lh = slide.level_dimensions[level]
    if lx.size and (lx.min() < 0 or ly.min() < 0 or (lx + r).max() > lw or (ly + r).max() > lh):
        raise NativeTilesUnsupported(f"some patches extend past the edge of level {level} ({lw}x{lh} px)")
    lv = tile_level(slide.path, level, (lw, lh))
    if lx.size:
        # every tile a patch touches must hold data (OpenSlide paints missing tiles transparent)
        need = np.zeros(lv.tiles_across * lv.tiles_down, bool)
        tx0, tx1 = lx // lv.tile_w, (lx + r - 1) // lv.tile_w
        ty0, ty1 = ly // lv.tile_h, (ly + r - 1) // lv.tile_h
        for dy in range(int((ty1 - ty0).max()) + 1):
            for dx in range(int((tx1 - tx0).max()) + 1):
                ok = (ty0 + dy <= ty1) & (tx0 + dx <= tx1)
                need[((ty0 + dy) * lv.tiles_across + tx0 + dx)[ok]] = True
        empty = int((need & (lv.counts <= 0)).sum())
        if empty:
            raise NativeTilesUnsupported(f"{empty} tiles under the patches hold no data (sparse level {level})")
    layout = classify_layout(lx, ly, r, lv.tile_w, lv.tile_h)
    return TilePlan(level=lv, level_index=level, lx=lx, ly=ly, read_size=r, patch_size=int(grid.patch_size),
                    layout=layout)
