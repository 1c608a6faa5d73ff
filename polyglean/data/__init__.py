"""Data: labelled image folders (class sub-folders or ``images/`` + ``labels.csv``) and subsets."""

from __future__ import annotations

from polyglean.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageDataset,
    limit_dataset,
    parse_subset,
    subset_dataset,
)

__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageDataset", "limit_dataset", "parse_subset", "subset_dataset"]
