"""``polyglean eval --downsample NAME`` and ``--shift-consistency``: swapped models and Zhang's shift consistency.

``--downsample NAME`` evaluates the model with its subsampling layers swapped (the same rewrite as ``polyglean
train --downsample NAME``); with ``--weights`` the checkpoint must be one written by ``polyglean train`` for that
model and downsample. ``--shift-consistency`` adds the share of images whose plain-model prediction agrees between
two random shifts (REFERENCE §3): CIFAR-sized inputs (side <= 64) are translated by offsets in [-4, 4] with black
(zero-pixel) padding; larger ones are resized so that the model's crop is 224/256 of the side, and cropped twice at
offsets in [0, 32) scaled to the crop (the ImageNet protocol). Offsets are drawn per image from ``--seed``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from polyglean.models import Preprocess

CIFAR_MAX_SIDE = 64
"""Inputs up to this side use the ``shift`` protocol, larger ones ``crop``."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--downsample`` and ``--shift-consistency`` flags of ``polyglean eval``."""
    from polyglean.training.finetune import DOWNSAMPLES

    p.add_argument("--downsample", choices=DOWNSAMPLES.names(),
                   help="swap the model's subsampling layers to this layer (as `polyglean train --downsample`); "
                        "with --weights, a checkpoint written by `polyglean train`")
    p.add_argument("--shift-consistency", action="store_true",
                   help="also report the plain model's shift consistency: %% of images whose prediction agrees "
                        "between two random shifts (seeded by --seed)")


def check(args: argparse.Namespace) -> None:
    """Refuses combinations this module does not support.

    Raises:
        ValueError: ``--downsample`` or ``--shift-consistency`` together with ``--tta``.
    """
    from polyglean.cli import eval_tta

    if eval_tta.wants_tta(args) and (args.downsample or args.shift_consistency):
        raise ValueError("--downsample and --shift-consistency are not supported together with --tta yet; "
                         "run them without --tta")


def load(args: argparse.Namespace) -> tuple[nn.Module, Preprocess]:
    """The model to evaluate: ``load_model``, or the swapped architecture; a ``train`` checkpoint is checked
    against ``--model`` and ``--downsample`` (an APS checkpoint has the default's keys, so keys alone cannot tell).

    Raises:
        CheckpointError: the checkpoint records another model or downsample, or ``--downsample`` is given with
            weights that ``polyglean train`` did not write.
    """
    from polyglean.training.finetune import build_model, load_finetuned, read_checkpoint
    from polyglean.models import CheckpointError, load_model

    if args.weights is not None:
        try:
            read_checkpoint(args.weights)
        except CheckpointError:
            if args.downsample is not None:
                raise CheckpointError(f"--downsample {args.downsample} --weights {args.weights}: not a checkpoint "
                                      "written by `polyglean train`") from None
            return load_model(args.model, args.weights, pretrained=args.pretrained)
        return load_finetuned(args.model, args.downsample, args.weights)
    if args.downsample is not None:
        return build_model(args.model, args.downsample)
    return load_model(args.model, pretrained=args.pretrained)


def _flatten(dataset: Any) -> tuple[Any, list[int]]:
    """The ``ImageDataset`` under nested ``Subset``s, and the indices into it."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


class _Larger(Dataset[Any]):
    """The images of ``dataset`` (an ``ImageDataset``, possibly under ``Subset``s) through another transform."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.base, self.indices = _flatten(dataset)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.transform(self.base.load_image(j)), self.base.samples[j][1]


def measure(args: argparse.Namespace, model: nn.Module, preprocess: Preprocess, dataset: Any) -> dict[str, Any] | None:
    """Shift consistency of ``model`` over ``dataset`` (``None`` without ``--shift-consistency``)."""
    from tqdm import tqdm

    from polyglean.metrics import shift_agreement, shift_pairs

    if not args.shift_consistency:
        return None
    _, h, w = preprocess.input_size
    fill = [-m / s for m, s in zip(preprocess.mean, preprocess.std)]
    if max(h, w) <= CIFAR_MAX_SIDE:
        protocol, crop, views = "shift", None, dataset
        scale = 1
    else:  # the ImageNet protocol: 224 crops of a 256 image, in proportion for other crop sizes
        protocol, crop = "crop", (h, w)
        side = round(max(h, w) * 256 / 224)
        views = _Larger(dataset, Preprocess.resize_crop(resize=side, crop=side, mean=preprocess.mean,
                                                         std=preprocess.std))
        scale = (side - max(h, w)) / 32
    pairs = shift_pairs(len(views), protocol, seed=args.seed)
    if scale != 1:
        pairs = (pairs.float() * scale).long()
    loader = DataLoader(views, batch_size=args.batch_size, num_workers=args.workers)
    agree: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad(), tqdm(total=len(views), unit="img", disable=args.no_progress, desc="shift consistency") as bar:
        for x, _ in loader:
            start = sum(len(a) for a in agree)
            agree.append(shift_agreement(model, x, pairs[start:start + len(x)], protocol=protocol, crop_size=crop,
                                         fill=fill))
            bar.update(len(x))
    joined = torch.cat(agree)
    return {"protocol": protocol, "seed": args.seed, "n_images": len(joined),
            "percent": 100.0 * joined.float().mean().item()}


def format_line(result: dict[str, Any] | None) -> str:
    """One line for the text output, or ``""``."""
    if not result:
        return ""
    return (f"shift consistency ({result['protocol']}, seed {result['seed']}, {result['n_images']} images): "
            f"{result['percent']:.2f}%")
