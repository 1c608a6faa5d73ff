"""Labelled image folders: class sub-folders (ImageFolder layout) or ``images/`` + ``labels.csv``.

Layouts, detected automatically:

- **labels.csv**: ``root/labels.csv`` holds ``file,class_index`` lines (a header line is optional); files are
  relative to ``root/images/`` (or to ``root`` when there is no ``images/`` folder).
- **class folders**: ``root/<class>/**/<image>``; the class index is the position of the folder name in sorted
  order (CIFAR-10: airplane=0 ... truck=9).

Example:
    >>> ds = ImageDataset("../shared/data/cifar10-jpeg/test", transform)  # doctest: +SKIP
    >>> x, y = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from polyglean.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageDataset", "limit_dataset"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)
_LAYOUTS = (
    "class folders (root/<class>/<image>, class index = sorted folder name) or "
    "root/images/ + root/labels.csv (lines 'file,class_index', header optional)"
)
_SHOW = 5



def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _read_labels_csv(csv_path: Path, image_dir: Path) -> list[tuple[Path, int]]:
    samples: list[tuple[Path, int]] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise DataError(f"{csv_path} line {lineno}: expected 'file,class_index', got {','.join(row)!r}")
            name, label_text = row[0].strip(), row[1].strip()
            try:
                label = int(label_text)
            except ValueError:
                if lineno == 1 and not samples:  # a header line
                    continue
                raise DataError(
                    f"{csv_path} line {lineno}: class index {label_text!r} is not an integer"
                ) from None
            if label < 0:
                raise DataError(f"{csv_path} line {lineno}: class index {label} is negative")
            if not name:
                raise DataError(f"{csv_path} line {lineno}: empty file name")
            samples.append((image_dir / name, label))
    missing = [str(p.relative_to(image_dir)) for p, _ in samples if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:_SHOW]) + (f", ... ({len(missing) - _SHOW} more)" if len(missing) > _SHOW else "")
        raise DataError(f"{csv_path} names {len(missing)} file(s) that do not exist in {image_dir}: {shown}")
    return samples


def _scan_class_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples: list[tuple[Path, int]] = []
    for index, cls in enumerate(classes):
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            files.extend(Path(dirpath) / name for name in sorted(filenames) if _is_image(name))
        if not files:
            log.warning("class folder %s holds no images (class index %d kept)", root / cls, index)
        samples.extend((p, index) for p in files)
    return classes, samples


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images with integer labels, read from one of two layouts (see the module docstring).

    Images are opened lazily and converted to RGB before ``transform``.

    Args:
        root: the data set folder.
        transform: maps an RGB PIL image to a tensor (e.g. a :class:`polyglean.models.Preprocess`).
        num_classes: if given, every label must lie in ``[0, num_classes)``.

    Attributes:
        samples: ``(path, label)`` pairs in a fixed order (csv order, or sorted class then file name).
        classes: the class folder names in index order (class-folder layout), else None.
        layout: ``"labels.csv"`` or ``"class-folders"``.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        DataError: no images found, a malformed csv line, a listed file missing, a label out of range.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any],
        *,
        num_classes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"data set folder not found: {self.root}")
        csv_path = self.root / "labels.csv"
        self.classes: list[str] | None
        if csv_path.is_file():
            image_dir = self.root / "images" if (self.root / "images").is_dir() else self.root
            self.samples = _read_labels_csv(csv_path, image_dir)
            self.classes = None
            self.layout = "labels.csv"
        else:
            self.classes, self.samples = _scan_class_folders(self.root)
            self.layout = "class-folders"
        if not self.samples:
            raise DataError(f"no images found in {self.root}; accepted layouts: {_LAYOUTS}")
        if num_classes is not None:
            if self.classes is not None and len(self.classes) > num_classes:
                raise DataError(
                    f"{self.root} has {len(self.classes)} class folders but num_classes={num_classes}"
                )
            bad = [(p, y) for p, y in self.samples if not 0 <= y < num_classes]
            if bad:
                path, label = bad[0]
                raise DataError(
                    f"{len(bad)} label(s) out of range [0, {num_classes}) in {self.root}, e.g. {label} for {path.name}"
                )
        self.num_classes = num_classes

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``, untransformed.

        Raises:
            DataError: the file cannot be read as an image; the message names it.
        """
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """``(transform(image), label)`` of sample ``index``."""
        return self.transform(self.load_image(index)), self.samples[index][1]

    def __repr__(self) -> str:
        return f"ImageDataset(root={str(self.root)!r}, layout={self.layout!r}, samples={len(self)})"


def limit_dataset(dataset: Dataset[Any], limit: int | None, *, spread: bool = False) -> Dataset[Any]:
    """At most ``limit`` samples of ``dataset`` as a ``Subset`` (the data set itself when it is small enough).

    Args:
        dataset: a map-style data set with ``__len__``.
        limit: the number of samples to keep; None keeps all.
        spread: take evenly spaced indices instead of the first ``limit`` (class folders are sorted by class,
            so the first samples cover only the first classes).

    Raises:
        ValueError: ``limit`` is negative.
    """
    if limit is None:
        return dataset
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    n = len(dataset)  # type: ignore[arg-type]
    if limit >= n:
        return dataset
    indices: Sequence[int]
    if spread:
        indices = [(i * n) // limit for i in range(limit)]
    else:
        indices = range(limit)
    return Subset(dataset, list(indices))


def parse_subset(text: str) -> tuple[int, int]:
    """Parses ``"START:STOP"`` (either may be empty) for :func:`subset_dataset`.

    Raises:
        ValueError: not of that form, negative, or empty.
    """
    start_s, sep, stop_s = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start = int(start_s) if start_s.strip() else 0
        stop = int(stop_s) if stop_s.strip() else -1
    except ValueError:
        raise ValueError(f"a subset is START:STOP (e.g. 0:20000 or 650:), got {text!r}") from None
    if start < 0 or (stop != -1 and stop <= start):
        raise ValueError(f"subset {text!r} is empty or negative; need 0 <= START < STOP")
    return start, stop


def subset_dataset(dataset: Dataset[Any], start: int, stop: int = -1, *, seed: int = 0) -> Dataset[Any]:
    """Samples ``start:stop`` of a fixed shuffled order of ``dataset``: disjoint ranges give disjoint subsets.

    The order is ``torch.randperm(len(dataset))`` with a fixed ``seed``, so every range is spread over the classes
    and the same range is the same images on every machine (e.g. ``0:20000`` to train and ``20000:22000`` to
    validate; ``0:650`` and ``650:`` for the two halves of 1,300 images).

    Args:
        dataset: a map-style data set with ``__len__``.
        start: first position in the shuffled order.
        stop: one past the last position (``-1``: the end).
        seed: seed of the order.

    Raises:
        ValueError: the range lies outside the data set.
    """
    n = len(dataset)  # type: ignore[arg-type]
    stop = n if stop == -1 else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"subset {start}:{stop} is outside a data set of {n} images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[start:stop].tolist())
