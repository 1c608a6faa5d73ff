"""Data: labelled image folders (class sub-folders or ``images/`` + ``labels.csv``), subsets and loaders."""

from __future__ import annotations

from polyglean.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageDataset,
    limit_dataset,
    parse_subset,
    read_rgb,
    subset_dataset,
)
from polyglean.data.loader import CheckedLoader, make_loader

__all__ = ["IMAGE_EXTENSIONS", "CheckedLoader", "DataError", "ImageDataset", "limit_dataset", "make_loader",
           "parse_subset", "read_rgb", "subset_dataset"]
