"""The labels table: `labels.csv` with `slide_id,case_id,label` and an optional `split` column.

Labels may be integers or strings. Classes are ordered numerically (integer labels) or
alphabetically (strings) unless the caller gives the order; in binary tasks the second class is
the positive one (its probability is what AUC ranks).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsimamba.errors import WsimambaError

REQUIRED = ("slide_id", "case_id", "label")
SPLIT_VALUES = ("train", "val", "test")


class LabelsError(WsimambaError):
    """labels.csv is missing, malformed, or disagrees with the feature files."""


@dataclass
class LabelTable:
    """One row per slide. `labels` are class indices into `classes`; `splits` the `split` column or None."""

    path: Path
    slide_ids: list[str]
    case_ids: list[str]
    labels: np.ndarray  # int64 (n,)
    classes: list[str]
    splits: list[str] | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def subset(self, keep: list[int]) -> "LabelTable":
        return LabelTable(
            self.path,
            [self.slide_ids[i] for i in keep],
            [self.case_ids[i] for i in keep],
            self.labels[keep],
            self.classes,
            [self.splits[i] for i in keep] if self.splits is not None else None,
        )

    def class_counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_labels(path: str | Path, classes: list[str] | None = None) -> LabelTable:
    """Read and check labels.csv. `classes` fixes the class order (every label must be one of them).

    Raises LabelsError naming the file, line and value for: a missing file or column, an empty
    field, a duplicated slide_id, a split value other than train/val/test, fewer than two classes.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: no such labels file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise LabelsError(
                f"{path}: missing column(s) {', '.join(missing)} (need slide_id,case_id,label[,split]; "
                f"found {','.join(header) or 'no header'})"
            )
        has_split = "split" in header
        slide_ids, case_ids, raw, splits = [], [], [], []
        seen: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not any(row.values()):
                continue
            for col in REQUIRED + (("split",) if has_split else ()):
                if not row.get(col):
                    raise LabelsError(f"{path}, line {line}: empty {col}")
            sid = row["slide_id"]
            if sid in seen:
                raise LabelsError(f"{path}, line {line}: slide_id {sid!r} already on line {seen[sid]}")
            seen[sid] = line
            if has_split and row["split"] not in SPLIT_VALUES:
                raise LabelsError(f"{path}, line {line}: split must be one of {', '.join(SPLIT_VALUES)}, got {row['split']!r}")
            slide_ids.append(sid)
            case_ids.append(row["case_id"])
            raw.append(row["label"])
            splits.append(row.get("split", ""))
    if not slide_ids:
        raise LabelsError(f"{path}: no rows")
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise LabelsError(f"data.classes has duplicates: {classes}")
        unknown = sorted(set(raw) - set(classes))
        if unknown:
            raise LabelsError(f"{path}: label(s) {', '.join(map(repr, unknown))} not in data.classes {classes}")
    else:
        values = sorted(set(raw))
        if all(_is_int(v) for v in values):
            values = [str(v) for v in sorted({int(v) for v in values})]
            raw = [str(int(v)) for v in raw]
        classes = values
    if len(classes) < 2:
        raise LabelsError(f"{path}: need at least two classes, found only {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return LabelTable(path, slide_ids, case_ids, np.array([index[v] for v in raw], np.int64), classes,
                      splits if has_split else None)
