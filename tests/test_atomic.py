"""Outputs appear under their final names only when complete."""

import pytest

from wsimamba.atomic import atomic_path, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_temporary_keeps_the_suffix_and_lands_under_the_final_name(tmp_path):
    target = tmp_path / "sub" / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"png")
        assert not target.exists()
    assert target.read_bytes() == b"png"
