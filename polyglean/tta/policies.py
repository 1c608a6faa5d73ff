"""Test-time augmentation policies: a registry of named lists of augmentations.

A policy builder takes the model's input size, its normalisation and a seed, and returns the augmentations in a
fixed order; the first is always the identity, so a policy truncated to one view is the plain model. Crops depend
on the input size: inputs of side <= 64 (CIFAR) are cropped by padding and shifting (:class:`PadCrop`, pad = side
/ 8, i.e. 4 pixels at 32), larger ones by cropping 0.875 of the input and resizing it back (:class:`ResizedCrop`).
The centre crop is the input itself.

========================  =====  ==================================================================================
name                      views  augmentations
========================  =====  ==================================================================================
``identity``              1      the input
``flip``                  2      identity, horizontal flip
``five-crop``             5      identity (centre), the four corner crops
``ten-crop``              10     five-crop and the mirror image of each
``random-crops``          8      identity and 7 crops at offsets drawn uniformly from a seeded generator
``scales``                4      identity, zoom 0.9 (out), 1.1 and 1.2 (in)
``flip-scales``           8      scales and the mirror image of each
``expanded``              21     ten-crop (10), zoom 0.9 / 1.1 / 1.2, brightness 0.8 / 1.2, contrast 1.2,
                                 saturation 0.5 / 1.5, sharpness 2, rotation -10 / +10 degrees
========================  =====  ==================================================================================

``expanded`` follows the shape of the "expanded" policy of Shanmugam et al. (ICCV 2021) that the paper combines
with phase search — flips, crops and scales plus photometric and small geometric ops of the AutoAugment family, 21
in all — with our own choice of the ops' magnitudes.

Example:
    >>> from polyglean.tta.augment import Pixels
    >>> [a.name for a in build_policy("flip", (3, 32, 32))]
    ['identity', 'hflip']
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from polyglean.registry import Registry
from polyglean.errors import ArgumentError
from polyglean.tta.augment import (
    Augmentation,
    Brightness,
    Contrast,
    HFlip,
    Identity,
    PadCrop,
    Pixels,
    ResizedCrop,
    Rotate,
    Saturation,
    Scale,
    Sharpness,
    compose,
)

__all__ = ["POLICIES", "SMALL_INPUT", "build_policy", "corner_crops", "crop_at"]

PolicyBuilder = Callable[[tuple[int, int, int], Pixels, int], list[Augmentation]]
POLICIES: Registry[PolicyBuilder] = Registry("TTA policy")

SMALL_INPUT = 64  # inputs of at most this side are cropped by padding and shifting
_CROP = 0.875  # relative crop side for large inputs (224 of 256)


def _pad(input_size: tuple[int, int, int]) -> int:
    return max(1, min(input_size[1:]) // 8)


def crop_at(fy: float, fx: float, input_size: tuple[int, int, int], pixels: Pixels) -> Augmentation:
    """The crop at relative position ``(fy, fx)`` in [0, 1]² (0.5, 0.5 is the centre: the input itself).

    Small inputs: :class:`PadCrop` at offset ``round(fy * 2 pad)``; large ones: :class:`ResizedCrop` of 0.875.
    """
    if (fy, fx) == (0.5, 0.5):
        return Identity()
    if min(input_size[1:]) <= SMALL_INPUT:
        pad = _pad(input_size)
        return PadCrop(round(fy * 2 * pad), round(fx * 2 * pad), pad=pad, pixels=pixels)
    return ResizedCrop(_CROP, fy, fx)


def corner_crops(input_size: tuple[int, int, int], pixels: Pixels) -> list[Augmentation]:
    """Top-left, top-right, bottom-left, bottom-right crops."""
    return [crop_at(fy, fx, input_size, pixels) for fy, fx in ((0, 0), (0, 1), (1, 0), (1, 1))]


@POLICIES.register("identity")
def _identity(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    return [Identity()]


@POLICIES.register("flip")
def _flip(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    return [Identity(), HFlip()]


@POLICIES.register("five-crop")
def _five_crop(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    return [Identity(), *corner_crops(input_size, pixels)]


def _mirrored(augs: list[Augmentation]) -> list[Augmentation]:
    return augs + [compose(HFlip(), a) for a in augs]


@POLICIES.register("ten-crop")
def _ten_crop(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    return _mirrored(_five_crop(input_size, pixels, seed))


@POLICIES.register("random-crops")
def _random_crops(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    g = torch.Generator().manual_seed(seed)
    augs: list[Augmentation] = [Identity()]
    small = min(input_size[1:]) <= SMALL_INPUT
    while len(augs) < 8:
        if small:
            span = 2 * _pad(input_size) + 1
            fy, fx = (int(v) / (span - 1) for v in torch.randint(0, span, (2,), generator=g))
        else:
            fy, fx = (round(float(v), 3) for v in torch.rand(2, generator=g))
        aug = crop_at(fy, fx, input_size, pixels)
        if aug.name not in {a.name for a in augs}:
            augs.append(aug)
    return augs


@POLICIES.register("scales")
def _scales(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    return [Identity(), Scale(0.9, pixels=pixels), Scale(1.1, pixels=pixels), Scale(1.2, pixels=pixels)]


@POLICIES.register("flip-scales")
def _flip_scales(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    return _mirrored(_scales(input_size, pixels, seed))


@POLICIES.register("expanded")
def _expanded(input_size: tuple[int, int, int], pixels: Pixels, seed: int) -> list[Augmentation]:
    return [
        *_ten_crop(input_size, pixels, seed),
        *_scales(input_size, pixels, seed)[1:],
        Brightness(pixels=pixels, factor=0.8),
        Brightness(pixels=pixels, factor=1.2),
        Contrast(pixels=pixels, factor=1.2),
        Saturation(pixels=pixels, factor=0.5),
        Saturation(pixels=pixels, factor=1.5),
        Sharpness(pixels=pixels, factor=2.0),
        Rotate(pixels=pixels, degrees=-10.0),
        Rotate(pixels=pixels, degrees=10.0),
    ]


def build_policy(
    name: str,
    input_size: tuple[int, int, int],
    pixels: Pixels | None = None,
    *,
    seed: int = 0,
) -> list[Augmentation]:
    """The augmentations of policy ``name`` for a model with ``input_size`` ``(C, H, W)``.

    Args:
        name: a registered policy (``POLICIES.names()``).
        input_size: ``(C, H, W)`` the model takes.
        pixels: the preprocessing's normalisation (default: none, the input is the [0, 1] image).
        seed: seed of the randomly placed crops.

    Raises:
        ValueError: unknown policy (the message lists the known ones), or a policy that repeats a view.
    """
    builder = POLICIES.get(name)
    augs = builder(tuple(input_size), pixels or Pixels(), seed)  # type: ignore[arg-type]
    seen = [a.name for a in augs]
    if len(set(seen)) != len(seen):  # pragma: no cover - a broken builder
        raise ArgumentError(f"policy {name!r} repeats a view: {seen}")
    return augs
