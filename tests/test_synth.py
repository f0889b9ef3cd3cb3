"""Synthetic cohort generator: file formats as OpenSlide sees them, ground truth, determinism, memory."""

from __future__ import annotations

import csv
import json
import math
import tracemalloc
from collections import Counter

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from wsimamba.errors import WsimambaError
from wsimamba.slide import synth
from wsimamba.slide.synth import pyramid_dims, synth_cohort, synth_slide

TUMOR_RANGE = (0.03, 0.09)
SIZE = 1792  # cohort slides vary +-10% around this


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_cohort")
    calls = []
    slides = synth_cohort(
        out, 5, seed=7, size=(SIZE, SIZE), tumor_fraction=TUMOR_RANGE,
        progress=lambda done, total: calls.append((done, total)),
    )
    return out, slides, calls


@pytest.fixture(scope="module")
def tiff_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_tiff")
    # Not square, so a swapped width/height shows.
    return synth_slide(out / "g.tiff", 1280, 1024, seed=2, tumor_fraction=0.05, mpp=0.5)


def _rgb(slide: openslide.OpenSlide, level: int = 0) -> np.ndarray:
    w, h = slide.level_dimensions[level]
    return np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def test_svs_reads_as_aperio_with_resolution_and_pyramid(cohort):
    _, slides, _ = cohort
    for s in slides:
        with openslide.OpenSlide(s.path) as o:
            assert o.properties["openslide.vendor"] == "aperio"
            assert float(o.properties["openslide.mpp-x"]) == 0.25
            assert float(o.properties["openslide.mpp-y"]) == 0.25
            assert o.properties["openslide.objective-power"] == "40"
            assert o.dimensions == (s.width, s.height)
            assert o.level_count == 2
            assert list(o.level_dimensions) == pyramid_dims(s.width, s.height)
            assert o.level_downsamples == pytest.approx([1.0, 4.0], rel=0.01)
            thumb = o.associated_images["thumbnail"]
            assert max(thumb.size) <= 768 and thumb.size[0] > thumb.size[1] / 2
            # Lower levels are the same picture, not an independent rendering.
            low = _rgb(o, 1).astype(np.float32)
            full = np.asarray(o.get_thumbnail(o.level_dimensions[1]).convert("RGB"), np.float32)
            assert np.abs(low - full[: low.shape[0], : low.shape[1]]).mean() < 4


def test_generic_tiff_levels_and_resolution_tags(tiff_slide):
    s = tiff_slide
    assert s.label == 1 and s.mask.any() and s.mask_path is None  # mask returned, not written
    with openslide.OpenSlide(s.path) as o:
        assert o.properties["openslide.vendor"] == "generic-tiff"
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-6)
        assert float(o.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-6)
        assert o.level_dimensions == ((1280, 1024), (320, 256))
        assert o.level_downsamples == pytest.approx([1.0, 4.0], rel=1e-6)
        # Level 1 must be level 0 averaged 4x4 (JPEG error only).
        lvl0 = _rgb(o, 0).astype(np.float32).reshape(256, 4, 320, 4, 3).mean((1, 3))
        assert np.abs(_rgb(o, 1) - lvl0).mean() < 4
    with tifffile.TiffFile(s.path) as tf:
        assert tf.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert tf.pages[1].tags["NewSubfileType"].value == 1  # reduced resolution


def test_tiles_are_jpeg_and_svs_description_is_aperio(cohort, tiff_slide):
    _, slides, _ = cohort
    with tifffile.TiffFile(slides[0].path) as tf:
        pages = list(tf.pages)
        desc = pages[0].description
        assert desc.startswith("Aperio Image Library")
        assert "|AppMag = 40|" in desc and "|MPP = 0.25|" in desc
        assert not pages[1].is_tiled  # the thumbnail sits in IFD 1, as in Aperio files
        levels = [pages[0]] + pages[2:]
    with tifffile.TiffFile(tiff_slide.path) as tf:
        levels += list(tf.pages)
    assert len(levels) == 4
    for p in levels:
        assert p.is_tiled and (p.tilelength, p.tilewidth) == (256, 256)
        assert p.compression == tifffile.COMPRESSION.JPEG


def test_tissue_fraction_and_he_colours(cohort):
    _, slides, _ = cohort
    multi_island = 0
    for s in slides:
        with openslide.OpenSlide(s.path) as o:
            thumb = np.asarray(o.get_thumbnail((512, 512)).convert("RGB")).astype(np.int32)
        glass = thumb.min(-1) >= 228
        tissue = thumb.min(-1) < 215
        assert 0.2 < tissue.mean() < 0.8, s.slide_id
        assert glass.mean() > 0.2, s.slide_id  # background is near-white glass, not grey
        assert np.abs(thumb[glass] - thumb[glass].mean(0)).max() < 25
        r, g, b = (thumb[tissue][:, c].mean() for c in range(3))
        # Eosin and hematoxylin both absorb green most: tissue is pink to purple.
        assert r > g + 25 and b > g + 15, (s.slide_id, r, g, b)
        # Tissue comes in irregular islands: the largest fills well under its bounding box.
        labels, _ = ndimage.label(tissue)
        sizes = np.bincount(labels.ravel())[1:]
        multi_island += (sizes > 0.005 * tissue.size).sum() >= 2
        big = labels == (np.argmax(sizes) + 1)
        ys, xs = np.nonzero(big)
        assert big.sum() < 0.85 * (np.ptp(ys) + 1) * (np.ptp(xs) + 1), s.slide_id
    assert multi_island >= len(slides) / 2


def test_masks_match_labels_and_tumor_fraction(cohort):
    out, slides, _ = cohort
    lo, hi = TUMOR_RANGE
    assert {s.label for s in slides} == {0, 1}
    for s in slides:
        img = Image.open(out / "masks" / f"{s.slide_id}.png")
        assert img.text["mask_downsample"] == "32"
        assert int(img.text["level0_width"]) == s.width
        mask = np.asarray(img)
        assert mask.dtype == np.uint8
        assert mask.shape == (math.ceil(s.height / 32), math.ceil(s.width / 32))
        assert set(np.unique(mask)) <= {0, 255}
        if s.label == 0:
            assert not mask.any() and s.tumor_fraction == 0
            continue
        assert mask.any()
        assert 0.8 * lo <= s.tumor_fraction <= 1.2 * hi, (s.slide_id, s.tumor_fraction)
        # Independently of the generator's bookkeeping: tumor cells over tissue cells seen in pixels.
        with openslide.OpenSlide(s.path) as o:
            small = np.asarray(o.get_thumbnail(mask.shape[::-1]).convert("RGB").resize(mask.shape[::-1]))
        tissue = small.min(-1) < 220
        measured = (mask > 0).sum() / tissue.sum()
        assert 0.6 * lo <= measured <= 1.5 * hi, (s.slide_id, measured)
        assert tissue[mask > 0].mean() > 0.9  # tumor lies on tissue


def test_tumor_morphology_differs_learnably(cohort):
    """Patches inside tumor have more, darker nuclear pixels than normal tissue patches."""
    _, slides, _ = cohort
    feats = {"tumor": [], "normal": []}
    darkness = {"tumor": [], "normal": []}
    p = 64
    for s in slides:
        if not s.label:
            continue
        with openslide.OpenSlide(s.path) as o:
            rgb = _rgb(o).astype(np.float32)
        gray = rgb.mean(-1)
        m = np.kron(s.mask > 0, np.ones((32, 32), bool))[: s.height, : s.width]
        for y in range(0, s.height - p + 1, p):
            for x in range(0, s.width - p + 1, p):
                g = gray[y : y + p, x : x + p]
                mm = m[y : y + p, x : x + p]
                if mm.all():
                    kind = "tumor"
                elif not mm.any() and (rgb[y : y + p, x : x + p].min(-1) < 215).mean() > 0.97:
                    kind = "normal"
                else:
                    continue
                feats[kind].append((g < 130).mean())  # nuclear (hematoxylin-dark) pixel fraction
                darkness[kind].append(g.mean())
    assert len(feats["tumor"]) >= 10 and len(feats["normal"]) >= 50
    assert _auc(np.array(feats["tumor"]), np.array(feats["normal"])) > 0.95
    assert np.mean(darkness["tumor"]) < np.mean(darkness["normal"]) - 15


def test_labels_csv_cases_and_cohort_json(cohort):
    out, slides, calls = cohort
    text = (out / "labels.csv").read_text()
    assert text.splitlines()[0] == "slide_id,case_id,label"
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["slide_id"] for r in rows] == [s.slide_id for s in slides]
    assert {r["label"] for r in rows} == {"0", "1"}
    per_case = Counter(r["case_id"] for r in rows)
    assert max(per_case.values()) == 2 and min(per_case.values()) == 1
    for r in rows:
        assert (out / "slides" / f"{r['slide_id']}.svs").is_file()
        assert (out / "masks" / f"{r['slide_id']}.png").is_file()
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["seed"] == 7 and meta["format"] == "svs"
    for rec, r, s in zip(meta["slides"], rows, slides):
        assert (rec["slide_id"], rec["case_id"]) == (r["slide_id"], r["case_id"])
        assert str(rec["label"]) == r["label"]
        assert (rec["width"], rec["height"]) == (s.width, s.height)
        assert rec["mpp"] == 0.25 and rec["mask_downsample"] == 32 and rec["format"] == "svs"
        assert rec["tumor_fraction_of_tissue"] == pytest.approx(s.tumor_fraction, abs=1e-6)
        assert (out / rec["path"]).is_file() and (out / rec["mask_path"]).is_file()
        assert abs(s.width - SIZE) <= 0.1 * SIZE + 16 and abs(s.height - SIZE) <= 0.1 * SIZE + 16
    assert len({(s.width, s.height) for s in slides}) > 1  # sizes vary around `size`
    assert calls == [(k, 5) for k in range(1, 6)]
    # No temporary files left behind.
    assert not list(out.rglob(".*partial"))


def test_same_seed_same_files_other_seed_other_pixels(tmp_path):
    a = synth_cohort(tmp_path / "a", 3, seed=11, size=(512, 512))
    b = synth_cohort(tmp_path / "b", 3, seed=11, size=(512, 512))
    c = synth_cohort(tmp_path / "c", 3, seed=12, size=(512, 512))
    for name in ("labels.csv", "cohort.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for sa, sb in zip(a, b):
        assert sa.mask_path.read_bytes() == sb.mask_path.read_bytes()
        assert sa.path.read_bytes() == sb.path.read_bytes()
    with openslide.OpenSlide(a[0].path) as oa, openslide.OpenSlide(c[0].path) as oc:
        pa, pc = _rgb(oa).astype(np.int32), _rgb(oc)
        if pa.shape == pc.shape:
            assert np.abs(pa - pc).mean() > 5
    assert (tmp_path / "a" / "cohort.json").read_bytes() != (tmp_path / "c" / "cohort.json").read_bytes()


@pytest.mark.parametrize("fmt, vendor", [("svs", "aperio"), ("tiff", "generic-tiff")])
def test_mpp_none_writes_no_resolution(tmp_path, fmt, vendor):
    s = synth_slide(tmp_path / f"nompp.{fmt}", 512, 384, seed=3, mpp=None)
    assert s.mpp is None
    with openslide.OpenSlide(s.path) as o:
        assert o.properties["openslide.vendor"] == vendor
        assert "openslide.mpp-x" not in o.properties
        assert "openslide.mpp-y" not in o.properties
        assert "openslide.objective-power" not in o.properties
        assert o.dimensions == (512, 384)
        assert _rgb(o).min() < 200  # still has tissue to look at


def test_pen_marks_and_blur_appear_on_some_slides(tmp_path):
    pen_slides = 0
    for seed in range(8):
        s = synth_slide(tmp_path / f"p{seed}.svs", 384, 384, seed=seed)
        with openslide.OpenSlide(s.path) as o:
            rgb = _rgb(o).astype(np.int32)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        # H&E absorbs green most; marker ink (green, blue, black) does not.
        ink = (g >= r - 5) & (rgb.mean(-1) < 200)
        pen_slides += ink.mean() > 0.002
    assert 1 <= pen_slides <= 7

    # Blur: in the generator's out-of-focus field, tissue has much less fine detail.
    seed = next(k for k in range(20) if synth._build_model(1024, 1024, k, 0.0, 0.25).fields[2].max() > 0.99)
    s = synth_slide(tmp_path / "blur.svs", 1024, 1024, seed=seed)
    m = synth._build_model(1024, 1024, seed, 0.0, 0.25)
    blur = synth._field_map(m, 2, 32)
    tissue = synth._field_map(m, 0, 32) > m.thr_tissue + 3 * m.w_tissue
    with openslide.OpenSlide(s.path) as o:
        gray = _rgb(o).astype(np.float32).mean(-1)
    detail = np.abs(ndimage.laplace(ndimage.gaussian_filter(gray, 1.0)))
    per_cell = detail.reshape(32, 32, 32, 32).mean((1, 3))
    blurred, sharp = per_cell[tissue & (blur > 0.95)], per_cell[tissue & (blur < 0.05)]
    assert len(blurred) >= 5 and len(sharp) >= 50
    assert np.median(blurred) < 0.6 * np.median(sharp)


def test_memory_does_not_grow_with_slide_size(tmp_path):
    """Making the slide 8x taller adds far less than its 48 MiB of RGB pixels to the peak memory.

    tracemalloc sees every numpy buffer, so holding level 0 (or a full-resolution field) fails
    this; the blocks being rendered cost the same for both slides and cancel out.
    """
    tracemalloc.start()
    try:
        synth_slide(tmp_path / "short.svs", 2048, 1024, seed=5, tumor_fraction=0.05)
        peak_short = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        s = synth_slide(tmp_path / "tall.svs", 2048, 8192, seed=5, tumor_fraction=0.05)
        peak_tall = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_tall - peak_short < 2048 * 8192 * 3 / 3, (peak_short, peak_tall)
    with openslide.OpenSlide(s.path) as o:
        assert o.level_dimensions == ((2048, 8192), (512, 2048), (128, 512))
        assert o.level_downsamples == pytest.approx([1, 4, 16], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(fmt="png"), "'png'"),
        (dict(tumor_fraction=1.5), "1.5"),
        (dict(mpp=0.0), "0.0"),
        (dict(tile=100), "100"),
        (dict(quality=0), "quality"),
        (dict(mask_downsample=0), "mask_downsample"),
        (dict(width=10), "10"),
    ],
)
def test_bad_slide_arguments_raise_project_error(tmp_path, kwargs, needle):
    args = dict(width=512, height=512, seed=0) | kwargs
    with pytest.raises(WsimambaError, match=needle) as exc:
        synth_slide(tmp_path / "x.svs", **args)
    assert "\n" not in str(exc.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(n_slides=0), "n_slides"),
        (dict(tumor_fraction=(0.2, 0.1)), r"\(0.2, 0.1\)"),
        (dict(fmt="ndpi"), "'ndpi'"),
        (dict(size=(512,)), "size"),
    ],
)
def test_bad_cohort_arguments_raise_project_error(tmp_path, kwargs, needle):
    args = dict(n_slides=2, size=(512, 512)) | kwargs
    with pytest.raises(WsimambaError, match=needle):
        synth_cohort(tmp_path / "c", **args)
    assert not (tmp_path / "c").exists()


def test_cohort_plan_balances_labels_and_keeps_cases_groupable():
    for n in (2, 3, 8, 40):
        plan = synth._plan_cohort(n, 0, (1024, 1024), (0.02, 0.1), 0.1)
        labels = [p["label"] for p in plan]
        assert abs(sum(labels) - n / 2) <= 0.5 and set(labels) == {0, 1}
        cases = Counter(p["case_id"] for p in plan)
        assert len(cases) >= 2 and max(cases.values()) <= 2
        assert (max(cases.values()) == 2) == (n >= 3)
        for p in plan:
            lo, hi = (0.02, 0.1) if p["label"] else (0.0, 0.0)
            assert lo <= p["tumor_fraction"] <= hi
