"""Preprocessing that turns a PIL image into the float tensor a model expects.

:class:`Preprocess` wraps a transform together with what it produces (``input_size``), its normalisation
(``mean``/``std``, in units of the [0, 1] image) and a one-line description, so callers can report and check it.

Example:
    >>> pre = Preprocess.resize_crop(resize=256, crop=224)
    >>> pre.input_size
    (3, 224, 224)
    >>> pre.description
    'resize 256 bilinear, centre-crop 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from polyglean.errors import ArgumentError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocess"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@dataclass(frozen=True)
class Preprocess:
    """A callable from a PIL image to a normalised ``(C, H, W)`` float tensor.

    Build one with :meth:`resize_crop` or :meth:`from_timm` rather than by hand.

    Args:
        transform: maps an RGB PIL image to a tensor of shape ``input_size``.
        input_size: ``(C, H, W)`` of the output.
        mean: per-channel mean subtracted, in units of the [0, 1] image.
        std: per-channel divisor, in units of the [0, 1] image.
        description: one line saying what ``transform`` does.

    Shape:
        - output: ``input_size``
    """

    transform: Callable[[Image.Image], torch.Tensor] = field(repr=False, compare=False)
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str = ""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Convert ``image`` to RGB and apply the transform.

        Args:
            image: a PIL image in any mode.

        Returns:
            The float tensor of shape ``input_size``.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"Preprocess expects a PIL image, got {type(image).__name__}")
        return self.transform(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"Preprocess({self.description}; input_size={self.input_size})"

    @classmethod
    def resize_crop(
        cls,
        *,
        resize: int | None,
        crop: int | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> Preprocess:
        """Resize the shorter side, centre-crop a square, scale to [0, 1] and normalise.

        Args:
            resize: target length of the shorter side, or None to keep the size.
            crop: side of the centre crop, or None for no crop (then ``input_size`` has H = W = ``resize``,
                assuming square images).
            mean: per-channel mean, in units of the [0, 1] image.
            std: per-channel divisor, in units of the [0, 1] image.
            interpolation: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.

        Raises:
            ValueError: unknown interpolation, non-positive sizes, or neither size given.
        """
        if interpolation not in _INTERPOLATIONS:
            raise ArgumentError(f"interpolation {interpolation!r} is not one of {sorted(_INTERPOLATIONS)}")
        side = crop if crop is not None else resize
        if side is None:
            raise ArgumentError("Preprocess.resize_crop needs resize or crop (or both)")
        if (resize is not None and resize <= 0) or side <= 0:
            raise ArgumentError(f"sizes must be positive, got resize={resize}, crop={crop}")
        steps: list[nn.Module] = []
        parts: list[str] = []
        if resize is not None:
            steps.append(T.Resize(resize, interpolation=_INTERPOLATIONS[interpolation], antialias=True))
            parts.append(f"resize {resize} {interpolation}")
        if crop is not None:
            steps.append(T.CenterCrop(crop))
            parts.append(f"centre-crop {crop}")
        steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
        parts.append(f"mean={_fmt(mean)}, std={_fmt(std)}")
        return cls(
            transform=T.Compose(steps),
            input_size=(len(mean), side, side),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            description=", ".join(parts),
        )

    @classmethod
    def from_timm(cls, model: nn.Module) -> Preprocess:
        """The evaluation preprocessing timm defines for ``model`` (``resolve_data_config`` + ``create_transform``).

        Args:
            model: a model created by ``timm.create_model``.
        """
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config({}, model=model)
        transform = create_transform(**config, is_training=False)
        c, h, w = (int(v) for v in config["input_size"])
        desc = (
            f"timm eval: {config.get('interpolation', '?')}, crop_pct={config.get('crop_pct', '?')}, "
            f"crop {h}x{w}, mean={_fmt(config['mean'])}, std={_fmt(config['std'])}"
        )
        return cls(
            transform=transform,
            input_size=(c, h, w),
            mean=tuple(float(m) for m in config["mean"]),
            std=tuple(float(s) for s in config["std"]),
            description=desc,
        )
