"""Deterministic image-space augmentations on preprocessed batches, at the model's input size.

Every augmentation is a small named object: ``aug(x)`` maps a normalised batch ``(N, C, H, W)`` to one of the same
shape, the same way every time (a "random" crop is an ordinary crop whose offset was drawn once, from a seed, when
the policy was built). Names are unique descriptions of what an augmentation does, so two equal names mean the same
view (the CLI caches per-view predictions under them).

Geometry works on the input the model gets, already resized and cropped, and always returns the input size:

- :class:`PadCrop`: pad by ``pad`` pixels on every side and take the ``H x W`` window at ``(top, left)`` of the
  padded image: a translation with the border filled. This is CIFAR's crop (the ResNets were trained on 32x32
  crops of the image zero-padded by 4) and the one the built-in policies use for small inputs (side <= 64).
- :class:`ResizedCrop`: take a window of a fraction of the input at a relative position and resize it back to the
  input size (bilinear). For ImageNet-sized inputs a crop of 0.875 of the 224 input stands for the usual crop of 224
  from the 256 image, resampled once more; the built-in policies use it for inputs larger than 64.
- :class:`Scale`: zoom in (``factor > 1``, a centred :class:`ResizedCrop` of ``1 / factor``) or out (``factor < 1``,
  resize down and pad back with the fill).

Photometric ops (brightness, contrast, saturation, sharpness, autocontrast) and small rotations work on the
un-normalised image in [0, 1]: they take the preprocessing's ``mean``/``std`` (a :class:`Pixels`) to get there and
back. The border fill of geometric ops is a pixel value in [0, 1] (default 0, black, as in CIFAR training).

:func:`compose` chains augmentations, applied left to right; its name joins theirs with ``+``.

Example:
    >>> x = torch.randn(2, 3, 32, 32)
    >>> aug = compose(HFlip(), PadCrop(0, 8, pad=4))
    >>> aug.name
    'hflip+padcrop(0,8;4)'
    >>> aug(x).shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor

from polyglean.errors import ArgumentError

__all__ = [
    "Augmentation",
    "Brightness",
    "Compose",
    "Contrast",
    "HFlip",
    "Identity",
    "PadCrop",
    "Pixels",
    "ResizedCrop",
    "Rotate",
    "Saturation",
    "Scale",
    "Sharpness",
    "AutoContrast",
    "compose",
]


def _num(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class Pixels:
    """The normalisation of a preprocessing: ``x = (pixels - mean) / std`` with pixels in [0, 1].

    Args:
        mean: per-channel mean, in units of the [0, 1] image.
        std: per-channel divisor, in units of the [0, 1] image.
    """

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] != len(self.mean):
            raise ArgumentError(f"{len(self.mean)}-channel normalisation applied to a batch with {x.shape[1]} channels")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return mean, std

    def to_unit(self, x: Tensor) -> Tensor:
        """Normalised batch to pixels in [0, 1] (not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean

    def from_unit(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] to the normalised batch."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def fill(self, value: float, x: Tensor) -> Tensor:
        """The normalised value of the grey level ``value`` per channel, shaped ``(1, C, 1, 1)``."""
        mean, std = self._stats(x)
        return (value - mean) / std


def _check(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ArgumentError(f"augmentations take a batch (N, C, H, W), got {shape}")
    return x


class Augmentation:
    """A deterministic, named transform of a normalised batch that keeps its shape.

    Subclasses implement :meth:`apply`; ``__call__`` checks the input and the output shape.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, C, H, W)``
    """

    @property
    def name(self) -> str:
        raise NotImplementedError

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        out = self.apply(_check(x))
        if out.shape != x.shape:  # pragma: no cover - a broken subclass
            raise RuntimeError(f"augmentation {self.name} changed the shape {tuple(x.shape)} -> {tuple(out.shape)}")
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


@dataclass(frozen=True, repr=False)
class Identity(Augmentation):
    """The input itself."""

    @property
    def name(self) -> str:
        return "identity"

    def apply(self, x: Tensor) -> Tensor:
        return x


@dataclass(frozen=True, repr=False)
class HFlip(Augmentation):
    """Mirror left-right."""

    @property
    def name(self) -> str:
        return "hflip"

    def apply(self, x: Tensor) -> Tensor:
        return x.flip(-1)


@dataclass(frozen=True, repr=False)
class PadCrop(Augmentation):
    """Pad by ``pad`` on every side with ``fill``, then keep the window of the input size at ``(top, left)``.

    ``top = left = pad`` is the input itself; the content moves by ``(pad - top, pad - left)`` pixels.

    Args:
        top: first row of the window in the padded image, ``0 <= top <= 2 * pad``.
        left: first column, likewise.
        pad: border added on every side.
        fill: grey level of the border in [0, 1] (0: black).
        pixels: the preprocessing's normalisation, to put ``fill`` in its units.
    """

    top: int
    left: int
    pad: int
    fill: float = 0.0
    pixels: Pixels = field(default_factory=Pixels)

    def __post_init__(self) -> None:
        if self.pad < 0 or not (0 <= self.top <= 2 * self.pad and 0 <= self.left <= 2 * self.pad):
            raise ArgumentError(f"PadCrop window ({self.top}, {self.left}) out of range for pad {self.pad}: "
                             f"need 0 <= top, left <= {2 * self.pad}")

    @property
    def name(self) -> str:
        return f"padcrop({self.top},{self.left};{self.pad})"

    def apply(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.pad
        padded = self.pixels.fill(self.fill, x).expand(x.shape[0], -1, h + 2 * p, w + 2 * p).clone()
        padded[..., p:p + h, p:p + w] = x
        return padded[..., self.top:self.top + h, self.left:self.left + w]


@dataclass(frozen=True, repr=False)
class ResizedCrop(Augmentation):
    """The window of ``size`` times the input side at relative position ``(fy, fx)``, resized back (bilinear).

    Args:
        size: side of the window as a fraction of the input side, ``0 < size <= 1``.
        fy: vertical position, 0 = top edge, 0.5 = centre, 1 = bottom edge.
        fx: horizontal position, likewise.
    """

    size: float
    fy: float = 0.5
    fx: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.size <= 1:
            raise ArgumentError(f"ResizedCrop size must be in (0, 1], got {self.size}")
        if not (0 <= self.fy <= 1 and 0 <= self.fx <= 1):
            raise ArgumentError(f"ResizedCrop position ({self.fy}, {self.fx}) must lie in [0, 1]")

    @property
    def name(self) -> str:
        return f"crop({_num(self.size)}@{_num(self.fy)},{_num(self.fx)})"

    def window(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the window in an ``h x w`` input."""
        ch, cw = max(1, round(self.size * h)), max(1, round(self.size * w))
        return round(self.fy * (h - ch)), round(self.fx * (w - cw)), ch, cw

    def apply(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        top, left, ch, cw = self.window(h, w)
        crop = x[..., top:top + ch, left:left + cw]
        if (ch, cw) == (h, w):
            return crop
        return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


@dataclass(frozen=True, repr=False)
class Scale(Augmentation):
    """Zoom about the centre by ``factor``: in (> 1) by a centred crop resized up, out (< 1) by resizing down
    (antialiased) and padding back with ``fill``.

    Args:
        factor: the zoom, > 0.
        fill: grey level of the border when zooming out, in [0, 1].
        pixels: the preprocessing's normalisation.
    """

    factor: float
    fill: float = 0.0
    pixels: Pixels = field(default_factory=Pixels)

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ArgumentError(f"Scale factor must be > 0, got {self.factor}")

    @property
    def name(self) -> str:
        return f"scale({_num(self.factor)})"

    def apply(self, x: Tensor) -> Tensor:
        if self.factor >= 1:
            return ResizedCrop(1 / self.factor).apply(x)
        h, w = x.shape[-2:]
        sh, sw = max(1, round(h * self.factor)), max(1, round(w * self.factor))
        small = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
        out = self.pixels.fill(self.fill, x).expand(x.shape[0], -1, h, w).clone()
        top, left = (h - sh) // 2, (w - sw) // 2
        out[..., top:top + sh, left:left + sw] = small
        return out


@dataclass(frozen=True, repr=False)
class _PixelOp(Augmentation):
    """An op on the pixels in [0, 1] (colour ops, rotation), normalised again afterwards."""

    pixels: Pixels = field(default_factory=Pixels)

    def op(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(self, x: Tensor) -> Tensor:
        unit = self.pixels.to_unit(x).clamp(0, 1)
        return self.pixels.from_unit(self.op(unit))


@dataclass(frozen=True, repr=False)
class Brightness(_PixelOp):
    """Multiply the pixels by ``factor`` (torchvision ``adjust_brightness``)."""

    factor: float = 1.0

    @property
    def name(self) -> str:
        return f"brightness({_num(self.factor)})"

    def op(self, x: Tensor) -> Tensor:
        return TF.adjust_brightness(x, self.factor)


@dataclass(frozen=True, repr=False)
class Contrast(_PixelOp):
    """Blend with the mean grey level (torchvision ``adjust_contrast``)."""

    factor: float = 1.0

    @property
    def name(self) -> str:
        return f"contrast({_num(self.factor)})"

    def op(self, x: Tensor) -> Tensor:
        return TF.adjust_contrast(x, self.factor)


@dataclass(frozen=True, repr=False)
class Saturation(_PixelOp):
    """Blend with the grey image (torchvision ``adjust_saturation``)."""

    factor: float = 1.0

    @property
    def name(self) -> str:
        return f"saturation({_num(self.factor)})"

    def op(self, x: Tensor) -> Tensor:
        return TF.adjust_saturation(x, self.factor)


@dataclass(frozen=True, repr=False)
class Sharpness(_PixelOp):
    """Blend with a smoothed image (torchvision ``adjust_sharpness``)."""

    factor: float = 1.0

    @property
    def name(self) -> str:
        return f"sharpness({_num(self.factor)})"

    def op(self, x: Tensor) -> Tensor:
        return TF.adjust_sharpness(x, self.factor)


@dataclass(frozen=True, repr=False)
class AutoContrast(_PixelOp):
    """Stretch each channel to the full range (torchvision ``autocontrast``)."""

    @property
    def name(self) -> str:
        return "autocontrast"

    def op(self, x: Tensor) -> Tensor:
        return TF.autocontrast(x)


@dataclass(frozen=True, repr=False)
class Rotate(_PixelOp):
    """Rotate by ``degrees`` (counter-clockwise) about the centre, bilinear, the corners filled with ``fill``."""

    degrees: float = 0.0
    fill: float = 0.0

    @property
    def name(self) -> str:
        return f"rotate({_num(self.degrees)})"

    def op(self, x: Tensor) -> Tensor:
        return TF.rotate(x, self.degrees, interpolation=TF.InterpolationMode.BILINEAR, fill=[self.fill] * x.shape[1])


@dataclass(frozen=True, repr=False)
class Compose(Augmentation):
    """Augmentations applied one after the other, left to right.

    Args:
        ops: the augmentations, at least one.
    """

    ops: tuple[Augmentation, ...]

    def __post_init__(self) -> None:
        if not self.ops:
            raise ArgumentError("Compose needs at least one augmentation")
        bad = [op for op in self.ops if not isinstance(op, Augmentation)]
        if bad:
            raise TypeError(f"Compose takes Augmentation objects, got {bad[0]!r}")

    @property
    def name(self) -> str:
        return "+".join(op.name for op in self.ops)

    def apply(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op(x)
        return x


def compose(*ops: Augmentation) -> Augmentation:
    """``ops`` applied left to right, nested compositions flattened and identities dropped.

    Example:
        >>> compose(HFlip(), Identity(), Scale(1.2)).name
        'hflip+scale(1.2)'
    """
    flat: list[Augmentation] = []
    for op in ops:
        flat.extend(op.ops if isinstance(op, Compose) else [op])
    flat = [op for op in flat if not isinstance(op, Identity)]
    if not flat:
        return Identity()
    return flat[0] if len(flat) == 1 else Compose(tuple(flat))

