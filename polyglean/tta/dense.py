"""Image-space test-time augmentation for segmentation: horizontal flip and multi-scale, undone on the output maps.

Each view is made, predicted, brought back to the input grid (un-flipped; resized back bilinearly) and the views'
softmax probabilities are averaged (the usual segmentation recipe, scales 0.75, 1, 1.25, 1.5). A view's size is
rounded to a multiple of ``multiple`` (a model's total reduction, e.g. 8 for ESPNet, whose decoder needs it).

The predictor may itself be a phase search (:class:`~polyglean.search.dense.DenseSearch`), which combines both.

Example:
    >>> probs = tta_maps(model, x, scales=(0.75, 1.0, 1.25, 1.5), flip=True, multiple=8)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from polyglean.errors import ArgumentError

__all__ = ["MULTI_SCALES", "tta_cost", "tta_maps", "tta_views"]

MULTI_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)


def tta_views(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
    """The ``(scale, flipped)`` views of a policy, the identity first."""
    if not scales or any(s <= 0 for s in scales):
        raise ArgumentError(f"scales must be positive, got {list(scales)}")
    views = [(float(s), f) for s in scales for f in ((False, True) if flip else (False,))]
    return sorted(views, key=lambda v: (v != (1.0, False), v))


def tta_cost(scales: Sequence[float], flip: bool, size: tuple[int, int], multiple: int = 1) -> float:
    """Forward equivalents of a policy (pixels processed over those of the input)."""
    h, w = size
    return sum(_size(h, w, s, multiple)[0] * _size(h, w, s, multiple)[1] for s, _ in tta_views(scales, flip)) / (h * w)


def _size(h: int, w: int, scale: float, multiple: int) -> tuple[int, int]:
    def one(v: int) -> int:
        return max(multiple, int(round(v * scale / multiple)) * multiple)
    return one(h), one(w)


@torch.no_grad()
def tta_maps(predict: Callable[[Tensor], Tensor], x: Tensor, *, scales: Sequence[float] = (1.0,), flip: bool = False,
             multiple: int = 1) -> Tensor:
    """Mean softmax probabilities over the views of ``x``.

    Args:
        predict: Maps a batch ``(N, C, h, w)`` to logits ``(N, K, h, w)``.
        x: The input batch.
        scales: Resize factors.
        flip: Add the horizontally flipped view of each scale.
        multiple: Round each view's size to a multiple of this.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, K, H, W)`` probabilities
    """
    h, w = x.shape[-2:]
    total: Tensor | None = None
    views = tta_views(scales, flip)
    for scale, flipped in views:
        size = _size(h, w, scale, multiple)
        v = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flipped:
            v = v.flip(-1)
        out = predict(v)
        if flipped:
            out = out.flip(-1)
        if tuple(out.shape[-2:]) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        p = out.float().softmax(1)
        total = p if total is None else total + p
    assert total is not None
    return total / len(views)
