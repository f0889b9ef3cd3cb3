"""Datasets: feature bags (HDF5 / Zarr / CLAM / TRIDENT layouts), the labels table, case-grouped splits."""

from wsimamba.data.bags import LAYOUTS, Bag, BagDataset, FeatureSource, detect_layout
from wsimamba.data.labels import LabelsError, LabelTable, read_labels
from wsimamba.data.splits import Fold, column_splits, kfold_splits, load_splits, save_splits

__all__ = [
    "LAYOUTS", "Bag", "BagDataset", "FeatureSource", "Fold", "LabelTable", "LabelsError", "column_splits",
    "detect_layout", "kfold_splits", "load_splits", "read_labels", "save_splits",
]
