"""Labelled image folders: class sub-folders (ImageFolder layout) or ``images/`` + ``labels.csv``.

Layouts, detected automatically:

- **labels.csv**: ``root/labels.csv`` holds ``file,class_index`` lines; files are relative to ``root/images/`` (or
  to ``root`` when there is no ``images/`` folder). The first line may be the header ``file,class_index`` (or
  another pair of column names, such as ``path,label``); a row naming an image is never taken for a header, and an
  image listed twice is an error.
- **class folders**: ``root/<class>/**/<image>``; the class index is the position of the folder name in sorted
  order (CIFAR-10: airplane=0 ... truck=9). Directory links are followed, but no directory twice and never back
  into the data set folder or another class (a link loop cannot multiply the images).

Images are read as 8-bit RGB; 16-bit and float images are scaled to 8 bits (see :func:`read_rgb`).

Example:
    >>> ds = ImageDataset("../shared/data/cifar10-jpeg/test", transform)  # doctest: +SKIP
    >>> x, y = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from polyglean.errors import ArgumentError, DataError, NotFoundError

__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageDataset", "dataset_fingerprint", "limit_dataset", "open_dataset",
           "parse_subset", "read_rgb", "subset_dataset"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)
_LAYOUTS = (
    "class folders (root/<class>/<image>, class index = sorted folder name) or "
    "root/images/ + root/labels.csv (lines 'file,class_index'; an optional first line 'file,class_index')"
)
_SHOW = 5



def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


_HEADER = ("file", "class_index")


def _is_header(row: list[str]) -> bool:
    """The literal header ``file,class_index``, or a first row whose two cells are plainly column names: the label
    is no integer and the file cell names no image (``file,class``, ``path,label``). A row like ``cat.png,dog`` is
    data with a bad label, never a header."""
    name, label = (cell.strip() for cell in row)
    if (name.lower(), label.lower()) == _HEADER:
        return True
    try:
        int(label)
    except ValueError:
        return os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS
    return False


def _read_labels_csv(csv_path: Path, image_dir: Path) -> list[tuple[Path, int]]:
    samples: list[tuple[Path, int]] = []
    first_line: dict[Path, int] = {}
    first_row = True
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise DataError(f"{csv_path} line {lineno}: expected 'file,class_index', got {','.join(row)!r}")
            header, first_row = first_row and _is_header(row), False
            if header:
                continue
            name, label_text = row[0].strip(), row[1].strip()
            try:
                label = int(label_text)
            except ValueError:
                raise DataError(
                    f"{csv_path} line {lineno}: class index {label_text!r} is not an integer (a header line must "
                    "be 'file,class_index')"
                ) from None
            if label < 0:
                raise DataError(f"{csv_path} line {lineno}: class index {label} is negative")
            if not name:
                raise DataError(f"{csv_path} line {lineno}: empty file name")
            path = image_dir / name
            key = Path(os.path.normpath(path))
            if key in first_line:
                raise DataError(f"{csv_path} line {lineno}: {name!r} is listed twice (first on line "
                                f"{first_line[key]}); every image must appear once")
            first_line[key] = lineno
            samples.append((path, label))
    missing = [str(p.relative_to(image_dir)) for p, _ in samples if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:_SHOW]) + (f", ... ({len(missing) - _SHOW} more)" if len(missing) > _SHOW else "")
        raise DataError(f"{csv_path} names {len(missing)} file(s) that do not exist in {image_dir}: {shown}")
    _refuse_duplicates(samples, csv_path)
    return samples


def _refuse_duplicates(samples: list[tuple[Path, int]], where: Path) -> None:
    """Two entries that are the same file (by real path: links, ``./`` or ``..`` in names) are an error."""
    seen: dict[str, Path] = {}
    for path, _ in samples:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(f"{where}: {seen[real]} and {path} are the same file ({real}); every image must be "
                            "listed once")
        seen[real] = path


def _scan_class_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Every image under ``root/<class>/``, following directory links but none twice.

    A directory is entered once, by its real path, and never when it is the data set folder or another class
    folder (a link ``cat/loop -> ..`` would otherwise list every class again under ``cat``). The same real file
    reached twice (a file link into another class, a hard-linked copy counts as a different file) is an error.
    """
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    entered = {os.path.realpath(root)} | {os.path.realpath(root / cls) for cls in classes}
    samples: list[tuple[Path, int]] = []
    for index, cls in enumerate(classes):
        files: list[Path] = []
        _walk(root / cls, files, entered)
        if not files:
            log.warning("class folder %s holds no images (class index %d kept)", root / cls, index)
        samples.extend((p, index) for p in files)
    _refuse_duplicates(samples, root)
    return classes, samples


def _walk(folder: Path, files: list[Path], entered: set[str]) -> None:
    """Appends the images under ``folder`` in sorted order; sub-folders whose real path was entered are skipped."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    for entry in entries:
        if entry.is_file() and _is_image(entry.name):
            files.append(Path(entry.path))
    for entry in entries:
        if not entry.is_dir():
            continue
        real = os.path.realpath(entry.path)
        if real in entered:
            log.warning("skipping %s: it leads to %s, which is already part of the data set", entry.path, real)
            continue
        entered.add(real)
        _walk(Path(entry.path), files, entered)


def read_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB.

    8-bit images are converted by Pillow. Pillow's own conversion of wider pixels is wrong (it clips), so they are
    scaled here: 16-bit integer images (``I;16`` PNG/TIFF) by ``255 / 65535``; 32-bit integer images (``I``) with
    values in ``[0, 65535]`` the same way; float images (``F``, float TIFF) with values in ``[0, 1]`` by 255. Any
    other range is refused, since no scale is right for all of them. (16-bit RGB PNGs reach Pillow as 8-bit RGB
    already, correctly rounded to the high byte.)

    Raises:
        DataError: unreadable, over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), or wide
            pixels outside the ranges above.
    """
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                return _scale_wide(img, path)
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is larger than Pillow's decompression-bomb limit "
                        f"({Image.MAX_IMAGE_PIXELS} pixels): {exc}. Shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS "
                        "if you trust the file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _scale_wide(img: Image.Image, path: str | Path) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit RGB (see :func:`read_rgb`)."""
    values = np.asarray(img, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F":
        if not (np.isfinite(values).all() and low >= 0.0 and high <= 1.0):
            raise DataError(f"image {path} holds float pixels in [{low:g}, {high:g}]; only [0, 1] can be scaled to "
                            "8 bits unambiguously: convert it to an 8-bit image first")
        scale = 255.0
    else:
        if low < 0 or high > 65535:
            raise DataError(f"image {path} holds {img.mode} pixels in [{low:g}, {high:g}], outside 16 bits; "
                            "convert it to an 8-bit image first")
        scale = 255.0 / 65535.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


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
            raise NotFoundError(f"data set folder not found: {self.root}")
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
            DataError: the file cannot be read as an image, is over Pillow's decompression-bomb limit, or holds
                pixel values that cannot be scaled to 8 bits; the message names it.
        """
        return read_rgb(self.samples[index][0])

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
        raise ArgumentError(f"limit must be >= 0, got {limit}")
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
            raise ArgumentError
        start = int(start_s) if start_s.strip() else 0
        stop = int(stop_s) if stop_s.strip() else -1
    except ValueError:
        raise ArgumentError(f"a subset is START:STOP (e.g. 0:20000 or 650:), got {text!r}") from None
    if start < 0 or (stop != -1 and stop <= start):
        raise ArgumentError(f"subset {text!r} is empty or negative; need 0 <= START < STOP")
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
        raise ArgumentError(f"subset {start}:{stop} is outside a data set of {n} images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[start:stop].tolist())


def open_dataset(root: str | Path, transform: Callable[[Image.Image], Any], *, subset: str | None = None,
                 limit: int | None = None, num_classes: int | None = None) -> Dataset[Any]:
    """:class:`ImageDataset` of ``root``, then a ``START:STOP`` range of its fixed shuffled order (``subset``, see
    :func:`subset_dataset`) or at most ``limit`` images evenly spread over it.

    Raises:
        DataError: as :class:`ImageDataset`; ``subset`` and ``limit`` together.
        ValueError: a malformed or out-of-range ``subset``, a negative ``limit``.
    """
    if subset is not None and limit is not None:
        raise DataError("give a subset or a limit, not both")
    dataset: Dataset[Any] = ImageDataset(root, transform, num_classes=num_classes)
    if subset:
        dataset = subset_dataset(dataset, *parse_subset(subset))
    return limit_dataset(dataset, limit, spread=True)


def dataset_fingerprint(dataset: Dataset[Any]) -> str:
    """SHA-256 of what a data set holds: every sample's file (real path, size, modification time) and label, in
    order, through any nesting of ``Subset``. Replacing, touching, adding or relabelling an image changes it; a
    cache keyed on it is never served for other images.
    """
    indices = list(range(len(dataset)))  # type: ignore[arg-type]
    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset_fingerprint needs an ImageDataset (or Subsets of one), got {type(dataset).__name__}")
    h = hashlib.sha256()
    for i in indices:
        path, label = dataset.samples[i]
        st = path.stat()
        h.update(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()
