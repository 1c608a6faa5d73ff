"""Adding a layer to the zoo takes two files: the layer's module and its registration.

The toy layer below (L2 pooling, ``sqrt(avgpool(x^2))``) is written as it would be in ``polyglean/layers/l2pool.py``
(its function, its Module and its op kind) plus the one call that ``polyglean/layers/__init__.py`` would make by
importing that module. With nothing else, it is a registered layer, ``swap`` puts it into a model, site discovery
and ``PhaseNet`` run it at every phase, and the shared battery checks it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from polyglean.layers import LAYERS, SWAP_RULES, create_layer, list_layers, register_layer, swap, unregister_layer
from polyglean.layers._utils import check_input, ntuple
from polyglean.layers.phase_ops import pool_out, subsample_at
from polyglean.layers.rules import pooling_rule
from polyglean.phase.net import PhaseNet
from polyglean.sites import discover
from polyglean.sites.ops import ModulePhaseOp
from tests.layers.battery import LayerBattery, LayerCase


# ---------------------------------------------------- file 1: polyglean/layers/l2pool.py (the layer, its op kind)
def l2_pool2d(x: Tensor, kernel_size: int, stride: int | None = None, padding: int = 0,
              ceil_mode: bool = False) -> Tensor:
    """``sqrt(mean(x^2))`` over each window (padded positions absent)."""
    check_input(x, 2, "l2_pool2d")
    squares = F.avg_pool2d(x.square(), kernel_size, stride, padding, ceil_mode, count_include_pad=False)
    return squares.sqrt()


class L2Pool2d(nn.Module):
    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = ntuple(kernel_size, 2, "kernel_size")
        self.stride = self.kernel_size if stride is None else ntuple(stride, 2, "stride")
        self.padding = ntuple(padding, 2, "padding", minimum=0)
        self.ceil_mode = ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        return l2_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)


class L2Pool2dPhase(ModulePhaseOp):
    kind = "l2_pool"

    def at_phase(self, phase: tuple[int, int], x: Tensor) -> Tensor:
        m = self.module
        y1 = l2_pool2d(x, m.kernel_size, 1, m.padding)
        return subsample_at(y1, self.factor, phase, pool_out(m, x))


# -------------------------------------- file 2: the registration (one import in polyglean/layers/__init__.py)
def register() -> None:
    register_layer("l2pool", swap_rule=pooling_rule(L2Pool2d, "l2pool"), phase_op=L2Pool2dPhase)(L2Pool2d)


# --------------------------------------------------------------------------------------------------- the tests
@pytest.fixture
def registered():
    register()
    try:
        yield
    finally:
        unregister_layer("l2pool")


def test_registered_and_created(registered) -> None:
    assert "l2pool" in list_layers("l2*") and LAYERS["l2pool"] is L2Pool2d and "l2pool" in SWAP_RULES
    assert isinstance(create_layer("l2pool", 2), L2Pool2d)
    with pytest.raises(ValueError, match="'l2pool' is already registered"):
        register()


def test_swapped_into_a_model_and_run_at_every_phase(registered) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    swapped = swap(model, "l2pool", input_size=(3, 64, 64)).eval()
    assert isinstance(swapped.maxpool, L2Pool2d) and swapped.maxpool.padding == (1, 1)
    x = torch.randn(2, 3, 64, 64)
    net = PhaseNet(swapped, (3, 64, 64))
    assert "maxpool" in [s.name for s in net.sites]
    with torch.no_grad():
        assert torch.equal(net(x), swapped(x))  # phase (0, 0) is the layer itself
        assert not torch.equal(net(x, phases={"maxpool": (1, 1)}), swapped(x))


def test_phase_is_the_stride1_map_sliced(registered) -> None:
    (op, _), = discover(nn.Sequential(L2Pool2d(3, 2, 1)), (2, 9, 9)).ops.values()
    assert op.kind == "l2_pool" and op.factor == (2, 2)
    x = torch.randn(2, 2, 9, 9)
    y1 = l2_pool2d(x, 3, 1, 1)
    assert torch.equal(op(x, phase=3), F.pad(y1[..., 1::2, 1::2], (0, 1, 0, 1)))  # past the map: zero


def test_unregistered_after_use() -> None:
    register()
    unregister_layer("l2pool")
    assert "l2pool" not in LAYERS and "l2pool" not in SWAP_RULES
    with pytest.raises(ValueError, match="unknown layer 'l2pool' for swap"):
        swap(torchvision.models.resnet18(), "l2pool", input_size=(3, 32, 32))


def reference_l2_pool(module: L2Pool2d, x: Tensor) -> Tensor:
    """``sqrt(mean(x^2))`` over the positions of each window that lie inside the input, by loops."""
    (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
    n_, c_, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1  # ceil_mode=False
    y = torch.empty(n_, c_, oh, ow, dtype=torch.float64)
    data = x.tolist()
    for n, c, i, j in itertools.product(range(n_), range(c_), range(oh), range(ow)):
        values = [data[n][c][r][q] for r in range(i * sh - ph, i * sh - ph + kh)
                  for q in range(j * sw - pw, j * sw - pw + kw) if 0 <= r < h and 0 <= q < w]
        y[n, c, i, j] = math.sqrt(sum(v * v for v in values) / len(values))
    return y


class TestL2Pool2dBattery(LayerBattery):
    case = LayerCase(
        layer="l2pool", make=lambda: L2Pool2d(3, 2, 1),
        function=lambda m, x: l2_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode),
        reference=reference_l2_pool, shapes=[((2, 3, 9, 8), (2, 3, 5, 4))], grad_shape=(1, 2, 5, 5),
    )
