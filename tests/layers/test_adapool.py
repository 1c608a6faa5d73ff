"""adaPool 2-D (EDSCW + SoftPool blend) against a naive per-window Python loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from polyglean.layers import AdaPool2d, ada_pool2d, edscw_pool2d, soft_pool2d
from tests.layers.battery import LayerBattery, LayerCase

SETTINGS = settings(max_examples=20, deadline=None, database=None, derandomize=True)
EPS = 1e-12


def _out_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    out = math.floor((size + 2 * p - k + (s - 1 if ceil_mode else 0)) / s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def reference_pools(x: torch.Tensor, kernel, stride, padding, ceil_mode, similarity: str = "channel"):
    """(EDSCW, SoftPool) by loops.

    ``similarity="channel"`` (the authors' kernel): per channel, ``DSC = 2 a m / (a^2 + m^2)`` between an activation
    and its window's mean; ``"vector"``: DSC between each pixel's channel vector and the window's mean vector.
    """
    n_, c_, h, w = x.shape
    oh, ow = (_out_size(x.shape[2 + d], kernel[d], stride[d], padding[d], ceil_mode) for d in (0, 1))
    data = x.double().tolist()
    edscw = torch.empty(n_, c_, oh, ow, dtype=torch.float64)
    soft = torch.empty(n_, c_, oh, ow, dtype=torch.float64)
    for n, i, j in itertools.product(range(n_), range(oh), range(ow)):
        r0, c0 = i * stride[0] - padding[0], j * stride[1] - padding[1]
        pixels = [
            [data[n][c][r][q] for c in range(c_)]
            for r in range(max(r0, 0), min(r0 + kernel[0], h))
            for q in range(max(c0, 0), min(c0 + kernel[1], w))
        ]
        mean = [sum(p[c] for p in pixels) / len(pixels) for c in range(c_)]
        norm_mean = sum(m * m for m in mean)
        dsc = [2 * abs(sum(a * m for a, m in zip(p, mean))) / (sum(a * a for a in p) + norm_mean + EPS)
               for p in pixels]
        ew = [math.exp(d) for d in dsc]
        for c in range(c_):
            if similarity == "channel":
                ew = [math.exp(2 * p[c] * mean[c] / (p[c] * p[c] + mean[c] * mean[c] + EPS)) for p in pixels]
            edscw[n, c, i, j] = sum(e * p[c] for e, p in zip(ew, pixels)) / sum(ew)
            vals = [p[c] for p in pixels]
            m = max(vals)
            sw = [math.exp(v - m) for v in vals]
            soft[n, c, i, j] = sum(s * v for s, v in zip(sw, vals)) / sum(sw)
    return edscw, soft


def _random(shape, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


@st.composite
def config(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    sizes = tuple(draw(st.integers(max(1, k - 2 * p), 6)) for k, p in zip(kernel, padding))
    return sizes, kernel, stride, padding, draw(st.booleans()), draw(st.integers(0, 2**16)), draw(st.floats(0, 1))


class TestAdaPool2d:
    @pytest.mark.parametrize(
        ("size", "kernel", "stride", "padding", "ceil_mode"),
        [((6, 6), (2, 2), (2, 2), (0, 0), False), ((7, 5), (3, 3), (2, 2), (1, 1), True),
         ((5, 8), (3, 2), (1, 3), (1, 1), True)],
    )
    @pytest.mark.parametrize("similarity", ["channel", "vector"])
    def test_components_match_reference(self, size, kernel, stride, padding, ceil_mode, similarity):
        x = _random((2, 3) + size, seed=1)
        edscw, soft = reference_pools(x, kernel, stride, padding, ceil_mode, similarity)
        assert edscw.shape == F.avg_pool2d(x, kernel, stride, padding, ceil_mode).shape
        torch.testing.assert_close(edscw_pool2d(x, kernel, stride, padding, ceil_mode, similarity=similarity), edscw,
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(soft_pool2d(x, kernel, stride, padding, ceil_mode), soft, rtol=1e-10, atol=1e-10)

    @SETTINGS
    @given(config())
    def test_blend_matches_reference_property(self, cfg):
        sizes, kernel, stride, padding, ceil_mode, seed, beta = cfg
        x = _random((2, 3) + sizes, seed)
        for similarity in ("channel", "vector"):
            edscw, soft = reference_pools(x, kernel, stride, padding, ceil_mode, similarity)
            y = ada_pool2d(x, beta, kernel, stride, padding, ceil_mode, similarity=similarity)
            torch.testing.assert_close(y, beta * edscw + (1 - beta) * soft, rtol=1e-10, atol=1e-10)

    def test_beta_one_and_zero_give_the_components(self):
        x = _random((2, 4, 7, 7), seed=2)
        args = (3, 2, 1, True)
        assert torch.equal(ada_pool2d(x, 1.0, *args), edscw_pool2d(x, *args))
        assert torch.equal(ada_pool2d(x, 0.0, *args), soft_pool2d(x, *args))
        grid = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64).expand(4, 4)  # per-position beta
        y = ada_pool2d(x, grid, *args)
        assert torch.equal(y[..., 0::2], edscw_pool2d(x, *args)[..., 0::2])
        assert torch.equal(y[..., 1::2], soft_pool2d(x, *args)[..., 1::2])

    def test_edscw_vector_weights_shared_across_channels(self):
        x = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
        x[0, :, 0, 0] = torch.tensor([1.0, 1.0])
        x[0, :, 1, 1] = torch.tensor([1.0, -1.0])
        # mean = (0.5, 0); DSC = 2*0.5/(2+0.25) for both non-zero pixels, 0 for the two zero pixels
        d = 1.0 / 2.25
        wa = math.exp(d) / (2 * math.exp(d) + 2)
        expected = torch.tensor([wa * 2, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
        torch.testing.assert_close(edscw_pool2d(x, 2, similarity="vector"), expected, rtol=1e-12, atol=1e-12)

    def test_edscw_channel_weights_per_channel(self):
        x = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
        x[0, :, 0, 0] = torch.tensor([1.0, 1.0])
        x[0, :, 1, 1] = torch.tensor([1.0, -1.0])
        # channel 0: mean 0.5; DSC = 2*1*0.5/(1+0.25) = 0.8 at the two ones, 0 at the zeros
        w0 = math.exp(0.8) / (2 * math.exp(0.8) + 2)
        # channel 1: mean 0; DSC = 0 everywhere, plain averaging: (1 - 1) / 4
        expected = torch.tensor([2 * w0, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
        torch.testing.assert_close(edscw_pool2d(x, 2), expected, rtol=1e-12, atol=1e-12)
        # a channel's result depends on that channel only (the vector form mixes them)
        y = torch.cat([x[:, :1], 50 * x[:, 1:]], dim=1)
        assert torch.equal(edscw_pool2d(y, 2)[:, :1], edscw_pool2d(x[:, :1], 2))
        assert not torch.equal(edscw_pool2d(y, 2, similarity="vector")[:, :1],
                               edscw_pool2d(x, 2, similarity="vector")[:, :1])

    def test_similarity_option(self):
        x = _random((2, 3, 6, 6), seed=9)
        module = AdaPool2d(2, similarity="vector")
        assert torch.equal(module(x), ada_pool2d(x, module.beta, 2, similarity="vector"))
        assert not torch.equal(module(x), AdaPool2d(2)(x))
        assert "similarity='vector'" in repr(module)
        with pytest.raises(ValueError, match="unknown EDSCW similarity 'pixel'; expected one of 'channel', 'vector'"):
            edscw_pool2d(x, 2, similarity="pixel")
        with pytest.raises(ValueError, match="unknown EDSCW similarity"):
            AdaPool2d(2, similarity="pixel")

    def test_constant_input_returns_constant(self):
        x = torch.full((1, 3, 6, 6), -2.5, dtype=torch.float64)
        y = ada_pool2d(x, 0.3, 3, 2, 1, True)
        torch.testing.assert_close(y, torch.full_like(y, -2.5), rtol=1e-12, atol=1e-12)
        zeros = torch.zeros(1, 3, 4, 4)
        assert torch.equal(edscw_pool2d(zeros, 2), torch.zeros(1, 3, 2, 2))  # eps keeps 0/0 away

    def test_large_activations_are_stable(self):
        x = torch.randn(2, 3, 6, 6) * 1e4
        assert torch.isfinite(AdaPool2d(2)(x)).all()

    def test_gradcheck_beta_itself(self):  # the battery differentiates through beta = sigmoid(beta_logit)
        x = _random((1, 2, 4, 5), seed=3, scale=1.0).requires_grad_(True)
        beta = torch.rand(3, 3, dtype=torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t, b: ada_pool2d(t, b, 3, 2, 1, True), (x, beta))

    def test_scalar_beta_and_state(self):
        x = torch.randn(2, 3, 8, 8)
        module = AdaPool2d(3, 2, 1, beta_size=(4, 4), beta_init=0.25)
        scalar = AdaPool2d(2)
        assert scalar.beta_logit.shape == () and abs(scalar.beta.item() - 0.5) < 1e-7
        assert torch.equal(scalar(x), ada_pool2d(x, scalar.beta, 2))
        assert set(module.state_dict()) == {"beta_logit"}

    def test_beta_is_learnable_and_bounded(self):
        module = AdaPool2d(2, beta_size=(2, 2))
        module(torch.randn(1, 2, 4, 4)).square().sum().backward()
        assert module.beta_logit.grad is not None and module.beta_logit.grad.shape == (2, 2)
        with torch.no_grad():
            module.beta_logit.fill_(1e3)
        assert 0.0 <= module.beta.min().item() <= module.beta.max().item() <= 1.0

    def test_repr(self):
        text = repr(AdaPool2d(3, 2, beta_size=(4, 4)))
        assert "kernel_size=(3, 3)" in text and "beta=(4, 4)" in text
        assert "beta=scalar" in repr(AdaPool2d(2))

    def test_bad_arguments(self):
        x = torch.randn(1, 2, 4, 4)
        with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
            ada_pool2d(x, 1.5, 2)
        with pytest.raises(ValueError, match="does not broadcast"):
            ada_pool2d(x, torch.full((3, 3), 0.5), 2)
        with pytest.raises(ValueError, match="kernel_size must be >= 1, got 0"):
            ada_pool2d(x, 0.5, 0)
        with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
            AdaPool2d(2, stride=0)
        with pytest.raises(ValueError, match="beta_init must lie strictly between 0 and 1"):
            AdaPool2d(2, beta_init=1.0)
        with pytest.raises(ValueError, match=r"beta_size=\(3, 3\) got input .* output grid is \(2, 2\)"):
            AdaPool2d(2, beta_size=(3, 3))(x)
        with pytest.raises(TypeError, match="beta must be a float or a tensor"):
            ada_pool2d(x, "half", 2)


def _ada_function(module, x):
    return ada_pool2d(x, torch.sigmoid(module.beta_logit), module.kernel_size, module.stride, module.padding,
                      module.ceil_mode, similarity=module.similarity)


def _ada_reference(module, x):
    edscw, soft = reference_pools(x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                  module.similarity)
    beta = module.beta.double()
    return beta * edscw + (1 - beta) * soft


class TestAdaPool2dBattery(LayerBattery):  # per-channel EDSCW, one beta per output position
    case = LayerCase(
        layer="adapool", make=lambda: AdaPool2d(3, 2, 1, True, beta_size=(3, 3), beta_init=0.25),
        function=_ada_function, reference=_ada_reference,
        shapes=[((2, 3, 5, 5), (2, 3, 3, 3)), ((1, 2, 4, 5), (1, 2, 3, 3))], grad_shape=(1, 2, 4, 5),
        bad_inputs=[(torch.randn(1, 2, 8, 8), ValueError, r"beta_size=\(3, 3\) got input .* grid is \(5, 5\)")],
    )


class TestAdaPool2dVectorBattery(LayerBattery):  # EDSCW over channel vectors, scalar beta
    case = LayerCase(
        layer="adapool-vector", make=lambda: AdaPool2d(2, similarity="vector"), function=_ada_function,
        reference=_ada_reference, shapes=[((2, 3, 8, 8), (2, 3, 4, 4)), ((1, 2, 5, 7), (1, 2, 2, 3))],
        grad_shape=(1, 2, 4, 4),
    )
