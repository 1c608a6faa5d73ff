"""The checks every downsampling layer passes, shared (after kornia's ``BaseTester``).

A test module describes its layer once, as a :class:`LayerCase`, and gets the whole battery by subclassing
:class:`LayerBattery`::

    class TestSoftPool2dBattery(LayerBattery):
        case = LayerCase(layer="softpool", make=lambda: SoftPool2d(3, 2, 1, True),
                         function=lambda m, x: soft_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode),
                         reference=reference_soft_pool_of_module, shapes=[((2, 3, 7, 7), (2, 3, 4, 4))])

The checks: the Module equals its function (bit for bit, float32 and float64); the function equals a naive loop of
the paper's formula (float64); ``gradcheck`` in float64; output shapes; bad input raises a clear error (wrong number
of dimensions, integer dtype, not a tensor, and the layer's own cases); non-contiguous and channels-last input give
the contiguous result; the output keeps the input's dtype and float32 agrees with float64 within float32's
tolerance; CUDA equals CPU (skipped without CUDA). ``tests/layers/test_battery.py`` checks that every registered
layer has a battery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

__all__ = ["DEVICES", "LayerBattery", "LayerCase", "TOLERANCE"]

#: ``(rtol, atol)`` by dtype, for comparisons that are not bit for bit.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
DTYPES = [torch.float32, torch.float64]


@dataclass
class LayerCase:
    """One configured layer, as the battery sees it.

    Attributes:
        layer: The registered name (``polyglean.layers.LAYERS``), or a descriptive name for variants.
        make: Builds the Module (float32, CPU; the battery moves it).
        function: ``function(module, x)``: the pure function with the Module's arguments and parameters; the
            Module's ``forward`` must equal it bit for bit.
        reference: ``reference(module, x)``: a naive loop of the paper's formula for the Module's arguments, in
            float64.
        shapes: ``(input shape, output shape)`` pairs.
        grad_shape: Input shape for ``gradcheck`` (small: it is numeric).
        bad_inputs: Extra ``(input, exception type, message regex)`` the Module must refuse.
        dims: Number of spatial dimensions of the input.
    """

    layer: str
    make: Callable[[], nn.Module]
    function: Callable[[nn.Module, Tensor], Tensor]
    reference: Callable[[nn.Module, Tensor], Tensor]
    shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]
    grad_shape: tuple[int, ...]
    bad_inputs: Sequence[tuple[Any, type[BaseException], str]] = field(default_factory=list)
    dims: int = 2


def _input(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * 2).to(dtype=dtype, device=device)


def _module(case: LayerCase, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    module = case.make()
    with torch.no_grad():  # random parameters (the same for every dtype), so that one the function ignores shows
        for param in module.parameters():
            param.normal_(0.0, 0.5)
    return module.to(dtype=dtype, device=device).eval()


class LayerBattery:
    """Base class: a subclass sets ``case`` and inherits every check."""

    case: ClassVar[LayerCase]

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_module_equals_function(self, dtype: torch.dtype, device: str) -> None:
        module = _module(self.case, dtype, device)
        x = _input(self.case.shapes[0][0], seed=1, dtype=dtype, device=device)
        with torch.no_grad():
            assert torch.equal(module(x), self.case.function(module, x))

    def test_matches_naive_reference(self) -> None:
        module = _module(self.case, torch.float64)
        for shape, _ in self.case.shapes:
            x = _input(shape, seed=2)
            with torch.no_grad():
                torch.testing.assert_close(self.case.function(module, x), self.case.reference(module, x),
                                           rtol=1e-10, atol=1e-10)

    def test_gradcheck(self) -> None:
        module = _module(self.case, torch.float64)
        x = _input(self.case.grad_shape, seed=3).mul_(0.5).requires_grad_(True)
        params = [p for p in module.parameters() if p.requires_grad]

        def run(t: Tensor, *_: Tensor) -> Tensor:
            return self.case.function(module, t)

        assert torch.autograd.gradcheck(run, (x, *params))

    def test_shapes(self) -> None:
        module = _module(self.case)
        for shape, out in self.case.shapes:
            with torch.no_grad():
                assert tuple(module(_input(shape, seed=4, dtype=torch.float32)).shape) == tuple(out)

    def test_bad_input_raises(self) -> None:
        module = _module(self.case)
        shape = self.case.shapes[0][0]
        layouts = {1: r"\(N, C, L\)", 2: r"\(N, C, H, W\)", 3: r"\(N, C, D, H, W\)"}
        with pytest.raises(ValueError, match=rf"{self.case.dims + 2}-D input {layouts[self.case.dims]}"):
            module(torch.randn(shape[1:]))  # unbatched
        with pytest.raises(TypeError, match="floating-point"):
            module(torch.ones(shape, dtype=torch.long))
        with pytest.raises(TypeError, match="torch.Tensor"):
            module(torch.randn(shape).tolist())
        for x, exc, match in self.case.bad_inputs:
            with pytest.raises(exc, match=match):
                module(x)

    def test_noncontiguous_input(self) -> None:
        module = _module(self.case, torch.float64)
        shape = self.case.shapes[0][0]
        x = _input(shape[:-2] + (shape[-1], shape[-2]), seed=5).transpose(-1, -2)  # same shape, strided
        assert not x.is_contiguous()
        with torch.no_grad():
            torch.testing.assert_close(module(x), module(x.contiguous()), rtol=1e-12, atol=1e-12)
            if self.case.dims == 2:
                cl = _input(shape, seed=6).to(memory_format=torch.channels_last)
                torch.testing.assert_close(module(cl), module(cl.contiguous()), rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("device", DEVICES)
    def test_dtypes_and_devices(self, device: str) -> None:
        x64 = _input(self.case.shapes[0][0], seed=7)
        with torch.no_grad():
            expected = _module(self.case, torch.float64)(x64)
            for dtype in DTYPES:
                y = _module(self.case, dtype, device)(x64.to(dtype=dtype, device=device))
                assert y.dtype == dtype and y.device.type == device
                rtol, atol = TOLERANCE[dtype]
                torch.testing.assert_close(y.cpu().double(), expected, rtol=rtol, atol=atol)
