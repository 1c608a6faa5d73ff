"""SoftPool 1-D/2-D/3-D against a naive per-window Python loop of the paper's formula."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from polyglean.layers import SoftPool1d, SoftPool2d, SoftPool3d, soft_pool1d, soft_pool2d, soft_pool3d
from tests.layers.battery import LayerBattery, LayerCase

FUNCS = {1: soft_pool1d, 2: soft_pool2d, 3: soft_pool3d}
MODULES = {1: SoftPool1d, 2: SoftPool2d, 3: SoftPool3d}
SETTINGS = settings(max_examples=25, deadline=None, database=None, derandomize=True)


def out_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (``pooling_output_shape`` in ATen), written out."""
    numerator = size + 2 * p - k + (s - 1 if ceil_mode else 0)
    out = math.floor(numerator / s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def reference_soft_pool(x: torch.Tensor, kernel, stride, padding, ceil_mode: bool) -> torch.Tensor:
    """``y = sum_i softmax(a)_i a_i`` over each window's existing (non-padded) positions, one channel at a time."""
    dims = x.dim() - 2
    out_shape = torch.Size(out_size(*a, ceil_mode) for a in zip(x.shape[2:], kernel, stride, padding))
    if min(out_shape) < 1:
        raise RuntimeError(f"output size {tuple(out_shape)} too small")
    data = x.double().tolist()
    y = torch.empty(x.shape[:2] + out_shape, dtype=torch.float64)
    sizes = x.shape[2:]
    for n, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for out_idx in itertools.product(*(range(o) for o in out_shape)):
            ranges = []
            for d in range(dims):
                start = out_idx[d] * stride[d] - padding[d]
                ranges.append(range(max(start, 0), min(start + kernel[d], sizes[d])))
            values = []
            for pos in itertools.product(*ranges):
                v = data[n][c]
                for i in pos:
                    v = v[i]
                values.append(v)
            m = max(values)
            weights = [math.exp(v - m) for v in values]
            y[(n, c) + out_idx] = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return y.to(x.dtype)


@st.composite
def pool_config(draw, dims: int, max_size: int):
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    sizes = tuple(draw(st.integers(max(1, k - 2 * p), max_size)) for k, p in zip(kernel, padding))
    ceil_mode = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return sizes, kernel, stride, padding, ceil_mode, seed


def _random(shape, seed: int, dtype=torch.float64, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale  # negative values included


class TestSoftPool2d:
    @pytest.mark.parametrize(
        ("size", "kernel", "stride", "padding", "ceil_mode"),
        [
            ((7, 7), 2, None, 0, False),
            ((7, 7), 2, None, 0, True),
            ((7, 9), 3, 2, 1, False),
            ((7, 9), 3, 2, 1, True),
            ((8, 5), (3, 2), (1, 2), (1, 0), True),
            ((1, 1), 1, 1, 0, False),
            ((6, 6), 2, 3, 1, True),  # stride > kernel: gaps between windows
        ],
    )
    def test_shape_and_reference(self, size, kernel, stride, padding, ceil_mode):
        x = _random((2, 3) + size, seed=1)
        y = soft_pool2d(x, kernel, stride, padding, ceil_mode)
        k2 = (kernel, kernel) if isinstance(kernel, int) else kernel
        s2 = k2 if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
        p2 = (padding, padding) if isinstance(padding, int) else padding
        assert y.shape == F.avg_pool2d(x, kernel, stride, padding, ceil_mode).shape
        torch.testing.assert_close(y, reference_soft_pool(x, k2, s2, p2, ceil_mode), rtol=1e-10, atol=1e-10)

    @SETTINGS
    @given(pool_config(dims=2, max_size=7))
    def test_matches_reference_property(self, config):
        sizes, kernel, stride, padding, ceil_mode, seed = config
        x = _random((2, 2) + sizes, seed)
        try:
            expected = reference_soft_pool(x, kernel, stride, padding, ceil_mode)
        except RuntimeError:  # PyTorch rejects the configuration (output size < 1): so must we
            with pytest.raises(ValueError, match="too small"):
                soft_pool2d(x, kernel, stride, padding, ceil_mode)
            return
        torch.testing.assert_close(soft_pool2d(x, kernel, stride, padding, ceil_mode), expected,
                                   rtol=1e-10, atol=1e-10)

    def test_weights_are_per_channel(self):
        x = _random((1, 2, 4, 4), seed=2)
        x[:, 1] = x[:, 1] * 50.0  # very different scale in channel 1 must not change channel 0
        y = soft_pool2d(x, 2)
        torch.testing.assert_close(y[:, :1], soft_pool2d(x[:, :1], 2), rtol=0, atol=0)

    def test_negative_values_not_clamped(self):
        x = -torch.rand(1, 1, 4, 4, dtype=torch.float64) - 1.0
        y = soft_pool2d(x, 2)
        assert (y < -1.0).all()

    def test_constant_input_returns_constant(self):
        for value in (-7.25, 0.0, 3.5, 1e4):
            x = torch.full((2, 3, 7, 7), value, dtype=torch.float64)
            y = soft_pool2d(x, 3, 2, 1, ceil_mode=True)
            torch.testing.assert_close(y, torch.full_like(y, value), rtol=1e-12, atol=1e-12)

    def test_padding_is_absent_not_zero(self):
        x = torch.full((1, 1, 5, 5), -4.0, dtype=torch.float64)
        y = soft_pool2d(x, 3, 2, padding=1, ceil_mode=True)
        # zeros with weight e^0 at the padded positions would pull the border outputs above -4
        torch.testing.assert_close(y, torch.full_like(y, -4.0), rtol=0, atol=1e-12)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_large_activations_are_stable(self, dtype):
        x = _random((2, 3, 6, 6), seed=3, dtype=dtype, scale=1.0) * 1e4
        y = soft_pool2d(x, 3, 2, 1, ceil_mode=True)
        assert y.dtype == dtype
        assert torch.isfinite(y).all()
        # windows differ by thousands: the softmax is one-hot at the window max
        torch.testing.assert_close(y, F.max_pool2d(x, 3, 2, 1, ceil_mode=True))
        big = torch.full((1, 1, 4, 4), 1e4, dtype=dtype)
        assert torch.equal(soft_pool2d(big, 2), torch.full((1, 1, 2, 2), 1e4, dtype=dtype))
        x.requires_grad_(True)
        soft_pool2d(x, 2).sum().backward()
        assert torch.isfinite(x.grad).all()

    def test_gradcheck_overlapping_windows(self):  # the battery checks (3, 2, 1, ceil_mode=True)
        x = _random((1, 1, 5, 6), seed=5, scale=1.0).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: soft_pool2d(t, 2, 1), (x,))

    def test_no_state(self):
        assert list(SoftPool2d(3, stride=2, padding=1, ceil_mode=True).state_dict()) == []

    def test_repr(self):
        text = repr(SoftPool2d(3, 2, 1, True))
        assert "SoftPool2d(" in text and "kernel_size=(3, 3)" in text and "stride=(2, 2)" in text
        assert "ceil_mode=True" in text

    @pytest.mark.parametrize(
        ("kwargs", "exc", "match"),
        [
            ({"kernel_size": 0}, ValueError, r"kernel_size must be >= 1, got 0"),
            ({"kernel_size": 2, "stride": 0}, ValueError, r"stride must be >= 1, got 0"),
            ({"kernel_size": 2, "padding": -1}, ValueError, r"padding must be >= 0"),
            ({"kernel_size": 2, "padding": 2}, ValueError, r"padding .* at most half of kernel_size"),
            ({"kernel_size": (2, 2, 2)}, ValueError, r"kernel_size must be an int or a sequence of 2"),
            ({"kernel_size": 2.0}, TypeError, r"kernel_size must contain ints"),
            ({"kernel_size": 9}, ValueError, r"too small for kernel_size"),
        ],
    )
    def test_bad_arguments(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            soft_pool2d(torch.randn(1, 1, 4, 4), **kwargs)

    def test_bad_input(self):  # the battery checks the Module; the function's messages here
        with pytest.raises(ValueError, match=r"expects a 4-D input \(N, C, H, W\), got shape \(3, 8, 8\)"):
            soft_pool2d(torch.randn(3, 8, 8), 2)
        with pytest.raises(TypeError, match="floating-point"):
            soft_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.long), 2)
        with pytest.raises(TypeError, match="torch.Tensor"):
            soft_pool2d([[1.0]], 2)
        with pytest.raises(ValueError, match="kernel_size must be >= 1"):
            SoftPool2d(0)


class TestSoftPool1d:
    @SETTINGS
    @given(pool_config(dims=1, max_size=9))
    def test_matches_reference_property(self, config):
        sizes, kernel, stride, padding, ceil_mode, seed = config
        x = _random((2, 3) + sizes, seed)
        try:
            expected = reference_soft_pool(x, kernel, stride, padding, ceil_mode)
        except RuntimeError:
            with pytest.raises(ValueError, match="too small"):
                soft_pool1d(x, kernel, stride, padding, ceil_mode)
            return
        torch.testing.assert_close(soft_pool1d(x, kernel, stride, padding, ceil_mode), expected,
                                   rtol=1e-10, atol=1e-10)

class TestSoftPool3d:
    @SETTINGS
    @given(pool_config(dims=3, max_size=4))
    def test_matches_reference_property(self, config):
        sizes, kernel, stride, padding, ceil_mode, seed = config
        x = _random((1, 2) + sizes, seed)
        try:
            expected = reference_soft_pool(x, kernel, stride, padding, ceil_mode)
        except RuntimeError:
            with pytest.raises(ValueError, match="too small"):
                soft_pool3d(x, kernel, stride, padding, ceil_mode)
            return
        torch.testing.assert_close(soft_pool3d(x, kernel, stride, padding, ceil_mode), expected,
                                   rtol=1e-10, atol=1e-10)

    def test_large_activations_are_stable(self):
        x = torch.randn(1, 2, 4, 4, 4) * 1e4
        assert torch.isfinite(soft_pool3d(x, 2)).all()


def _soft_function(module, x):
    pool = {1: soft_pool1d, 2: soft_pool2d, 3: soft_pool3d}[x.dim() - 2]
    return pool(x, module.kernel_size, module.stride, module.padding, module.ceil_mode)


def _soft_reference(module, x):
    return reference_soft_pool(x, module.kernel_size, module.stride, module.padding, module.ceil_mode)


class TestSoftPool2dBattery(LayerBattery):
    case = LayerCase(
        layer="softpool", make=lambda: SoftPool2d(3, stride=2, padding=1, ceil_mode=True), function=_soft_function,
        reference=_soft_reference, shapes=[((2, 3, 9, 8), (2, 3, 5, 5)), ((1, 2, 7, 7), (1, 2, 4, 4))],
        grad_shape=(1, 1, 5, 6), bad_inputs=[(torch.randn(1, 3, 8, 8, 8), ValueError, "4-D input")],
    )


class TestSoftPool1dBattery(LayerBattery):
    case = LayerCase(
        layer="softpool1d", make=lambda: SoftPool1d(3, 2, 1, ceil_mode=True), function=_soft_function,
        reference=_soft_reference, shapes=[((1, 2, 9), (1, 2, 5))], grad_shape=(1, 2, 9), dims=1,
        bad_inputs=[(torch.randn(1, 2, 3, 4), ValueError, r"3-D input \(N, C, L\)")],
    )


class TestSoftPool3dBattery(LayerBattery):
    case = LayerCase(
        layer="softpool3d", make=lambda: SoftPool3d((3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 1), ceil_mode=True),
        function=_soft_function, reference=_soft_reference, shapes=[((1, 2, 5, 4, 5), (1, 2, 3, 3, 3))],
        grad_shape=(1, 1, 3, 4, 3), dims=3,
        bad_inputs=[(torch.randn(1, 2, 4, 4), ValueError, r"5-D input \(N, C, D, H, W\)")],
    )
