"""Paired image / label-map datasets for semantic segmentation.

Layouts:

- **shared stems** (CamVid): an images folder and a labels folder; ``images/0016E5_07959.png`` pairs with
  ``labels/0016E5_07959.png`` (any image extension on either side). Label maps hold class indices as pixel values.
- **Cityscapes**: ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
  ``root/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`` (pass ``images=root/leftImg8bit/<split>`` and
  ``labels=root/gtFine/<split>``, or the split folders' parents are found from ``root``).

Every image must have a label map of its size whose values are class indices ``0..K-1`` or the ignore index
(CamVid 11, Cityscapes 255); anything else is a :class:`~polyglean.errors.DataError` naming the file.

Example:
    >>> ds = SegmentationDataset("camvid/val", "camvid/valannot", preprocess, num_classes=11,
    ...                          ignore_index=11)  # doctest: +SKIP
    >>> x, y = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from polyglean.data.datasets import IMAGE_EXTENSIONS
from polyglean.errors import DataError

__all__ = ["CAMVID_IGNORE", "CITYSCAPES_IGNORE", "SegmentationDataset"]

CAMVID_IGNORE = 11
CITYSCAPES_IGNORE = 255
_SHOW = 5
_CITY_IMAGE = "_leftImg8bit"
_CITY_LABEL = "_gtFine_labelTrainIds"


def _files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out.extend(Path(dirpath) / n for n in sorted(filenames)
                   if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    return out


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_SHOW]) + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images with per-pixel class labels (see the module docstring for the layouts).

    Args:
        images: Folder of images (searched recursively).
        labels: Folder of label maps.
        transform: Maps an RGB PIL image to a tensor; it must keep the size (segmentation presets do not resize).
        num_classes: ``K``: valid labels are ``0..K-1``.
        ignore_index: The label value of unlabelled pixels (void).

    Attributes:
        samples: ``(image path, label path)`` pairs, sorted by the image's path.
        layout: ``"stems"`` or ``"cityscapes"``.

    Raises:
        DataError: a folder is missing or holds no images, or an image has no label map.
    """

    def __init__(self, images: str | Path, labels: str | Path, transform: Callable[[Image.Image], Any], *,
                 num_classes: int, ignore_index: int | None = None) -> None:
        self.images, self.labels = Path(images), Path(labels)
        for what, folder in (("images", self.images), ("labels", self.labels)):
            if not folder.is_dir():
                raise DataError(f"{what} folder {folder} does not exist or is not a folder")
        if num_classes < 1:
            raise DataError(f"num_classes must be positive, got {num_classes}")
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        image_files = _files(self.images)
        if not image_files:
            raise DataError(f"no images in {self.images} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.layout = "cityscapes" if all(p.stem.endswith(_CITY_IMAGE) for p in image_files) else "stems"
        label_files = _files(self.labels)
        if self.layout == "cityscapes":
            index = {p.relative_to(self.labels).with_name(p.stem[: -len(_CITY_LABEL)]).as_posix(): p
                     for p in label_files if p.stem.endswith(_CITY_LABEL)}
            keys = [p.relative_to(self.images).with_name(p.stem[: -len(_CITY_IMAGE)]).as_posix() for p in image_files]
        else:
            index = {}
            for p in label_files:
                key = p.relative_to(self.labels).with_suffix("").as_posix()
                if key in index:
                    raise DataError(f"two label maps share the stem {key!r} in {self.labels}: {index[key].name}, "
                                    f"{p.name}")
                index[key] = p
            keys = [p.relative_to(self.images).with_suffix("").as_posix() for p in image_files]
        missing = [k for k in keys if k not in index]
        if missing:
            raise DataError(f"{len(missing)} image(s) in {self.images} have no label map in {self.labels}: "
                            f"{_listing(missing)} (layout: {self.layout}; image and label map must share the stem)")
        self.samples = [(p, index[k]) for p, k in zip(image_files, keys)]

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, index: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The label map of sample ``index`` as ``(H, W)`` int64, checked.

        Args:
            index: Sample index.
            size: ``(W, H)`` of its image, to check against.

        Raises:
            DataError: unreadable, not single-channel, another size, or values outside the classes.
        """
        path = self.samples[index][1]
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"label map {path} has mode {im.mode}: expected one channel of class indices")
                if size is not None and im.size != size:
                    raise DataError(f"label map {path} is {im.size[0]}x{im.size[1]} but its image "
                                    f"{self.samples[index][0].name} is {size[0]}x{size[1]}")
                arr = np.asarray(im).astype(np.int64)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read label map {path}: {exc}") from exc
        label = torch.from_numpy(arr)
        bad = (label < 0) | (label >= self.num_classes)
        if self.ignore_index is not None:
            bad &= label != self.ignore_index
        if bool(bad.any()):
            values = sorted({int(v) for v in label[bad].unique()[:_SHOW]})
            raise DataError(f"label map {path} holds value(s) {values} outside the classes 0..{self.num_classes - 1} "
                            f"and not the ignore index {self.ignore_index}")
        return label

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        label = self.read_label(index, image.size)
        x = self.transform(image)
        if isinstance(x, torch.Tensor) and tuple(x.shape[-2:]) != tuple(label.shape):
            raise DataError(f"the preprocessing turned {path.name} into {tuple(x.shape[-2:])} but its label map is "
                            f"{tuple(label.shape)}: segmentation needs a size-preserving preprocessing")
        return x, label
