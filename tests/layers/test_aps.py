"""APS 2-D against a naive per-phase loop: the max-norm polyphase component, ties to the lowest index."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyglean.layers import APS2d, aps_gather2d, aps_select2d
from polyglean.layers.aps import polyphase_components2d
from tests.layers.battery import LayerBattery, LayerCase

SETTINGS = settings(max_examples=30, deadline=None, database=None, derandomize=True)


def reference_component(x: torch.Tensor, n: int, i: int, j: int, sh: int, sw: int, pad_mode: str) -> torch.Tensor:
    """``pad(x)[n, :, i::sh, j::sw]`` by loops; ``pad`` extends bottom/right circularly or with zeros."""
    _, c_, h, w = x.shape
    oh, ow = -(-h // sh), -(-w // sw)
    out = torch.zeros(c_, oh, ow, dtype=x.dtype)
    for c, r, q in itertools.product(range(c_), range(oh), range(ow)):
        row, col = r * sh + i, q * sw + j
        if pad_mode == "circular":
            out[c, r, q] = x[n, c, row % h, col % w]
        elif row < h and col < w:
            out[c, r, q] = x[n, c, row, col]
    return out


def _norm(t: torch.Tensor, p: float) -> float:
    values = [abs(v) for v in t.flatten().tolist()]
    if math.isinf(p):
        return max(values)
    return sum(v**p for v in values) ** (1.0 / p)


def reference_aps(x: torch.Tensor, sh: int, sw: int, p: float, pad_mode: str):
    outs, indices = [], []
    for n in range(x.shape[0]):
        best, best_norm = 0, -1.0
        for idx, (i, j) in enumerate(itertools.product(range(sh), range(sw))):
            norm = _norm(reference_component(x, n, i, j, sh, sw, pad_mode), p)
            if norm > best_norm:  # strict: ties keep the lowest index
                best, best_norm = idx, norm
        indices.append(best)
        outs.append(reference_component(x, n, best // sw, best % sw, sh, sw, pad_mode))
    return torch.stack(outs), torch.tensor(indices)


@st.composite
def config(draw):
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    size = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    p = draw(st.sampled_from([1, 2, "inf"]))
    pad_mode = draw(st.sampled_from(["circular", "zeros"]))
    return size, stride, p, pad_mode, draw(st.integers(0, 2**16))


def _random(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


class TestAPS2d:
    def test_index_shape_and_dtype(self):
        y, index = aps_select2d(torch.randn(3, 4, 8, 8))
        assert y.shape == (3, 4, 4, 4) and index.shape == (3,) and index.dtype == torch.long

    @pytest.mark.parametrize("p", [1, 2, math.inf, "inf"])
    @pytest.mark.parametrize(("shape", "stride"), [((8, 8), 2), ((7, 9), 2), ((7, 8), 3), ((5, 6), (2, 3))])
    @pytest.mark.parametrize("pad_mode", ["circular", "zeros"])
    def test_matches_reference(self, p, shape, stride, pad_mode):
        x = _random((4, 3) + shape, seed=1)
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        y, index = aps_select2d(x, stride, p, pad_mode)
        ref_y, ref_index = reference_aps(x, sh, sw, math.inf if p == "inf" else float(p), pad_mode)
        assert y.shape == (4, 3, -(-shape[0] // sh), -(-shape[1] // sw))
        assert torch.equal(index, ref_index)
        assert torch.equal(y, ref_y)

    @SETTINGS
    @given(config())
    def test_matches_reference_property(self, cfg):
        size, (sh, sw), p, pad_mode, seed = cfg
        x = _random((3, 2) + size, seed)
        y, index = aps_select2d(x, (sh, sw), p, pad_mode)
        ref_y, ref_index = reference_aps(x, sh, sw, math.inf if p == "inf" else float(p), pad_mode)
        assert torch.equal(index, ref_index)
        assert torch.equal(y, ref_y)
        assert torch.equal(aps_gather2d(x, index, (sh, sw), pad_mode), y)

    def test_picks_the_max_norm_phase(self):
        x = torch.zeros(3, 2, 6, 6)
        x[0, 1, 3, 5] = 2.0  # phase (1, 1) -> 3
        x[1, 0, 2, 1] = -5.0  # phase (0, 1) -> 1 (norms use |x|)
        x[2] = 1.0  # all phases tie -> lowest index 0
        y, index = aps_select2d(x, 2)
        assert index.tolist() == [3, 1, 0]
        for n, (i, j) in enumerate([(1, 1), (0, 1), (0, 0)]):
            assert torch.equal(y[n], x[n, :, i::2, j::2])

    def test_norms_can_disagree(self):
        x = torch.zeros(1, 1, 2, 4)
        x[0, 0, 0, 0], x[0, 0, 0, 2] = 1.0, 1.0  # phase 0: l1 = 2, l2 = 1.41, linf = 1
        x[0, 0, 1, 1] = 1.5  # phase 3: l1 = l2 = linf = 1.5
        assert aps_select2d(x, 2, p=1)[1].item() == 0
        assert aps_select2d(x, 2, p=2)[1].item() == 3
        assert aps_select2d(x, 2, p="inf")[1].item() == 3

    def test_shift_equivariance(self):
        x = _random((2, 3, 8, 8), seed=2)
        y, _ = aps_select2d(x, 2)
        y_shifted, _ = aps_select2d(torch.roll(x, shifts=(1, 1), dims=(2, 3)), 2)
        # a circular shift by one pixel moves the max-norm phase; the output is the same up to a circular shift
        assert any(torch.equal(y_shifted, torch.roll(y, (a, b), (2, 3))) for a in (0, 1) for b in (0, 1))

    def test_gather_reuses_the_index_on_a_shortcut(self):
        main, identity = _random((3, 4, 7, 7), seed=3), _random((3, 4, 7, 7), seed=4)
        aps = APS2d(2)
        y, index = aps(main, return_index=True)
        shortcut = aps(identity, index=index)
        for n in range(3):
            i, j = divmod(index[n].item(), 2)
            assert torch.equal(shortcut[n], reference_component(identity, n, i, j, 2, 2, "circular"))
        assert torch.equal(aps_gather2d(main, index, 2), y)
        assert vars(aps)["_buffers"] == {} and not hasattr(aps, "index")  # nothing stored on the module

    def test_components_layout(self):
        x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
        comps = polyphase_components2d(x, (2, 3))
        assert comps.shape == (2, 6, 1, 2, 2)
        for i, j in itertools.product(range(2), range(3)):
            assert torch.equal(comps[:, i * 3 + j], x[..., i::2, j::3])

    def test_module_equals_function(self):
        x = torch.randn(2, 3, 9, 8)
        y, index = aps_select2d(x, 2, 1, "zeros")
        module = APS2d(2, p=1, pad_mode="zeros")
        assert torch.equal(module(x), y)
        out, idx = module(x, return_index=True)
        assert torch.equal(out, y) and torch.equal(idx, index)
        assert module.state_dict() == {}

    def test_gradient_flows_to_the_chosen_phase(self):
        x = _random((2, 2, 4, 4), seed=5).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: aps_select2d(t, 2)[0], (x,))
        assert torch.autograd.gradcheck(lambda t: aps_gather2d(t, torch.tensor([1, 2]), 2), (x,))
        x3 = _random((1, 1, 5, 3), seed=6).requires_grad_(True)  # odd size, circular wrap
        assert torch.autograd.gradcheck(lambda t: aps_gather2d(t, torch.tensor([3]), 2), (x3,))

    def test_noncontiguous_index(self):  # the battery compares the outputs; the chosen index must agree too
        x = _random((2, 3, 7, 6), seed=7).transpose(-1, -2)
        y, index = aps_select2d(x, 2)
        y2, index2 = aps_select2d(x.contiguous(), 2)
        assert torch.equal(y, y2) and torch.equal(index, index2)

    def test_repr(self):
        assert repr(APS2d(2, p="inf")) == "APS2d(stride=(2, 2), p=inf, pad_mode='circular')"
        assert repr(APS2d((2, 3), p=1, pad_mode="zeros")) == "APS2d(stride=(2, 3), p=1, pad_mode='zeros')"

    def test_bad_arguments(self):
        x = torch.randn(2, 3, 8, 8)
        with pytest.raises(ValueError, match=r"unknown norm p=3"):
            aps_select2d(x, 2, p=3)
        with pytest.raises(ValueError, match=r"unknown norm p='fro'"):
            APS2d(p="fro")
        with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
            APS2d(0)
        with pytest.raises(ValueError, match="unknown pad_mode 'reflect'"):
            aps_select2d(x, 2, pad_mode="reflect")
        with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\)"):
            aps_select2d(torch.randn(3, 8, 8))
        with pytest.raises(ValueError, match=r"index values must lie in \[0, 4\)"):
            aps_gather2d(x, torch.tensor([0, 4]), 2)
        with pytest.raises(ValueError, match=r"index of shape \(3,\) does not match the batch"):
            aps_gather2d(x, torch.tensor([0, 1, 2]), 2)
        with pytest.raises(ValueError, match="integer tensor"):
            aps_gather2d(x, torch.tensor([0.0, 1.0]), 2)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_index_matches_cpu(self):  # the battery compares the outputs; the index must agree too
        x = torch.randn(2, 3, 9, 9)
        y, index = aps_select2d(x.cuda(), 2)
        ref_y, ref_index = aps_select2d(x, 2)
        assert torch.equal(index.cpu(), ref_index)
        torch.testing.assert_close(y.cpu(), ref_y)


def _aps_reference(module, x):
    sh, sw = module.stride
    return reference_aps(x, sh, sw, module.p, module.pad_mode)[0]


class TestAPS2dBattery(LayerBattery):
    case = LayerCase(
        layer="aps", make=lambda: APS2d(2, p=1, pad_mode="zeros"),
        function=lambda m, x: aps_select2d(x, m.stride, m.p, m.pad_mode)[0], reference=_aps_reference,
        shapes=[((2, 3, 9, 8), (2, 3, 5, 4)), ((3, 2, 6, 6), (3, 2, 3, 3))], grad_shape=(2, 2, 4, 5),
    )


class TestAPS2dCircularBattery(LayerBattery):
    case = LayerCase(
        layer="aps-circular", make=lambda: APS2d((2, 3), p="inf"),
        function=lambda m, x: aps_select2d(x, m.stride, m.p, m.pad_mode)[0], reference=_aps_reference,
        shapes=[((2, 3, 7, 8), (2, 3, 4, 3))], grad_shape=(1, 2, 5, 3),
    )
