"""Segmentation metrics against a hand-computed confusion matrix, boundary bands, fixed/broken, the mIoU bootstrap."""

from __future__ import annotations

import math

import pytest
import torch

from polyglean.errors import ArgumentError
from polyglean.metrics_dense import (
    DenseMeter,
    boundary_band,
    confusion_matrix,
    miou_difference,
    pixels_fixed_broken,
    segmentation_scores,
)

# 3 classes, ignore index 9; a void channel prediction (3) on one labelled pixel
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 2, 2, 9],
                       [1, 1, 2, 9]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 2, 0, 2],
                     [1, 3, 2, 0]])


def test_confusion_matrix_by_hand() -> None:
    c = confusion_matrix(PRED, TARGET, 3, ignore_index=9)
    # rows: truth 0, 1, 2; columns: predicted 0, 1, 2, outside
    expect = torch.tensor([[2, 1, 0, 0],
                           [0, 3, 0, 1],
                           [1, 0, 2, 0]])
    assert torch.equal(c, expect)


def test_scores_by_hand() -> None:
    s = segmentation_scores(confusion_matrix(PRED, TARGET, 3, ignore_index=9))
    # IoU_0 = 2 / (3 + 3 - 2) = 1/2; IoU_1 = 3 / (4 + 4 - 3) = 3/5; IoU_2 = 2 / (3 + 2 - 2) = 2/3
    iou = [1 / 2, 3 / 5, 2 / 3]
    assert s["per_class_iou"] == pytest.approx([100 * v for v in iou])
    assert s["miou"] == pytest.approx(100 * sum(iou) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 7 / 10)
    assert s["mean_class_acc"] == pytest.approx(100 * (2 / 3 + 3 / 4 + 2 / 3) / 3)
    assert s["pixels"] == 10


def test_absent_class_is_left_out() -> None:
    s = segmentation_scores(confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 4))
    assert math.isnan(s["per_class_iou"][2]) and s["miou"] == 100.0


def test_out_of_range_label_is_an_error() -> None:
    with pytest.raises(ArgumentError, match="label value 5"):
        confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 5], [1, 1]]), 3, ignore_index=9)
    with pytest.raises(ArgumentError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 2), 3)


def test_boundary_band() -> None:
    t = torch.zeros(7, 7, dtype=torch.long)
    t[:, 4:] = 1
    assert boundary_band(t, 0)[0].tolist() == [False, False, False, True, True, False, False]
    assert boundary_band(t, 1)[0].tolist() == [False, False, True, True, True, True, False]
    assert boundary_band(t[None], 2).shape == (1, 7, 7)


def test_pixels_fixed_broken() -> None:
    ref = TARGET.clone()
    ref[0, 0] = 1  # wrong in the reference, right in ref-corrected prediction below
    pred = TARGET.clone()
    pred[0, 1] = 2  # broken
    pred[1, 3] = 0  # void label: not counted
    assert pixels_fixed_broken(pred, ref, TARGET, 9) == (1, 1)


def test_meter_and_bootstrap() -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 3, (6, 8, 8), generator=g)
    a = DenseMeter(3, None, (1,))
    b = DenseMeter(3, None, (1,))
    noisy = torch.where(torch.rand(6, 8, 8, generator=g) < 0.3, torch.randint(0, 3, (6, 8, 8), generator=g), targets)
    a.update(noisy, targets)
    b.update(targets, targets, noisy)
    assert b.scores()["miou"] == 100.0 and b.scores()["pixels_fixed"] > 0 and b.scores()["pixels_broken"] == 0
    sa = a.scores()
    assert sa["miou"] == pytest.approx(segmentation_scores(confusion_matrix(noisy, targets, 3))["miou"])
    assert "boundary_miou_k1" in sa and "interior_miou_k1" in sa
    d = miou_difference(torch.stack(a.per_image), torch.stack(b.per_image), resamples=200)
    assert d.delta == pytest.approx(100.0 - sa["miou"]) and d.low > 0
    same = miou_difference(torch.stack(a.per_image), torch.stack(a.per_image), resamples=50)
    assert same.delta == 0 and same.low == 0 and same.high == 0
