"""Cohort splits: stratified k-fold grouped by case, a validation part inside each training fold, or
the fixed splits of the `split` column. A case (patient) never sits on two sides of a split.

Splits are saved as a long CSV (`fold,part,slide_id,case_id,label`) so a run can be repeated exactly.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from wsimamba.atomic import write_text_atomic
from wsimamba.data.labels import LabelsError, LabelTable
from wsimamba.errors import ConfigError

PARTS = ("train", "val", "test")


@dataclass
class Fold:
    """Row indices into a LabelTable for each part."""

    index: int
    train: list[int]
    val: list[int]
    test: list[int]

    def part(self, name: str) -> list[int]:
        return getattr(self, name)


def _sgkf(y: np.ndarray, groups: list[str], n_splits: int, seed: int, what: str):
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer groups than folds; _check_parts reports it better
        warnings.simplefilter("ignore", UserWarning)
        try:
            return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
                np.zeros(len(y)), y, groups))
        except ValueError as e:
            counts = ", ".join(f"{c}: {n}" for c, n in zip(*np.unique(y, return_counts=True)))
            raise ConfigError(f"cannot split into {what} ({e}; slides per class index {counts})") from None


def kfold_splits(table: LabelTable, folds: int, val_fraction: float, seed: int) -> list[Fold]:
    """`folds` stratified folds grouped by case (each slide in exactly one test part); inside each
    fold's training part, about `val_fraction` of it (again by case, stratified) is held out for
    validation (early stopping, checkpoint choice); `val_fraction` 0 holds nothing out."""
    n_cases = len(set(table.case_ids))
    if folds < 2:
        raise ConfigError(f"train.folds must be >= 2 for k-fold splits, got {folds}")
    if folds > n_cases:
        raise ConfigError(f"train.folds={folds} is more than the {n_cases} cases in {table.path}")
    y, groups = table.labels, table.case_ids
    out = []
    for k, (train, test) in enumerate(_sgkf(y, groups, folds, seed, f"train.folds={folds} folds")):
        val: list[int] = []
        if val_fraction > 0:
            inner_n = max(2, int(round(1 / val_fraction)))
            inner_groups = [groups[i] for i in train]
            if len(set(inner_groups)) < inner_n:
                raise ConfigError(
                    f"fold {k}: {len(set(inner_groups))} training cases cannot give a validation part of "
                    f"train.val_fraction={val_fraction}; use fewer folds or a larger cohort"
                )
            fit, hold = _sgkf(y[train], inner_groups, inner_n, seed + 1000 + k,
                              f"a validation part of train.val_fraction={val_fraction} in fold {k}")[0]
            train, val = train[fit], train[hold]
        out.append(Fold(k, sorted(int(i) for i in train), sorted(int(i) for i in val), sorted(int(i) for i in test)))
    _check_parts(table, out, val_fraction > 0)
    return out


def column_splits(table: LabelTable, val_fraction: float = 0.0, seed: int = 0) -> list[Fold]:
    """One fold from the `split` column (train / val / test). When no row says `val` (Camelyon16's
    official split has none), about `val_fraction` of the training rows are held out for validation,
    by case and stratified, as in :func:`kfold_splits`."""
    if table.splits is None:
        raise ConfigError(f"train.split is 'column' but {table.path} has no split column")
    parts = {p: [i for i, s in enumerate(table.splits) if s == p] for p in PARTS}
    train, val = np.array(parts["train"], np.int64), parts["val"]
    if not val and val_fraction > 0 and len(train):
        inner_n = max(2, int(round(1 / val_fraction)))
        groups = [table.case_ids[i] for i in train]
        if len(set(groups)) < inner_n:
            raise ConfigError(f"{len(set(groups))} training cases cannot give a validation part of "
                              f"train.val_fraction={val_fraction}")
        fit, hold = _sgkf(table.labels[train], groups, inner_n, seed + 1000,
                          f"a validation part of train.val_fraction={val_fraction}")[0]
        train, val = train[fit], sorted(int(i) for i in train[hold])
    fold = Fold(0, sorted(int(i) for i in train), list(val), parts["test"])
    _check_parts(table, [fold], bool(fold.val))
    return [fold]


def _check_parts(table: LabelTable, folds: list[Fold], need_val: bool) -> None:
    """Every test and validation part holds every class, no case sits on two sides, nothing is empty."""
    for f in folds:
        for part in PARTS:
            idx = f.part(part)
            if part == "val" and not need_val:
                continue
            if not idx:
                raise LabelsError(f"fold {f.index}: the {part} part is empty ({table.path})")
            if part != "train":
                missing = [table.classes[c] for c in range(len(table.classes)) if not (table.labels[idx] == c).any()]
                if missing:
                    hint = "train.folds" if part == "test" else "train.val_fraction or train.folds"
                    raise LabelsError(
                        f"fold {f.index}: the {part} part has no slide of class {', '.join(map(repr, missing))} "
                        f"({table.class_counts()} in {table.path}); change {hint} or add slides"
                    )
        sides = {p: {table.case_ids[i] for i in f.part(p)} for p in PARTS}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = sides[a] & sides[b]
            if shared:
                raise LabelsError(f"fold {f.index}: case(s) {', '.join(sorted(shared)[:5])} in both {a} and {b}")


def splits_csv(table: LabelTable, folds: list[Fold]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["fold", "part", "slide_id", "case_id", "label"])
    for f in folds:
        for part in PARTS:
            for i in f.part(part):
                w.writerow([f.index, part, table.slide_ids[i], table.case_ids[i], table.classes[table.labels[i]]])
    return buf.getvalue()


def save_splits(path: Path, table: LabelTable, folds: list[Fold]) -> None:
    """Write the splits CSV atomically (temporary name, then rename)."""
    write_text_atomic(path, splits_csv(table, folds))


def load_splits(path: Path, table: LabelTable) -> list[Fold]:
    """Read a splits CSV and map it onto `table`; the slides must be the same set."""
    path = Path(path)
    if path.is_dir():
        path = path / "splits.csv"
    if not path.is_file():
        raise ConfigError(f"{path}: no such splits file")
    index = {sid: i for i, sid in enumerate(table.slide_ids)}
    folds: dict[int, Fold] = {}
    seen_in_fold: dict[int, set[str]] = {}
    with open(path, newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                k, part, sid = int(row["fold"]), row["part"], row["slide_id"]
            except (KeyError, TypeError, ValueError):
                raise LabelsError(f"{path}, line {line}: expected columns fold,part,slide_id,case_id,label") from None
            if part not in PARTS:
                raise LabelsError(f"{path}, line {line}: part must be one of {', '.join(PARTS)}, got {part!r}")
            if sid not in index:
                raise LabelsError(f"{path}, line {line}: slide {sid!r} is not in {table.path} (the splits belong to another cohort)")
            f = folds.setdefault(k, Fold(k, [], [], []))
            f.part(part).append(index[sid])
            seen_in_fold.setdefault(k, set()).add(sid)
    if not folds:
        raise LabelsError(f"{path}: no splits")
    for k, seen in seen_in_fold.items():
        absent = sorted(set(table.slide_ids) - seen)
        if absent:
            raise LabelsError(
                f"{path}: fold {k} does not place slide(s) {', '.join(absent[:5])}"
                f"{' …' if len(absent) > 5 else ''} of {table.path} (the splits belong to another cohort)"
            )
    out = [folds[k] for k in sorted(folds)]
    if [f.index for f in out] != list(range(len(out))):
        raise LabelsError(f"{path}: folds must be numbered 0..{len(out) - 1}")
    for f in out:
        for part in PARTS:
            f.part(part).sort()
    _check_parts(table, out, any(f.val for f in out))
    return out
