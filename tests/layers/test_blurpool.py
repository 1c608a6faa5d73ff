"""BlurPool 1-D/2-D/3-D against a naive loop with hand-written padding index maps."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyglean.layers import (
    BlurPool1d,
    BlurPool2d,
    BlurPool3d,
    binomial_filter,
    blur_pool1d,
    blur_pool2d,
    blur_pool3d,
)
from tests.layers.battery import LayerBattery, LayerCase

SETTINGS = settings(max_examples=25, deadline=None, database=None, derandomize=True)
PASCAL = {1: [1], 2: [1, 1], 3: [1, 2, 1], 4: [1, 3, 3, 1], 5: [1, 4, 6, 4, 1], 6: [1, 5, 10, 10, 5, 1],
          7: [1, 6, 15, 20, 15, 6, 1]}


def _source_index(i: int, size: int, pad_type: str) -> int | None:
    """Where padded position ``i`` (in input coordinates, may be < 0 or >= size) reads from; ``None`` = zero."""
    if 0 <= i < size:
        return i
    if pad_type == "reflect":
        return -i if i < 0 else 2 * (size - 1) - i
    if pad_type == "replicate":
        return min(max(i, 0), size - 1)
    if pad_type == "circular":
        return i % size
    return None  # zeros / constant


def reference_blur_pool(x: torch.Tensor, size: int, stride, pad_type: str) -> torch.Tensor:
    dims = x.dim() - 2
    row = [v / sum(PASCAL[size]) for v in PASCAL[size]]
    before = (size - 1) // 2
    sizes = x.shape[2:]
    out_shape = tuple(-(-n // s) for n, s in zip(sizes, stride))
    data = x.double().tolist()
    y = torch.zeros(x.shape[:2] + out_shape, dtype=torch.float64)
    for n, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for out in itertools.product(*(range(o) for o in out_shape)):
            total = 0.0
            for taps in itertools.product(range(size), repeat=dims):
                src = [_source_index(out[d] * stride[d] - before + taps[d], sizes[d], pad_type) for d in range(dims)]
                if any(s is None for s in src):
                    continue
                v = data[n][c]
                for s in src:
                    v = v[s]
                weight = 1.0
                for t in taps:
                    weight *= row[t]
                total += weight * v
            y[(n, c) + out] = total
    return y.to(x.dtype)


@st.composite
def config(draw, dims: int, max_size: int):
    size = draw(st.integers(1, 7))
    pad_type = draw(st.sampled_from(["reflect", "replicate", "zeros", "constant", "circular"]))
    smallest = size // 2 + 1  # reflect needs a spatial size > the padding
    sizes = tuple(draw(st.integers(smallest, max(smallest, max_size))) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    return sizes, size, stride, pad_type, draw(st.integers(0, 2**16))


def _random(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


class TestBinomialFilter:
    @pytest.mark.parametrize("size", range(1, 8))
    @pytest.mark.parametrize("dims", [1, 2, 3])
    def test_sums_to_one_and_matches_pascal(self, size, dims):
        filt = binomial_filter(size, dims, dtype=torch.float64)
        assert filt.shape == (size,) * dims
        assert filt.sum().item() == pytest.approx(1.0, abs=1e-15)
        row = torch.tensor(PASCAL[size], dtype=torch.float64) / sum(PASCAL[size])
        expected = row
        for _ in range(dims - 1):
            expected = torch.einsum("...i,j->...ij", expected, row)
        assert torch.equal(filt, expected)

    def test_bad_size(self):
        with pytest.raises(ValueError, match="filter size must be in 1..7.*got 8"):
            binomial_filter(8)
        with pytest.raises(ValueError, match="got 0"):
            binomial_filter(0)
        with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
            binomial_filter(3, 4)


class TestBlurPool2d:
    @pytest.mark.parametrize("pad_type", ["reflect", "replicate", "zeros", "constant", "circular"])
    @pytest.mark.parametrize(("size", "shape", "stride"), [(3, (7, 8), 2), (4, (9, 6), 2), (7, (8, 8), 3),
                                                           (1, (5, 5), 2), (2, (5, 4), (1, 2))])
    def test_matches_reference(self, pad_type, size, shape, stride):
        x = _random((2, 3) + shape, seed=1)
        s2 = (stride, stride) if isinstance(stride, int) else stride
        y = blur_pool2d(x, size, stride, pad_type)
        assert y.shape == (2, 3) + tuple(-(-n // s) for n, s in zip(shape, s2))
        torch.testing.assert_close(y, reference_blur_pool(x, size, s2, pad_type), rtol=1e-12, atol=1e-12)

    @SETTINGS
    @given(config(dims=2, max_size=8))
    def test_matches_reference_property(self, cfg):
        sizes, size, stride, pad_type, seed = cfg
        x = _random((1, 2) + sizes, seed)
        expected = reference_blur_pool(x, size, stride, pad_type)
        torch.testing.assert_close(blur_pool2d(x, size, stride, pad_type), expected, rtol=1e-12, atol=1e-12)

    def test_filter_size_one_is_plain_subsampling(self):
        x = torch.randn(2, 3, 7, 9)
        assert torch.equal(blur_pool2d(x, 1, 2), x[..., ::2, ::2])

    def test_constant_input_is_preserved(self):
        x = torch.full((1, 2, 9, 9), 4.0, dtype=torch.float64)
        for pad_type in ("reflect", "replicate", "circular"):
            torch.testing.assert_close(blur_pool2d(x, 5, 2, pad_type), torch.full((1, 2, 5, 5), 4.0,
                                                                                  dtype=torch.float64))

    def test_buffer_is_not_in_state_dict(self):
        module = BlurPool2d(channels=4, filter_size=5)
        assert "filt" in dict(module.named_buffers())
        assert module.filt.sum().item() == pytest.approx(1.0)
        assert module.state_dict() == {}
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), module)
        plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Identity())
        model.load_state_dict(plain.state_dict(), strict=True)  # a swapped model loads the original checkpoint

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_module_equals_function(self, dtype):
        x = torch.randn(2, 3, 9, 8, dtype=dtype)
        for size, pad_type in ((3, "reflect"), (4, "zeros"), (6, "circular"), (7, "replicate")):
            module = BlurPool2d(filter_size=size, pad_type=pad_type).to(dtype)
            y = module(x)
            assert y.dtype == dtype
            assert torch.equal(y, blur_pool2d(x, size, 2, pad_type))
        assert torch.equal(BlurPool2d()(x), blur_pool2d(x))  # float32 buffer, any input dtype

    def test_is_a_strided_depthwise_conv_under_fx(self):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BlurPool2d(filter_size=5))
        gm = torch.fx.symbolic_trace(model)  # site discovery traces forward: no data-dependent control flow
        convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
        assert len(convs) == 1 and convs[0].kwargs["stride"] == (2, 2)
        x = torch.randn(1, 3, 12, 12)
        assert torch.equal(gm(x), model(x))

    def test_gradcheck_pad_types(self):
        x = _random((1, 1, 5, 4), seed=3).requires_grad_(True)
        for pad_type in ("reflect", "zeros", "circular"):
            assert torch.autograd.gradcheck(lambda t: blur_pool2d(t, 4, 2, pad_type), (x,))

    def test_repr(self):
        text = repr(BlurPool2d(channels=8, filter_size=5, stride=2, pad_type="zeros"))
        assert text == "BlurPool2d(channels=8, filter_size=5, stride=(2, 2), pad_type='zeros')"

    @pytest.mark.parametrize(
        ("kwargs", "exc", "match"),
        [
            ({"filter_size": 8}, ValueError, r"filter size must be in 1..7 .*got 8"),
            ({"filter_size": 0}, ValueError, r"filter size must be in 1..7 .*got 0"),
            ({"filter_size": 3.0}, TypeError, r"filter size must be an int"),
            ({"stride": 0}, ValueError, r"stride must be >= 1, got 0"),
            ({"pad_type": "mirror"}, ValueError, r"unknown pad_type 'mirror'; expected one of 'reflect'"),
        ],
    )
    def test_bad_arguments(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            blur_pool2d(torch.randn(1, 1, 8, 8), **kwargs)
        with pytest.raises(exc, match=match):
            BlurPool2d(**kwargs)

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\), got shape \(1, 2, 8\)"):
            BlurPool2d()(torch.randn(1, 2, 8))
        with pytest.raises(ValueError, match="pad_type 'reflect' needs every spatial size > 2"):
            blur_pool2d(torch.randn(1, 1, 2, 8), filter_size=5)
        assert blur_pool2d(torch.randn(1, 1, 2, 8), filter_size=5, pad_type="zeros").shape == (1, 1, 1, 4)


class TestBlurPool1d:
    @SETTINGS
    @given(config(dims=1, max_size=10))
    def test_matches_reference_property(self, cfg):
        sizes, size, stride, pad_type, seed = cfg
        x = _random((2, 2) + sizes, seed)
        expected = reference_blur_pool(x, size, stride, pad_type)
        torch.testing.assert_close(blur_pool1d(x, size, stride, pad_type), expected, rtol=1e-12, atol=1e-12)

    def test_no_state(self):
        assert BlurPool1d().state_dict() == {}


class TestBlurPool3d:
    @SETTINGS
    @given(config(dims=3, max_size=5))
    def test_matches_reference_property(self, cfg):
        sizes, size, stride, pad_type, seed = cfg
        x = _random((1, 1) + sizes, seed)
        expected = reference_blur_pool(x, size, stride, pad_type)
        torch.testing.assert_close(blur_pool3d(x, size, stride, pad_type), expected, rtol=1e-12, atol=1e-12)

    def test_no_state(self):
        assert BlurPool3d().state_dict() == {}


def _blur_function(module, x):
    pool = {1: blur_pool1d, 2: blur_pool2d, 3: blur_pool3d}[x.dim() - 2]
    return pool(x, module.filter_size, module.stride, module.pad_type)


def _blur_reference(module, x):
    return reference_blur_pool(x, module.filter_size, module.stride, module.pad_type)


class TestBlurPool2dBattery(LayerBattery):
    case = LayerCase(
        layer="blurpool", make=lambda: BlurPool2d(channels=3, filter_size=4), function=_blur_function,
        reference=_blur_reference, shapes=[((2, 3, 9, 8), (2, 3, 5, 4)), ((1, 3, 5, 5), (1, 3, 3, 3))],
        grad_shape=(1, 3, 5, 4),
        bad_inputs=[(torch.randn(1, 2, 8, 8), ValueError, "built for 3 channels"),
                    (torch.randn(1, 3, 2, 8), ValueError, "pad_type 'reflect' needs every spatial size > 2")],
    )


class TestBlurPool1dBattery(LayerBattery):
    case = LayerCase(
        layer="blurpool1d", make=lambda: BlurPool1d(filter_size=5), function=_blur_function,
        reference=_blur_reference, shapes=[((1, 2, 9), (1, 2, 5))], grad_shape=(1, 2, 9), dims=1,
        bad_inputs=[(torch.randn(1, 2, 8, 8), ValueError, r"3-D input \(N, C, L\)")],
    )


class TestBlurPool3dBattery(LayerBattery):
    case = LayerCase(
        layer="blurpool3d", make=lambda: BlurPool3d(filter_size=3, pad_type="replicate"), function=_blur_function,
        reference=_blur_reference, shapes=[((1, 1, 4, 3, 4), (1, 1, 2, 2, 2))], grad_shape=(1, 1, 4, 3, 4), dims=3,
        bad_inputs=[(torch.randn(1, 2, 8, 8), ValueError, r"5-D input")],
    )
