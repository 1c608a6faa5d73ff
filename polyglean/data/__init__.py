"""Data: labelled image folders (class sub-folders or ``images/`` + ``labels.csv``), subsets and loaders."""

from __future__ import annotations

from polyglean.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageDataset,
    dataset_fingerprint,
    limit_dataset,
    open_dataset,
    parse_subset,
    read_rgb,
    subset_dataset,
)
from polyglean.data.loader import CheckedLoader, make_loader

__all__ = ["IMAGE_EXTENSIONS", "CheckedLoader", "DataError", "ImageDataset", "dataset_fingerprint", "limit_dataset",
           "make_loader", "open_dataset", "parse_subset", "read_rgb", "subset_dataset"]
