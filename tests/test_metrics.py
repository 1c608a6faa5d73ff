"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from polyglean.metrics import classification_metrics, expected_calibration_error, fixed_broken, topk_accuracy


def test_topk() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 5) == 1.0


def test_ece_by_hand() -> None:
    # two confident right answers (conf ~0.9), one confident wrong one: ECE = |acc - conf| per bin, weighted
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 1, 0])
    ece = expected_calibration_error(p.log(), labels, bins=15)
    expected = 3 / 4 * abs(2 / 3 - 0.9) + 1 / 4 * abs(1 - 0.6)
    assert ece == pytest.approx(expected, abs=1e-6)


def test_fixed_broken_and_nll() -> None:
    labels = torch.tensor([0, 1, 1])
    before = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    after = torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    assert fixed_broken(after, before, labels) == (1, 1)
    m = classification_metrics(after, labels, before)
    assert m["top1"] == pytest.approx(200 / 3) and m["fixed"] == 1 and m["broken"] == 1
    nll = (2 * math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 3
    assert m["nll"] == pytest.approx(nll, rel=1e-5)


# ------------------------------------------------------------------------------------------- shift consistency
from torch import nn  # noqa: E402

from polyglean.metrics import SHIFT_PROTOCOLS, crop_at, shift_agreement, shift_pairs, translate  # noqa: E402


def _centred_images(n: int, size: int, margin: int, seed: int = 0) -> torch.Tensor:
    """Random content with a zero border of ``margin`` pixels, so shifts up to ``margin`` lose nothing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    x[..., margin:size - margin, margin:size - margin] = torch.randn(n, 3, size - 2 * margin, size - 2 * margin,
                                                                     generator=g)
    return x


def _pooled_model() -> nn.Module:
    """1x1 conv + global average pooling: its prediction does not depend on where the content is."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 10, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def _positional_model(size: int) -> nn.Module:
    """A linear layer on the flattened image: every pixel position has its own weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 10)).eval()


def test_translate_by_hand() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1)
    out = translate(x, torch.tensor([[1, -2], [0, 0]]), fill=[-1.0])
    expected = torch.full((4, 4), -1.0)
    expected[1:, :2] = x[0, 0, :3, 2:]
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out[1], x[1])


def test_crop_at_by_hand() -> None:
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    assert torch.equal(crop_at(x, torch.tensor([[2, 1]]), (3, 4))[0, 0], x[0, 0, 2:5, 1:5])
    with pytest.raises(ValueError, match="reaches past"):
        crop_at(x, torch.tensor([[4, 0]]), (3, 3))


def test_pairs_are_seeded_and_in_range() -> None:
    pairs = shift_pairs(2000, "shift", seed=3)
    assert pairs.shape == (2000, 2, 2) and int(pairs.min()) == -4 and int(pairs.max()) == 4
    assert torch.equal(pairs, shift_pairs(2000, "shift", seed=3))
    assert not torch.equal(pairs, shift_pairs(2000, "shift", seed=4))
    assert torch.equal(shift_pairs(10, seed=3), pairs[:10])  # image i's pair does not depend on n
    crops = shift_pairs(2000, "crop")
    assert int(crops.min()) == 0 and int(crops.max()) == 31
    with pytest.raises(ValueError, match="unknown shift protocol 'rotate'; choose one of: shift, crop"):
        shift_pairs(3, "rotate")
    assert set(SHIFT_PROTOCOLS) == {"shift", "crop"}


def test_shift_invariant_model_is_fully_consistent() -> None:
    x = _centred_images(64, 16, 4)
    agree = shift_agreement(_pooled_model(), x, shift_pairs(64, "shift"))
    assert agree.dtype == torch.bool and agree.shape == (64,) and bool(agree.all())


def test_position_dependent_model_is_less_consistent() -> None:
    x = _centred_images(64, 16, 4)
    pairs = shift_pairs(64, "shift")
    agree = shift_agreement(_positional_model(16), x, pairs)
    assert 0 < 100.0 * agree.float().mean() < 90
    same = pairs[:, 0].eq(pairs[:, 1]).all(-1)  # identical views always agree
    assert bool(agree[same].all())


def test_crop_protocol() -> None:
    x = _centred_images(32, 40, 16)  # content in the central 8x8: inside every 32x32 crop at offsets < 8
    pairs = shift_pairs(32, "crop").clamp(max=8)
    assert bool(shift_agreement(_pooled_model(), x, pairs, protocol="crop", crop_size=(32, 32)).all())
    agree = shift_agreement(_positional_model(32), x, pairs, protocol="crop", crop_size=(32, 32))
    assert not bool(agree.all())
    with pytest.raises(ValueError, match="needs crop_size"):
        shift_agreement(_pooled_model(), x, pairs, protocol="crop")
