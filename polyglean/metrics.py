"""Classification metrics: top-k accuracy, NLL, expected calibration error, fixed/broken counts, shift consistency."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SHIFT_PROTOCOLS",
    "ShiftProtocol",
    "classification_metrics",
    "crop_at",
    "expected_calibration_error",
    "fixed_broken",
    "shift_agreement",
    "shift_pairs",
    "topk_accuracy",
    "translate",
]


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the ``k`` highest logits.

    Shape:
        - logits: ``(N, K)``
        - labels: ``(N,)``
    """
    k = min(k, logits.shape[-1])
    if k == 1:  # argmax, as the per-image outcomes: low precision (bf16) gives ties, which topk breaks otherwise
        return (logits.argmax(-1) == labels).float().mean().item()
    return (logits.topk(k, -1).indices == labels[:, None]).any(-1).float().mean().item()


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins: ``Σ_b |B_b|/N · |acc(B_b) - conf(B_b)|``."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1, device=conf.device)
    ece = torch.zeros((), device=conf.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return ece.item()


def fixed_broken(logits: Tensor, reference: Tensor, labels: Tensor) -> tuple[int, int]:
    """Images wrong under ``reference`` and right under ``logits`` (fixed), and the reverse (broken)."""
    right = logits.argmax(-1) == labels
    was_right = reference.argmax(-1) == labels
    return int((right & ~was_right).sum()), int((~right & was_right).sum())


def classification_metrics(logits: Tensor, labels: Tensor, reference: Tensor | None = None) -> dict[str, float]:
    """top1, top5 (percent), nll, ece (percent) and, against ``reference``, fixed and broken."""
    out = {
        "top1": 100.0 * topk_accuracy(logits, labels, 1),
        "top5": 100.0 * topk_accuracy(logits, labels, 5),
        "nll": F.cross_entropy(logits.float(), labels).item(),
        "ece": 100.0 * expected_calibration_error(logits, labels),
    }
    if reference is not None:
        out["fixed"], out["broken"] = fixed_broken(logits, reference, labels)
    return out


# ------------------------------------------------------------------------------------------- shift consistency
def translate(x: Tensor, shifts: Tensor, fill: Sequence[float] | Tensor | None = None) -> Tensor:
    """Moves image ``i`` down by ``shifts[i, 0]`` and right by ``shifts[i, 1]`` pixels (negative: up/left), same size.

    Args:
        x: Images.
        shifts: Integer offsets per image.
        fill: Per-channel value of the uncovered border (default 0); pass ``-mean / std`` to pad a normalised
            image with black, as CIFAR's zero padding does before normalisation.

    Shape:
        - x: ``(N, C, H, W)``
        - shifts: ``(N, 2)``
        - output: ``(N, C, H, W)``
    """
    n, c, h, w = x.shape
    m = int(shifts.abs().max()) if shifts.numel() else 0
    base = torch.zeros(c, dtype=x.dtype, device=x.device) if fill is None else torch.as_tensor(
        fill, dtype=x.dtype, device=x.device)
    padded = base.view(1, c, 1, 1).expand(n, c, h + 2 * m, w + 2 * m).clone()
    padded[..., m:m + h, m:m + w] = x
    return torch.stack([padded[i, :, m - int(dy):m - int(dy) + h, m - int(dx):m - int(dx) + w]
                        for i, (dy, dx) in enumerate(shifts.tolist())])


def crop_at(x: Tensor, offsets: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop ``size`` of image ``i`` whose top-left corner is ``offsets[i]``.

    Raises:
        ValueError: a crop reaches past the image.

    Shape:
        - x: ``(N, C, H, W)``
        - offsets: ``(N, 2)``
        - output: ``(N, C, *size)``
    """
    h, w = size
    rows = offsets.tolist()
    if any(oy < 0 or ox < 0 or oy + h > x.shape[-2] or ox + w > x.shape[-1] for oy, ox in rows):
        raise ValueError(f"a {h}x{w} crop at offsets {rows} reaches past images of size {tuple(x.shape[-2:])}")
    return torch.stack([x[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(rows)])


@dataclass(frozen=True)
class ShiftProtocol:
    """How shift consistency draws and applies its two random offsets per image.

    Attributes:
        low: Smallest offset (inclusive), per axis.
        high: Largest offset (inclusive), per axis.
        view: ``view(x, offsets, crop_size, fill)``: the shifted view of every image, ``offsets`` ``(N, 2)``.
    """

    low: int
    high: int
    view: Callable[[Tensor, Tensor, tuple[int, int] | None, Sequence[float] | Tensor | None], Tensor]


def _crop_view(x: Tensor, offsets: Tensor, crop_size: tuple[int, int] | None,
               fill: Sequence[float] | Tensor | None) -> Tensor:
    if crop_size is None:
        raise ValueError("shift protocol 'crop' needs crop_size=(H, W)")
    return crop_at(x, offsets, crop_size)


SHIFT_PROTOCOLS: dict[str, ShiftProtocol] = {
    "shift": ShiftProtocol(-4, 4, lambda x, offsets, crop_size, fill: translate(x, offsets, fill)),
    "crop": ShiftProtocol(0, 31, _crop_view),
}
"""Zhang 2019: ``shift``, CIFAR-sized inputs translated by ``[-4, 4]`` pixels per axis with zero padding;
``crop``, 224 crops of a 256 image at offsets ``[0, 32)``."""


def _protocol(name: str) -> ShiftProtocol:
    try:
        return SHIFT_PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown shift protocol {name!r}; choose one of: {', '.join(SHIFT_PROTOCOLS)}") from None


def shift_pairs(n: int, protocol: str = "shift", *, seed: int = 0) -> Tensor:
    """Two random offsets ``(dy, dx)`` per image, uniform over the protocol's range, reproducible from ``seed``.

    Drawn for all ``n`` images at once, so image ``i`` gets the same pair whatever the batch size.

    Raises:
        ValueError: unknown ``protocol`` (the message lists the known ones) or ``n < 0``.

    Shape:
        - output: ``(n, 2, 2)``: ``[i, view] = (dy, dx)``, ``torch.long``
    """
    spec = _protocol(protocol)
    if n < 0:
        raise ValueError(f"number of images must be >= 0, got {n}")
    return torch.randint(spec.low, spec.high + 1, (n, 2, 2), generator=torch.Generator().manual_seed(seed))


def shift_agreement(predict: Callable[[Tensor], Tensor], x: Tensor, pairs: Tensor, *, protocol: str = "shift",
                    crop_size: tuple[int, int] | None = None, fill: Sequence[float] | Tensor | None = None
                    ) -> Tensor:
    """Whether ``predict`` gives the same class for two shifted views of each image (Zhang 2019).

    Shift consistency is the share of ``True`` (in percent) over a data set.

    Args:
        predict: Maps a batch of images to logits ``(N, K)``.
        x: The images: the model's input size for ``shift``, the larger image (e.g. 256x256) for ``crop``.
        pairs: Two offsets per image, from :func:`shift_pairs`.
        protocol: A name of :data:`SHIFT_PROTOCOLS`.
        crop_size: ``(H, W)`` of the crops (``crop`` only).
        fill: Border value per channel for ``shift`` (see :func:`translate`).

    Returns:
        Agreement per image.

    Raises:
        ValueError: unknown protocol, or ``crop`` without ``crop_size``.

    Shape:
        - x: ``(N, C, H, W)``
        - pairs: ``(N, 2, 2)``
        - output: ``(N,)``, ``torch.bool``

    Example:
        >>> pool = lambda t: t.mean((2, 3))  # global average pooling: shift-invariant on zero-bordered images
        >>> x = torch.zeros(2, 3, 16, 16)
        >>> x[:, :, 6:10, 6:10] = torch.randn(2, 3, 4, 4)
        >>> shift_agreement(pool, x, shift_pairs(2)).tolist()
        [True, True]
    """
    spec = _protocol(protocol)
    views = [spec.view(x, pairs[:, k], crop_size, fill) for k in (0, 1)]
    predictions = predict(torch.cat(views)).argmax(-1)
    return predictions[: len(x)] == predictions[len(x):]
