"""The dense search: alignment against its literal definition, displacement, criteria and aggregators on maps,
B=1 bit-exact, and the search against a plain per-image reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyglean import PhaseNet
from polyglean.errors import ArgumentError
from polyglean.search.dense import (
    DenseSearch,
    MapEntropyAggregator,
    MapEntropyCriterion,
    MapMeanAggregator,
    align_maps,
    pixel_displacement,
    pixel_entropy,
)
from tests.phase.test_net import lively
from tests.search.test_search import reference_search


class PickUp(nn.Module):
    """Picks every second pixel (1x1 conv of stride 2, identity weights) twice, then upsamples by 4 (nearest)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1, 2, bias=False)
        self.b = nn.Conv2d(3, 3, 1, 2, bias=False)
        self.c = nn.Conv2d(3, 3, 1, 2, bias=False)
        for conv in (self.a, self.b, self.c):
            nn.init.dirac_(conv.weight)
        self.up = nn.Upsample(scale_factor=8, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.c(self.b(self.a(x))))


class SmallSeg(nn.Module):
    """A small encoder-decoder returning a dict, its last op an upsampling to the input size."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.head(self.down2(self.down1(self.stem(x))))
        return {"out": nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


@pytest.fixture(scope="module")
def net() -> PhaseNet:
    torch.manual_seed(0)
    return PhaseNet(lively(SmallSeg()), input_size=(3, 32, 32))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class TestAlignment:
    def test_against_the_literal_definition(self) -> None:
        g = torch.Generator().manual_seed(0)
        maps = torch.randn(5, 3, 7, 9, generator=g)
        shift = torch.tensor([[0, 0], [1, 0], [0, 2], [3, 4], [6, 8]])
        out, valid = align_maps(maps, shift)
        for i, (dy, dx) in enumerate(shift.tolist()):
            for y, xx in itertools.product(range(7), range(9)):
                inside = y - dy >= 0 and xx - dx >= 0
                assert bool(valid[i, y, xx]) == inside
                expect = maps[i, :, y - dy, xx - dx] if inside else torch.zeros(3)
                assert torch.equal(out[i, :, y, xx], expect)

    def test_aligned_phase_sees_the_pixels_it_sampled(self) -> None:
        """A model that samples every 8th pixel at its phase and upsamples: aligned, the candidate of displacement
        Δ shows at pixel p the input pixel its grid sampled there, i.e. ``x[8·⌊(p−Δ)/8⌋ + Δ]``."""
        model = PickUp().eval()
        net = PhaseNet(model, (3, 16, 16))
        x = torch.arange(16.0).repeat(1, 3, 16, 1)  # value = column index
        for phases in ({0: (0, 1)}, {1: (0, 1)}, {0: (0, 1), 2: (0, 1)}):
            state = torch.zeros(1, 3, dtype=torch.long)
            for site, (dy, dx) in phases.items():
                state[0, site] = dy * 2 + dx
            shift = pixel_displacement(state, net.sites)
            with torch.no_grad():
                out = net(x, phases=state)
            aligned, valid = align_maps(out, shift)
            d = int(shift[0, 1])
            for col in range(d, 16):
                assert aligned[0, 0, 0, col].item() == 8 * ((col - d) // 8) + d

    def test_displacement_in_input_pixels(self) -> None:
        net = PhaseNet(PickUp().eval(), (3, 16, 16))
        states = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 3, 3], [2, 0, 2]])
        assert pixel_displacement(states, net.sites).tolist() == [[0, 1], [0, 2], [0, 4], [7, 7], [5, 0]]


def _maps(n: int, b: int, k: int = 4, h: int = 5, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, b, k, h, w, generator=torch.Generator().manual_seed(seed)) * 3


class TestAggregators:
    @settings(max_examples=20, deadline=None)
    @given(b=st.integers(1, 7), seed=st.integers(0, 100))
    def test_any_budget_and_permutation_invariance(self, b: int, seed: int) -> None:
        maps = _maps(2, b, seed=seed)
        valid = torch.rand(2, b, 5, 6, generator=torch.Generator().manual_seed(seed)) > 0.3
        valid[:, 0] = True
        perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed + 1))
        for agg in (MapMeanAggregator(), MapEntropyAggregator()):
            out = agg.combine(maps, valid)
            assert out.shape == (2, 4, 5, 6)
            torch.testing.assert_close(agg.combine(maps[:, perm], valid[:, perm]), out)

    def test_mean_over_covering_candidates(self) -> None:
        maps = _maps(1, 3)
        valid = torch.ones(1, 3, 5, 6, dtype=torch.bool)
        valid[0, 2, 0, 0] = False
        out = MapMeanAggregator().combine(maps, valid)
        torch.testing.assert_close(out[0, :, 0, 0], maps[0, :2, :, 0, 0].mean(0))
        torch.testing.assert_close(out[0, :, 1, 1], maps[0, :, :, 1, 1].mean(0))

    def test_entropy_weights_per_pixel(self) -> None:
        maps = _maps(1, 3)
        valid = torch.ones(1, 3, 5, 6, dtype=torch.bool)
        out = MapEntropyAggregator().combine(maps, valid)
        w = 1 - pixel_entropy(maps[0])  # (3, H, W)
        expect = (maps[0] * w[:, None]).sum(0) / w.sum(0)
        torch.testing.assert_close(out[0], expect)

    def test_one_candidate_is_itself(self) -> None:
        maps = _maps(2, 1)
        valid = torch.ones(2, 1, 5, 6, dtype=torch.bool)
        for agg in (MapMeanAggregator(), MapEntropyAggregator()):
            torch.testing.assert_close(agg.combine(maps, valid), maps[:, 0])

    def test_uncovered_pixel_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="covered by no candidate"):
            MapMeanAggregator().combine(_maps(1, 2), torch.zeros(1, 2, 5, 6, dtype=torch.bool))


class TestCriteria:
    def test_mean_pixel_entropy(self) -> None:
        maps = _maps(1, 3)[0]
        scores = MapEntropyCriterion().score(maps, torch.zeros(3, 2), torch.Generator())
        logp = maps.log_softmax(1)
        expect = (-(logp.exp() * logp).sum(1) / torch.log(torch.tensor(4.0))).mean((1, 2))
        torch.testing.assert_close(scores, expect)


class TestSearch:
    def test_b1_is_the_plain_model_bit_for_bit(self, net: PhaseNet, x: torch.Tensor) -> None:
        search = DenseSearch(net, budget=1)
        with torch.no_grad():
            assert torch.equal(search(x), net.model(x)["out"])

    @pytest.mark.parametrize("criterion", ["entropy", "delta"])
    def test_same_states_as_a_plain_reference(self, net: PhaseNet, x: torch.Tensor, criterion: str) -> None:
        search = DenseSearch(net, budget=7, criterion=criterion, aggregate="mean", search_space=[0, 1, 2])
        result = search.run(x, budgets=[1, 4, 7])
        space = [s.index for s in search.search_space]

        def score(out: torch.Tensor, state: tuple) -> float:
            if criterion == "entropy":
                return float(pixel_entropy(out).mean())
            return float(pixel_displacement(torch.tensor([state]), net.sites).sum())

        with torch.no_grad():
            for i in range(x.shape[0]):
                ref, _ = reference_search(_Unwrap(net), x[i:i + 1], 7, space, score)
                assert [tuple(s) for s in result.states[i].tolist()] == ref
                for j, state in enumerate(ref):
                    single = net(x[i:i + 1], phases=torch.tensor([state]))["out"][0]
                    torch.testing.assert_close(result.candidate_logits[i, j], single, rtol=1e-4, atol=1e-4)

    def test_combine_matches_manual_aggregation(self, net: PhaseNet, x: torch.Tensor) -> None:
        search = DenseSearch(net, budget=4, aggregate="mean", search_space=[0, 1, 2])
        result = search.run(x, budgets=[4])
        maps, shift = result.candidate_logits[:, :4], result.shift[:, :4]
        for i in range(x.shape[0]):
            aligned, valid = align_maps(maps[i], shift[i])
            expect = (aligned * valid[:, None]).sum(0) / valid.sum(0)
            torch.testing.assert_close(result.logits[4][i], expect)
        unaligned = search.combine(result, 4, align=False)
        torch.testing.assert_close(unaligned, maps.mean(1))

    def test_cost_is_reported(self, net: PhaseNet, x: torch.Tensor) -> None:
        result = DenseSearch(net, budget=4, search_space=[0, 1, 2]).run(x, budgets=[1, 4])
        assert result.forward_equivalents_at(1) == 1.0
        assert 1.0 < result.forward_equivalents_at(4) <= 4.0
        assert set(result.seconds_by_budget) == {1, 4}

    def test_bad_options(self, net: PhaseNet) -> None:
        with pytest.raises(ArgumentError, match="dense criterion"):
            DenseSearch(net, criterion="nope")
        with pytest.raises(ArgumentError, match="dense aggregator"):
            DenseSearch(net, aggregate="nope")
        with pytest.raises(ArgumentError, match="feature maps"):
            from polyglean.search.criteria import LearnedCriterion
            DenseSearch(net, criterion=LearnedCriterion())

    def test_classifier_output_is_refused(self) -> None:
        clf = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net = PhaseNet(clf.eval(), (3, 16, 16))
        with pytest.raises(ValueError, match=r"\(N, K, H, W\)"):
            DenseSearch(net, budget=2, search_space=[0]).run(torch.randn(1, 3, 16, 16))


class _Unwrap:
    """``net(x, phases)`` as the reference search calls it, returning the logits of the dict."""

    def __init__(self, net: PhaseNet) -> None:
        self.net = net
        self.sites = net.sites

    def __call__(self, x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        return self.net(x, phases=phases)["out"]
