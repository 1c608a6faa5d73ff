"""Zhang's shift consistency of a plain model on labelled images, and the model an evaluation runs (a loaded one,
or one with its subsampling layers swapped).

CIFAR-sized inputs (side <= 64) are translated by offsets in [-4, 4] with black (zero-pixel) padding; larger ones
are resized so that the model's crop is 224/256 of the side, and cropped twice at offsets in [0, 32) scaled to the
crop (the ImageNet protocol). Offsets are drawn per image from ``seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from polyglean.errors import ArgumentError, CheckpointError, DataError
from polyglean.experiments.common import Progress, _nothing, base_samples
from polyglean.models import Preprocess

__all__ = ["CIFAR_MAX_SIDE", "ShiftConsistency", "load_eval_model", "shift_consistency"]

CIFAR_MAX_SIDE = 64
"""Inputs up to this side use the ``shift`` protocol, larger ones ``crop``."""


@dataclass(frozen=True)
class ShiftConsistency:
    """The share of images whose prediction agrees between two random shifts.

    Attributes:
        protocol: ``"shift"`` (translation, CIFAR) or ``"crop"`` (two crops of a larger image, ImageNet).
        seed: seed of the offsets.
        n_images: images measured.
        percent: agreement in percent.
    """

    protocol: str
    seed: int
    n_images: int
    percent: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_eval_model(spec: str, weights: str | None = None, *, downsample: str | None = None,
                    pretrained: bool = False) -> tuple[nn.Module, Preprocess]:
    """The model to evaluate: :func:`polyglean.load_model`, or the architecture with its subsampling layers
    swapped to ``downsample``; a checkpoint written by ``polyglean train`` is checked against ``spec`` and
    ``downsample`` (an APS checkpoint has the default's keys, so keys alone cannot tell).

    Raises:
        CheckpointError: the checkpoint records another model or downsample, or ``downsample`` is given with
            weights that ``polyglean train`` did not write.
    """
    from polyglean.training.finetune import build_model, load_finetuned, read_checkpoint
    from polyglean.models import load_model

    if weights is not None:
        try:
            read_checkpoint(weights)
        except CheckpointError:
            if downsample is not None:
                raise CheckpointError(f"--downsample {downsample} --weights {weights}: not a checkpoint written by "
                                      "`polyglean train`") from None
            return load_model(spec, weights, pretrained=pretrained)
        return load_finetuned(spec, downsample, weights)
    if downsample is not None:
        return build_model(spec, downsample)
    return load_model(spec, pretrained=pretrained)


class _Larger(Dataset[Any]):
    """The images of ``dataset`` (an ``ImageDataset``, possibly under ``Subset``s) through another transform."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.base, self.indices = base_samples(dataset)
        if not hasattr(self.base, "load_image"):
            raise DataError(f"the crop protocol re-reads the images; {type(self.base).__name__} cannot")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.transform(self.base.load_image(j)), self.base.samples[j][1]


@torch.no_grad()
def shift_consistency(model: nn.Module, preprocess: Preprocess, dataset: Dataset[Any], *, seed: int = 0,
                      batch_size: int = 32, workers: int = 0, device: str | torch.device = "cpu",
                      progress: Progress | None = None) -> ShiftConsistency:
    """Shift consistency of ``model`` (in eval mode) over ``dataset``, by the protocol its input size calls for.

    Raises:
        DataError: an empty data set.
    """
    from polyglean.metrics import shift_agreement, shift_pairs

    progress = progress or _nothing
    if batch_size < 1:
        raise ArgumentError(f"batch size must be >= 1, got {batch_size}")
    _, h, w = preprocess.input_size
    fill = [-m / s for m, s in zip(preprocess.mean, preprocess.std)]
    views: Dataset[Any]
    if max(h, w) <= CIFAR_MAX_SIDE:
        protocol, crop, views, scale = "shift", None, dataset, 1.0
    else:  # the ImageNet protocol: 224 crops of a 256 image, in proportion for other crop sizes
        protocol, crop = "crop", (h, w)
        side = round(max(h, w) * 256 / 224)
        views = _Larger(dataset, Preprocess.resize_crop(resize=side, crop=side, mean=preprocess.mean,
                                                         std=preprocess.std))
        scale = (side - max(h, w)) / 32
    n = len(views)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("the data set is empty: no images to measure shift consistency on")
    pairs = shift_pairs(n, protocol, seed=seed)
    if scale != 1:
        pairs = (pairs.float() * scale).long()
    agree: list[torch.Tensor] = []
    done = 0
    for x, _ in DataLoader(views, batch_size=batch_size, num_workers=workers):
        agree.append(shift_agreement(model, x.to(device), pairs[done:done + len(x)], protocol=protocol,
                                     crop_size=crop, fill=fill).cpu())
        done += len(x)
        progress("shift consistency", done, n)
    joined = torch.cat(agree)
    return ShiftConsistency(protocol, seed, len(joined), 100.0 * joined.float().mean().item())
