"""Slide reading, tissue detection and the patch grid, on hand-made images."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsimamba.config import ExtractConfig, apply_overrides, build_config
from wsimamba.errors import ConfigError, SlideError
from wsimamba.slide.reader import Slide, find_slides, open_slide
from wsimamba.slide.tiling import make_grid
from wsimamba.slide.tissue import TissueMask, TissueParams, median_above, saturation, segment_thumbnail


def _pink(h, w):
    img = np.full((h, w, 3), 245, np.uint8)
    return img


def test_saturation_matches_opencv_scale():
    rgb = np.array([[[255, 255, 255], [200, 100, 150], [0, 0, 0], [10, 0, 5]]], np.uint8)
    np.testing.assert_array_equal(saturation(rgb)[0], [0, 127, 0, 255])


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (37, 53), (64, 101)])
def test_median_above_is_scipys_median_filter_then_threshold(shape):
    from scipy import ndimage

    rng = np.random.default_rng()
    for size in range(2, 10):
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if size % 2:
            img = (img // 64 * 85).astype(np.uint8)  # few levels: many ties at the threshold
        for thresh in (0, 8, 85, 170, 254):
            expected = ndimage.median_filter(img, size=size) > thresh
            np.testing.assert_array_equal(median_above(img, size, thresh), expected, err_msg=f"size {size} thresh {thresh}")


def test_segment_finds_blob_drops_specks_fills_holes_keeps_border_background():
    img = _pink(200, 200)
    img[40:160, 40:160] = (200, 120, 170)  # a tissue square
    img[95:105, 95:105] = 245  # a small hole inside it
    img[5:7, 190:192] = (200, 120, 170)  # a speck of dust-sized "tissue"
    params = TissueParams(mthresh=3, close=0, min_tissue_mm2=10.0, min_hole_mm2=200.0)
    mask = segment_thumbnail(img, params, mm2_per_px=1.0)
    assert mask[50:150, 50:150].all()  # blob kept, hole (100 px < 200) filled
    assert not mask[5:7, 190:192].any()  # speck (4 px < 10) dropped
    assert not mask[:30].any() and not mask[170:].any()  # background (touching the border) stays background
    big_hole = _pink(200, 200)
    big_hole[20:180, 20:180] = (200, 120, 170)
    big_hole[60:140, 60:140] = 245  # 6400 px hole ≥ 200: a real lumen, kept open
    mask = segment_thumbnail(big_hole, params, mm2_per_px=1.0)
    assert not mask[80:120, 80:120].any() and mask[25:55, 25:175].all()


def test_corner_background_enclosed_by_tissue_and_border_is_not_a_hole():
    img = _pink(100, 100)
    img[:, :60] = (200, 120, 170)
    img[:60, :] = (200, 120, 170)  # an L of tissue; the bottom-right corner touches the border
    mask = segment_thumbnail(img, TissueParams(mthresh=0, close=0, min_tissue_mm2=0, min_hole_mm2=1e9), 1.0)
    assert not mask[70:, 70:].any()


def test_otsu_threshold_separates_two_levels():
    img = _pink(64, 64)
    img[:, 32:] = (120, 60, 140)
    mask = segment_thumbnail(img, TissueParams(use_otsu=True, mthresh=0, close=0, min_tissue_mm2=0, min_hole_mm2=0), 1.0)
    assert mask[:, 34:].all() and not mask[:, :30].any()


def test_tissue_fraction_counts_the_patch_footprint():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    tm = TissueMask(mask, scale_x=10.0, scale_y=10.0)
    frac = tm.tissue_fraction(np.array([0, 50, 30]), np.array([0, 0, 0]), 40)
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.5])


class _FakeSlide:
    """A slide stand-in for the grid: dimensions, levels and mpp only."""

    def __init__(self, w, h, mpp, downsamples=(1.0, 4.0, 16.0)):
        self.dimensions = (w, h)
        self.level_downsamples = list(downsamples)
        self.mpp = mpp

    def require_mpp(self):
        return self.mpp

    best_level_for_downsample = Slide.best_level_for_downsample


@pytest.mark.parametrize("mpp,target,patch,overlap", [(0.25, 0.5, 256, 0), (0.25, 1.0, 224, 32), (0.5, 0.5, 100, 10), (0.243, 0.5, 256, 0)])
def test_grid_geometry(mpp, target, patch, overlap):
    slide = _FakeSlide(5000, 3001, mpp)
    full = TissueMask(np.ones((30, 50), bool), 100.0, 3001 / 30)
    grid = make_grid(slide, full, target_mpp=target, patch_size=patch, overlap=overlap, min_tissue=0.5)
    size0 = round(patch * target / mpp)
    step0 = round((patch - overlap) * target / mpp)
    assert grid.patch_size_level0 == size0
    nx = (5000 - size0) // step0 + 1
    ny = (3001 - size0) // step0 + 1
    assert len(grid) == nx * ny
    assert (grid.coords[:, 0] + size0 <= 5000).all() and (grid.coords[:, 1] + size0 <= 3001).all()
    assert np.unique(np.diff(np.unique(grid.coords[:, 0]))).tolist() == [step0]
    # the level read is the coarsest one not coarser than the patch's downsample
    ds = target / mpp
    assert slide.level_downsamples[grid.patch_level] <= ds * 1.01
    assert all(d > ds * 1.01 for d in slide.level_downsamples[grid.patch_level + 1 :])


def test_grid_rejects_bad_values():
    slide = _FakeSlide(1000, 1000, 0.5)
    tm = TissueMask(np.ones((10, 10), bool), 100.0, 100.0)
    with pytest.raises(SlideError, match="overlap"):
        make_grid(slide, tm, patch_size=64, overlap=64)
    with pytest.raises(SlideError, match="min tissue"):
        make_grid(slide, tm, min_tissue=1.5)


def test_open_slide_errors_name_the_file(tmp_path):
    with pytest.raises(SlideError, match="no such slide file"):
        open_slide(tmp_path / "x.svs")
    bad = tmp_path / "bad.ndpi"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(SlideError, match="bad.ndpi"):
        open_slide(bad)
    with pytest.raises(SlideError, match="no such slide folder"):
        find_slides(tmp_path / "nope")


def test_duplicate_slide_ids_are_an_error(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "a.tiff").write_bytes(b"x")
    with pytest.raises(SlideError, match="two slides share the id 'a'"):
        find_slides(tmp_path)


def test_tifffile_backend_reads_regions_and_mpp(tmp_path):
    rng = np.random.default_rng()
    img = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, img, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.backend == "tifffile" and s.mpp == pytest.approx(0.25) and s.dimensions == (500, 300)
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (30, 40)), img[20:60, 10:40])
        out = s.read_region((480, 290), 0, (40, 20))  # partly outside: white there
        np.testing.assert_array_equal(out[:10, :20], img[290:, 480:])
        assert (out[10:] == 255).all() and (out[:, 20:] == 255).all()
        assert s.thumbnail(4.0, block=128).shape == (75, 125, 3)
    with open_slide(p, mpp_override=0.3) as s:
        assert s.mpp == 0.3 and s.mpp_source == "override"


def test_thumbnail_blocks_match_one_read(cohort):
    root, slides = cohort
    with open_slide(slides[0].path) as s:
        whole = s.thumbnail(8.0)
        blocks = s.thumbnail(8.0, block=100)
    assert whole.shape == blocks.shape
    assert np.abs(whole.astype(int) - blocks.astype(int)).mean() < 2.0


def test_extract_config_names_bad_keys():
    with pytest.raises(ConfigError, match="unknown key 'patchsize'"):
        build_config(ExtractConfig, {"patchsize": 3, "random_init": True})
    with pytest.raises(ConfigError, match="target_mpp"):
        build_config(ExtractConfig, {"target_mpp": -1, "random_init": True})
    with pytest.raises(ConfigError, match="random_init"):
        build_config(ExtractConfig, {})
    cfg = build_config(ExtractConfig, apply_overrides({"random_init": True}, ["tissue.sthresh=20", "format=zarr"]))
    assert cfg.tissue.sthresh == 20 and cfg.format == "zarr"
