"""Semantic segmentation metrics: a confusion matrix over the whole set and what it gives.

- ``C[t, p]`` counts the pixels of true class ``t`` predicted as ``p``, over every pixel whose label is not the ignore
  index (the standard definition: one matrix for the set, not an average of per-image or per-batch scores). A last
  column counts predictions outside the classes (a void channel some models predict): misses of the true class,
  nobody's false positive.
- ``IoU_k = C_kk / (Σ_j C_kj + Σ_i C_ik − C_kk)``; mIoU = mean over the classes present in the labels or the
  predictions (a class absent from both has no IoU: NaN, left out of the mean).
- pixel accuracy = ``trace C / Σ C``; mean class accuracy = mean over classes present in the labels of
  ``C_kk / Σ_j C_kj``.
- boundary (trimap) scores: the same, restricted to pixels within ``k`` pixels (Chebyshev distance) of a label edge,
  where resolution effects show.
- pixels fixed / broken against a reference prediction.

Example:
    >>> import torch
    >>> target = torch.tensor([[0, 0, 1, 2]])
    >>> pred = torch.tensor([[0, 1, 1, 2]])
    >>> c = confusion_matrix(pred, target, 3)
    >>> round(segmentation_scores(c)["miou"], 2)
    66.67
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from polyglean.errors import ArgumentError
from polyglean.stats import Difference, paired_bootstrap

__all__ = ["DenseMeter", "boundary_band", "confusion_matrix", "miou_difference", "pixels_fixed_broken",
           "segmentation_scores"]


def _check_maps(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ArgumentError(f"prediction {tuple(pred.shape)} and label map {tuple(target.shape)} differ in shape")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None,
                     mask: Tensor | None = None) -> Tensor:
    """``C[t, p]``: pixels of true class ``t`` predicted as ``p`` (pixels labelled ``ignore_index`` left out).

    Column ``K`` counts predictions outside ``[0, K)`` (e.g. a void channel a model predicts): misses of the true
    class, nobody's false positive.

    Args:
        pred: Predicted class per pixel.
        target: True class per pixel.
        num_classes: ``K``.
        ignore_index: Label value to leave out.
        mask: Only pixels where it is true count (e.g. :func:`boundary_band`).

    Shape:
        - pred, target, mask: ``(..., H, W)``
        - output: ``(K, K + 1)`` int64
    """
    _check_maps(pred, target)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    if mask is not None:
        keep = keep & mask
    t, p = target[keep].long(), pred[keep].long()
    bad = (t < 0) | (t >= num_classes)
    if bool(bad.any()):
        raise ArgumentError(f"label value {int(t[bad][0])} outside the classes 0..{num_classes - 1} and not the "
                            f"ignore index {ignore_index}")
    p = torch.where((p >= 0) & (p < num_classes), p, torch.full_like(p, num_classes))
    counts = torch.bincount(t * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def segmentation_scores(conf: Tensor) -> dict[str, float | list[float]]:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy (all in percent) from a confusion matrix.

    Args:
        conf: ``(K, K)`` or ``(K, K + 1)`` (a last column of predictions outside the classes), rows the true
            classes (:func:`confusion_matrix`).

    Returns:
        ``miou``, ``per_class_iou`` (NaN for a class absent from labels and predictions), ``pixel_acc``,
        ``mean_class_acc``, ``pixels`` (counted).
    """
    c = conf.double()
    k = c.shape[0]
    tp = c[:, :k].diag()
    truth, predicted = c.sum(1), c[:, :k].sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = c.sum()
    present = truth > 0
    return {
        "miou": 100.0 * float(iou[~iou.isnan()].mean()) if bool((~iou.isnan()).any()) else float("nan"),
        "per_class_iou": [100.0 * v for v in iou.tolist()],
        "pixel_acc": 100.0 * float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_acc": 100.0 * float((tp[present] / truth[present]).mean()) if bool(present.any()) else float("nan"),
        "pixels": int(total),
    }


def boundary_band(target: Tensor, k: int) -> Tensor:
    """Pixels within ``k`` pixels (Chebyshev distance) of a label edge: a pixel whose right or lower neighbour has
    another label (void counts as a label) marks both as edge pixels; the band is the edge dilated by ``k``.

    Shape:
        - target: ``(N, H, W)`` or ``(H, W)``
        - output: bool, like ``target``
    """
    if k < 0:
        raise ArgumentError(f"boundary width k must be >= 0, got {k}")
    t = target if target.dim() == 3 else target[None]
    edge = torch.zeros_like(t, dtype=torch.bool)
    dx = t[:, :, 1:] != t[:, :, :-1]
    dy = t[:, 1:, :] != t[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    if k:
        edge = F.max_pool2d(edge[:, None].float(), 2 * k + 1, 1, k)[:, 0] > 0
    return edge if target.dim() == 3 else edge[0]


def pixels_fixed_broken(pred: Tensor, reference: Tensor, target: Tensor, ignore_index: int | None = None
                        ) -> tuple[int, int]:
    """Labelled pixels wrong under ``reference`` and right under ``pred`` (fixed), and the reverse (broken)."""
    _check_maps(pred, target)
    _check_maps(reference, target)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    right, was = (pred == target) & keep, (reference == target) & keep
    return int((right & ~was).sum()), int((~right & was).sum())


def _miou_of(conf: Tensor) -> Tensor:
    """mIoU (percent) of each summed confusion matrix ``(R, K, K)``."""
    c = conf.double()
    k = c.shape[-2]
    tp = torch.diagonal(c[..., :k], dim1=-2, dim2=-1)
    union = c.sum(-1) + c[..., :k].sum(-2) - tp
    iou = tp / union.clamp_min(1)
    present = union > 0
    return 100.0 * (iou * present).sum(-1) / present.sum(-1).clamp_min(1)


def miou_difference(conf_a: Tensor, conf_b: Tensor, *, resamples: int = 1000, seed: int = 0) -> Difference:
    """Paired bootstrap over images of mIoU(b) − mIoU(a), recomputing the set's confusion matrix per resample.

    Args:
        conf_a: Per-image confusion matrices of the reference ``(N, K, K)`` or ``(N, K, K + 1)``.
        conf_b: Those of the method, same images in the same order.
    """
    if conf_a.shape != conf_b.shape or conf_a.dim() != 3:
        raise ArgumentError(f"per-image confusion matrices must both be (N, K, K), got {tuple(conf_a.shape)} and "
                            f"{tuple(conf_b.shape)}")
    n = conf_a.shape[0]
    table = torch.cat([conf_a, conf_b]).double()

    def stat(index: Tensor) -> Tensor:  # (R, N) image indices (b's offset by N) -> (R,) mIoU of their sum
        return _miou_of(table[index.long()].sum(1))

    idx = torch.arange(n, dtype=torch.float64)
    return paired_bootstrap(idx, idx + n, stat, resamples=resamples, seed=seed)


@dataclass
class DenseMeter:
    """Accumulates per-image confusion matrices (overall and in boundary bands) for one prediction method.

    Args:
        num_classes: ``K``.
        ignore_index: Label value left out.
        bands: Boundary widths ``k`` to score as well.
    """

    num_classes: int
    ignore_index: int | None = None
    bands: tuple[int, ...] = (3,)
    per_image: list[Tensor] = field(default_factory=list)
    per_band: dict[int, Tensor] = field(default_factory=dict)
    per_interior: dict[int, Tensor] = field(default_factory=dict)
    fixed: int = 0
    broken: int = 0

    def update(self, pred: Tensor, target: Tensor, reference: Tensor | None = None) -> None:
        """Adds a batch of predictions ``(N, H, W)`` (and the reference's, for fixed/broken)."""
        _check_maps(pred, target)
        pred, target = pred.cpu(), target.cpu()
        for i in range(pred.shape[0]):
            self.per_image.append(confusion_matrix(pred[i], target[i], self.num_classes, self.ignore_index))
        for k in self.bands:
            band = boundary_band(target, k)
            conf = confusion_matrix(pred, target, self.num_classes, self.ignore_index, band)
            self.per_band[k] = self.per_band.get(k, torch.zeros_like(conf)) + conf
            conf = confusion_matrix(pred, target, self.num_classes, self.ignore_index, ~band)
            self.per_interior[k] = self.per_interior.get(k, torch.zeros_like(conf)) + conf
        if reference is not None:
            f, b = pixels_fixed_broken(pred, reference.cpu(), target, self.ignore_index)
            self.fixed += f
            self.broken += b

    @property
    def confusion(self) -> Tensor:
        """The set's confusion matrix ``(K, K + 1)``."""
        if not self.per_image:
            return torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.long)
        return torch.stack(self.per_image).sum(0)

    def scores(self) -> dict[str, float | list[float] | int]:
        """The set's scores, mIoU within / beyond ``k`` pixels of a label edge (``boundary_miou_k{k}``,
        ``interior_miou_k{k}``), and pixels fixed/broken."""
        out: dict[str, float | list[float] | int] = dict(segmentation_scores(self.confusion))
        for k, conf in self.per_band.items():
            out[f"boundary_miou_k{k}"] = segmentation_scores(conf)["miou"]
            out[f"interior_miou_k{k}"] = segmentation_scores(self.per_interior[k])["miou"]
        out["pixels_fixed"], out["pixels_broken"] = self.fixed, self.broken
        return out
