"""Data for MIL training: labels.csv, feature layouts (wsimamba HDF5 / Zarr, CLAM, TRIDENT), bags, splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.fixtures_train import cases_for
from wsimamba.data.bags import BagDataset, FeatureSource, detect_layout
from wsimamba.data.labels import LabelsError, read_labels
from wsimamba.data.splits import column_splits, kfold_splits, load_splits, save_splits
from wsimamba.data.synthetic import witness_bags, write_cohort
from wsimamba.errors import ConfigError, FeatureStoreError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# labels


def test_string_labels_map_to_sorted_classes(tmp_path):
    t = read_labels(write(tmp_path / "l.csv", "slide_id,case_id,label\na,p1,tumor\nb,p1,normal\nc,p2,tumor\n"))
    assert t.classes == ["normal", "tumor"] and t.labels.tolist() == [1, 0, 1]
    assert t.case_ids == ["p1", "p1", "p2"] and t.splits is None
    t = read_labels(tmp_path / "l.csv", classes=["tumor", "normal"])  # the order can be given
    assert t.labels.tolist() == [0, 1, 0]
    # integer labels sort numerically, not as text
    t = read_labels(write(tmp_path / "i.csv", "slide_id,case_id,label\na,1,10\nb,2,9\nc,3,2\n"))
    assert t.classes == ["2", "9", "10"] and t.labels.tolist() == [2, 1, 0]


@pytest.mark.parametrize("text, message", [
    ("slide_id,label\na,1\n", "missing column.*case_id"),
    ("slide_id,case_id,label\na,p,1\na,q,0\n", "line 3: slide_id 'a' already on line 2"),
    ("slide_id,case_id,label\na,p,\n", "line 2: empty label"),
    ("slide_id,case_id,label\na,p,1\nb,q,1\n", "need at least two classes"),
    ("slide_id,case_id,label,split\na,p,1,train\nb,q,0,holdout\n", "line 3: split must be one of train, val, test"),
])
def test_bad_labels_name_the_problem(tmp_path, text, message):
    with pytest.raises(LabelsError, match=message):
        read_labels(write(tmp_path / "l.csv", text))


def test_label_outside_given_classes(tmp_path):
    with pytest.raises(LabelsError, match="label.*'maybe' not in data.classes"):
        read_labels(write(tmp_path / "l.csv", "slide_id,case_id,label\na,p,yes\nb,q,maybe\n"), classes=["no", "yes"])


# ---------------------------------------------------------------------------------------------
# layouts


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    data = witness_bags(4, dim=8, instances=(5, 9), seed=0)
    feats, labels = write_cohort(root, data)
    return root, feats, labels, data


def test_auto_layout_reads_wsimamba_h5_and_zarr(bags, tmp_path):
    root, feats, labels, data = bags
    src = FeatureSource(feats)
    assert src.layout == "h5"
    zroot = tmp_path / "z"
    zfeats, _ = write_cohort(zroot, data, fmt="zarr")
    zsrc = FeatureSource(zfeats)
    assert zsrc.layout == "zarr"
    for i, x in enumerate(data.bags):
        a, b = src.read(f"bag_{i:04d}"), zsrc.read(f"bag_{i:04d}")
        np.testing.assert_array_equal(a.features, x)
        np.testing.assert_array_equal(b.features, x)
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.coords_attrs["patch_size_level0"] == 256


def test_clam_layout_h5_files_and_pt_files(bags, tmp_path):
    """CLAM writes h5_files/<id>.h5 (features, coords, no attributes) and pt_files/<id>.pt (a tensor)."""
    _, _, _, data = bags
    clam = tmp_path / "clam"
    (clam / "h5_files").mkdir(parents=True)
    (clam / "pt_files").mkdir()
    for i, x in enumerate(data.bags):
        coords = np.stack([np.arange(len(x)) * 512, np.zeros(len(x))], 1).astype(np.int64)
        if i < 2:
            with h5py.File(clam / "h5_files" / f"s{i}.h5", "w") as f:
                f.create_dataset("features", data=x)
                f.create_dataset("coords", data=coords)
        torch.save(torch.from_numpy(x), clam / "pt_files" / f"s{i}.pt")
    src = FeatureSource(clam)
    assert src.layout == "clam"
    for i, x in enumerate(data.bags):
        bag = src.read(f"s{i}")
        np.testing.assert_array_equal(bag.features, x)
        # the h5 file (with coordinates) wins when both exist
        assert (bag.coords is not None) == (i < 2) and bag.path.suffix == (".h5" if i < 2 else ".pt")
    pt_only = FeatureSource(clam / "pt_files")
    assert pt_only.layout == "pt" and pt_only.read("s3").coords is None


def test_trident_job_folder(bags, tmp_path):
    """TRIDENT: <job>/20x_256px_0px_overlap/features_<encoder>/<id>.h5, features as float16 possible,
    coords attrs with patch_size_level0 and magnifications (no mpp)."""
    _, _, _, data = bags
    d = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    d.mkdir(parents=True)
    (tmp_path / "job" / "20x_256px_0px_overlap" / "patches").mkdir()
    for i, x in enumerate(data.bags):
        with h5py.File(d / f"slide{i}.h5", "w") as f:
            f.create_dataset("features", data=x.astype(np.float16))
            c = f.create_dataset("coords", data=np.zeros((len(x), 2), np.int64))
            c.attrs.update(patch_size=256, patch_size_level0=512, level0_magnification=40, target_magnification=20,
                           overlap=0, name=f"slide{i}")
            f["features"].attrs.update(name=f"slide{i}", savetodir=str(d))
    for where in (tmp_path / "job", d):
        src = FeatureSource(where)
        assert src.layout in ("trident", "h5") and src.dir == d
        bag = src.read("slide1")
        assert bag.features.dtype == np.float32
        np.testing.assert_allclose(bag.features, data.bags[1], rtol=1e-3, atol=1e-3)
        assert bag.coords_attrs["patch_size_level0"] == 512
    # two encoders' folders: the user has to pick
    shutil.copytree(d, d.with_name("features_conch_v15"))
    with pytest.raises(FeatureStoreError, match="several TRIDENT feature folders.*features_conch_v15.*features_uni_v1"):
        FeatureSource(tmp_path / "job")


def test_feature_errors_name_the_file(bags, tmp_path):
    _, feats, _, _ = bags
    with pytest.raises(FeatureStoreError, match="no features for slide 'ghost'.*ghost.h5"):
        FeatureSource(feats).read("ghost")
    with pytest.raises(FeatureStoreError, match="no feature files found"):
        detect_layout(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    with h5py.File(bad / "nan.h5", "w") as f:
        f.create_dataset("features", data=np.full((3, 4), np.nan, np.float32))
    (bad / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatureStoreError, match="nan.h5: features contain NaN"):
        FeatureSource(bad).read("nan")
    with pytest.raises(FeatureStoreError, match="junk.h5: not a readable HDF5 file"):
        FeatureSource(bad).read("junk")


def test_preloaded_dataset_equals_lazy_and_checks_width(bags, tmp_path):
    _, feats, labels, data = bags
    t = read_labels(labels)
    src = FeatureSource(feats)
    lazy, pre = BagDataset(src, t.slide_ids, t.labels), BagDataset(src, t.slide_ids, t.labels, preload=True)
    assert lazy.in_dim == pre.in_dim == 8
    for i in range(len(t)):
        a, b = lazy[i], pre[i]
        torch.testing.assert_close(a["features"], b["features"])
        assert a["label"] == b["label"] == t.labels[i]
    mixed = tmp_path / "mixed"
    shutil.copytree(feats, mixed)
    write_cohort(tmp_path / "wide", witness_bags(1, dim=5, seed=0))
    shutil.copy(tmp_path / "wide" / "features" / "bag_0000.h5", mixed / "bag_0002.h5")
    with pytest.raises(FeatureStoreError, match="bag_0002.h5: 5-d features, but .*bag_0000.h5 has 8-d"):
        BagDataset(FeatureSource(mixed), t.slide_ids, t.labels, preload=True)


# ---------------------------------------------------------------------------------------------
# splits


def _table(tmp_path, n=40, seed=0, n_classes=2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    labels[: n_classes * 4] = np.arange(n_classes * 4) % n_classes  # every class present several times
    cases = cases_for(n)
    rows = "".join(f"s{i:03d},{cases[i]},{labels[i]}\n" for i in range(n))
    return read_labels(write(tmp_path / f"labels_{seed}.csv", "slide_id,case_id,label\n" + rows))


@pytest.mark.parametrize("seed", range(6))
def test_kfold_never_splits_a_case_and_covers_every_slide_once(tmp_path, seed):
    t = _table(tmp_path, n=40 + seed, seed=seed, n_classes=2 + seed % 2)
    folds = kfold_splits(t, folds=4, val_fraction=0.25, seed=seed)
    tested = sorted(i for f in folds for i in f.test)
    assert tested == list(range(len(t)))  # each slide in exactly one test part
    for f in folds:
        parts = [set(f.train), set(f.val), set(f.test)]
        assert set().union(*parts) == set(range(len(t))) and sum(map(len, parts)) == len(t)
        cases = [{t.case_ids[i] for i in p} for p in parts]
        assert not (cases[0] & cases[1]) and not (cases[0] & cases[2]) and not (cases[1] & cases[2])
        for p in (f.val, f.test):
            assert set(t.labels[p]) == set(range(len(t.classes)))  # every class in every held-out part
    # same seed, same splits
    again = kfold_splits(t, folds=4, val_fraction=0.25, seed=seed)
    assert [(f.train, f.val, f.test) for f in again] == [(f.train, f.val, f.test) for f in folds]


def test_splits_roundtrip_and_refuse_another_cohort(tmp_path):
    t = _table(tmp_path)
    folds = kfold_splits(t, 3, 0.2, seed=1)
    save_splits(tmp_path / "splits.csv", t, folds)
    back = load_splits(tmp_path / "splits.csv", t)
    assert [(f.train, f.val, f.test) for f in back] == [(f.train, f.val, f.test) for f in folds]
    other = _table(tmp_path, n=30, seed=9)
    with pytest.raises(LabelsError, match="does not place slide|is not in"):
        load_splits(tmp_path / "splits.csv", other)


def test_split_column_and_impossible_requests(tmp_path):
    rows = "a,p1,0,train\nb,p2,1,train\nc,p3,0,val\nd,p4,1,val\ne,p5,0,test\nf,p6,1,test\n"
    t = read_labels(write(tmp_path / "s.csv", "slide_id,case_id,label,split\n" + rows))
    (fold,) = column_splits(t)
    assert [t.slide_ids[i] for i in fold.test] == ["e", "f"] and [t.slide_ids[i] for i in fold.val] == ["c", "d"]
    shared = read_labels(write(tmp_path / "x.csv", "slide_id,case_id,label,split\n" + rows.replace("f,p6", "f,p1")))
    with pytest.raises(LabelsError, match="case.*p1 in both train and test"):
        column_splits(shared)
    with pytest.raises(ConfigError, match="train.folds=9 is more than the 6 cases"):
        kfold_splits(t, 9, 0.2, seed=0)
    with pytest.raises(ConfigError, match="cannot split into train.folds=6 folds"):
        kfold_splits(t, 6, 0.0, seed=0)  # 3 slides per class cannot fill 6 stratified folds
    few = read_labels(write(tmp_path / "f.csv", "slide_id,case_id,label\n"
                            + "".join(f"s{i},p{i},{int(i < 3)}\n" for i in range(8))))
    with pytest.raises(LabelsError, match="fold \\d: the test part has no slide of class '1'"):
        kfold_splits(few, 4, 0.0, seed=0)  # 3 positives cannot reach 4 test parts


def test_split_column_without_val_rows_holds_out_part_of_train(tmp_path):
    """Camelyon16's official split has train and test only; validation comes from train, by case."""
    t = _table(tmp_path, n=40)
    is_test = [(i // 2) % 4 == 0 for i in range(40)]  # slides 2k, 2k+1 may share a case: keep them together
    rows = "".join(f"{sid},{c},{t.classes[y]},{'test' if is_test[i] else 'train'}\n"
                   for i, (sid, c, y) in enumerate(zip(t.slide_ids, t.case_ids, t.labels)))
    t2 = read_labels(write(tmp_path / "col.csv", "slide_id,case_id,label,split\n" + rows))
    (fold,) = column_splits(t2, val_fraction=0.25, seed=0)
    assert fold.test == [i for i in range(40) if is_test[i]]  # the column's test part, untouched
    assert fold.val and set(fold.val) | set(fold.train) == {i for i in range(40) if not is_test[i]}
    assert not {t2.case_ids[i] for i in fold.val} & {t2.case_ids[i] for i in fold.train}
    (no_val,) = column_splits(t2, val_fraction=0.0)
    assert no_val.val == [] and len(no_val.train) == 30 and len(fold.val) + len(fold.train) == 30
