"""PASA 2-D against a naive per-pixel loop with per-group softmax weights."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from polyglean.layers import PASA2d, pasa2d, pasa_weights
from tests.layers.battery import LayerBattery, LayerCase

SETTINGS = settings(max_examples=20, deadline=None, database=None, derandomize=True)


def _reflect(i: int, size: int) -> int:
    if i < 0:
        return -i
    if i >= size:
        return 2 * (size - 1) - i
    return i


def reference_pasa(x: torch.Tensor, logits: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """Per pixel: softmax over each group's k*k logits, weighted sum of the reflect-padded k x k neighbourhood."""
    n_, c_, h, w = x.shape
    groups = logits.shape[1] // (k * k)
    per_group = c_ // groups
    before = (k - 1) // 2
    xd, ld = x.double().tolist(), logits.double().tolist()
    oh, ow = -(-h // s), -(-w // s)
    y = torch.zeros(n_, c_, oh, ow, dtype=torch.float64)
    for n, i, j in itertools.product(range(n_), range(oh), range(ow)):
        r, q = i * s, j * s
        for g in range(groups):
            z = [ld[n][g * k * k + t][r][q] for t in range(k * k)]
            m = max(z)
            e = [math.exp(v - m) for v in z]
            wts = [v / sum(e) for v in e]
            for c in range(g * per_group, (g + 1) * per_group):
                total = 0.0
                for u, v in itertools.product(range(k), range(k)):
                    total += wts[u * k + v] * xd[n][c][_reflect(r - before + u, h)][_reflect(q - before + v, w)]
                y[n, c, i, j] = total
    return y.to(x.dtype)


def _random(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


@st.composite
def config(draw):
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    channels = groups * draw(st.integers(1, 2))
    h = draw(st.integers(k // 2 + 1, 7))
    w = draw(st.integers(k // 2 + 1, 7))
    return (h, w), k, s, groups, channels, draw(st.integers(0, 2**16))


class TestPASA2d:
    @pytest.mark.parametrize(("shape", "k", "s", "groups"), [((7, 8), 3, 2, 2), ((9, 9), 5, 3, 1), ((6, 5), 2, 2, 4),
                                                              ((5, 5), 1, 2, 2), ((4, 6), 3, 1, 4)])
    def test_matches_reference(self, shape, k, s, groups):
        x = _random((2, 4) + shape, seed=1)
        logits = _random((2, groups * k * k) + shape, seed=2, scale=2.0)
        y = pasa2d(x, logits, k, s)
        assert y.shape == (2, 4, -(-shape[0] // s), -(-shape[1] // s))
        torch.testing.assert_close(y, reference_pasa(x, logits, k, s), rtol=1e-12, atol=1e-12)

    @SETTINGS
    @given(config())
    def test_matches_reference_property(self, cfg):
        size, k, s, groups, channels, seed = cfg
        x = _random((1, channels) + size, seed)
        logits = _random((1, groups * k * k) + size, seed + 1, scale=2.0)
        torch.testing.assert_close(pasa2d(x, logits, k, s), reference_pasa(x, logits, k, s), rtol=1e-12, atol=1e-12)

    def test_equals_full_filter_then_slicing(self):
        x = _random((2, 6, 9, 8), seed=3)
        logits = _random((2, 3 * 9, 9, 8), seed=4)
        for s in (2, 3):
            torch.testing.assert_close(pasa2d(x, logits, 3, s), pasa2d(x, logits, 3, 1)[..., ::s, ::s],
                                       rtol=1e-12, atol=1e-12)

    def test_group_weights_sum_to_one(self):
        logits = _random((2, 3 * 9, 5, 5), seed=5, scale=5.0)
        weights = pasa_weights(logits, 3)
        assert weights.shape == (2, 3, 9, 5, 5)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=2), torch.ones(2, 3, 5, 5, dtype=torch.float64))
        # each group is normalised on its own: shifting one group's logits changes only that group
        shifted = logits.clone()
        shifted[:, :9] += 100.0
        assert torch.equal(pasa_weights(shifted, 3)[:, 1:], weights[:, 1:])

    def test_module_group_weights_sum_to_one(self):
        module = PASA2d(6, kernel_size=3, groups=3).double().eval()
        weights = pasa_weights(module.logits(_random((2, 6, 8, 8), seed=6)), 3)
        torch.testing.assert_close(weights.sum(dim=2), torch.ones(2, 3, 8, 8, dtype=torch.float64))

    def test_zero_logits_give_a_box_filter(self):
        x = _random((1, 2, 6, 6), seed=7)
        y = pasa2d(x, torch.zeros(1, 9, 6, 6, dtype=torch.float64), 3, 2)
        expected = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)[..., ::2, ::2]
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)

    def test_constant_input_is_preserved(self):
        x = torch.full((1, 4, 7, 7), -3.0, dtype=torch.float64)
        y = PASA2d(4, groups=2).double()(x)
        torch.testing.assert_close(y, torch.full_like(y, -3.0))

    @pytest.mark.parametrize("training", [True, False])
    def test_module_equals_function(self, training):
        module = PASA2d(4, kernel_size=3, stride=2, groups=2).train(training)
        x = torch.randn(2, 4, 9, 7)
        with torch.no_grad():
            expected = pasa2d(x, module.logits(x), 3, 2)
            assert torch.equal(module(x), expected)
        assert set(module.state_dict()) >= {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean"}
        assert module.conv.out_channels == 2 * 9

    def test_noncontiguous_logits(self):  # the battery checks non-contiguous input of the Module
        x = _random((2, 4, 7, 6), seed=8)
        logits = _random((2, 18, 6, 7), seed=9).transpose(-1, -2)
        torch.testing.assert_close(pasa2d(x, logits), pasa2d(x, logits.contiguous()), rtol=1e-12, atol=1e-12)

    def test_gradcheck_logits(self):  # the battery differentiates through the Module's predictor
        x = _random((1, 2, 5, 4), seed=10).requires_grad_(True)
        logits = _random((1, 2 * 4, 5, 4), seed=11).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: pasa2d(a, b, 2, 2), (x, logits))

    def test_repr(self):
        text = repr(PASA2d(8, kernel_size=5, stride=2, groups=4))
        assert "8, kernel_size=5, stride=2, groups=4" in text and "(conv): Conv2d(8, 100" in text and "(bn)" in text

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match=r"groups=3 must divide in_channels=8"):
            PASA2d(8, groups=3)
        with pytest.raises(ValueError, match="kernel_size must be >= 1, got 0"):
            PASA2d(8, kernel_size=0)
        with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
            PASA2d(8, stride=0)
        with pytest.raises(TypeError, match="groups must be an int"):
            PASA2d(8, groups=2.0)
        x = torch.randn(1, 4, 6, 6)
        with pytest.raises(ValueError, match="groups=3 .* does not divide the 4 input channels"):
            pasa2d(x, torch.zeros(1, 27, 6, 6))
        with pytest.raises(ValueError, match="not a positive multiple of kernel_size"):
            pasa2d(x, torch.zeros(1, 10, 6, 6))
        with pytest.raises(ValueError, match="do not match input"):
            pasa2d(x, torch.zeros(1, 18, 5, 6))
        with pytest.raises(ValueError, match="reflect padding by 2 needs spatial size > 2"):
            pasa2d(torch.randn(1, 4, 2, 6), torch.zeros(1, 50, 2, 6), 5)


class TestPASA2dBattery(LayerBattery):
    case = LayerCase(
        layer="pasa", make=lambda: PASA2d(4, kernel_size=3, stride=2, groups=2),
        function=lambda m, x: pasa2d(x, m.logits(x), m.kernel_size, m.stride),
        reference=lambda m, x: reference_pasa(x, m.logits(x), m.kernel_size, m.stride),
        shapes=[((2, 4, 9, 7), (2, 4, 5, 4)), ((1, 4, 8, 8), (1, 4, 4, 4))], grad_shape=(1, 4, 5, 4),
        bad_inputs=[(torch.randn(1, 3, 6, 6), ValueError, "expects 4 input channels"),
                    (torch.randn(1, 4, 1, 6), ValueError, "reflect padding by 1 needs spatial size > 1")],
    )
