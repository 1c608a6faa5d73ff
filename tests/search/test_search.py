"""The best-first search against a plain per-image reference, its invariants, and alignment."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from polyglean import PhaseNet
from polyglean.aggregate import align, alignment_factor, displacement, normalized_entropy
from polyglean.search import PhaseSearch
from tests.phase.test_net import lively


@pytest.fixture(scope="module")
def net() -> PhaseNet:
    torch.manual_seed(0)
    return PhaseNet(lively(torchvision.models.resnet18(num_classes=10)), input_size=(3, 64, 64))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def small_net() -> PhaseNet:
    """ResNet-18 at 32x32: still five sites (down to 1x1), a quarter of the work of ``net``."""
    torch.manual_seed(0)
    return PhaseNet(lively(torchvision.models.resnet18(num_classes=10)), input_size=(3, 32, 32))


@pytest.fixture(scope="module")
def small_x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_search(net: PhaseNet, x1: torch.Tensor, budget: int, space: list[int], score
                     ) -> tuple[list[tuple], dict[tuple, torch.Tensor]]:
    """Best-first search for one image, written plainly: every state is a full forward of the PhaseNet.

    Returns the states in the order they were added, and the logits of each (its plain forward).
    """
    zero = tuple([0] * len(net.sites))
    logits: dict[tuple, torch.Tensor] = {}

    def evaluate(state: tuple) -> torch.Tensor:
        logits[state] = net(x1, phases=torch.tensor([state]))[0]
        return logits[state]

    order = [zero]
    depth = {zero: 0}
    scores = {zero: score(evaluate(zero), zero)}
    while len(order) < budget:
        open_nodes = [s for s in order if depth[s] < len(space)]
        node = min(open_nodes, key=lambda s: (scores[s], order.index(s)))
        site = space[depth[node]]
        depth[node] += 1
        for p in range(1, net.sites[site].num_phases):
            if len(order) == budget:
                break
            child = list(node)
            child[site] = p
            child = tuple(child)
            order.append(child)
            depth[child] = depth[node]
            scores[child] = score(evaluate(child), child)
    return order, logits


class TestAgainstReference:
    @pytest.mark.parametrize("criterion", ["entropy", "delta"])
    def test_same_states_in_the_same_order(self, small_net: PhaseNet, small_x: torch.Tensor, criterion: str) -> None:
        net, x = small_net, small_x
        search = PhaseSearch(net, budget=15, criterion=criterion, aggregate="mean", aggregate_on="logits")
        result = search.run(x)
        space = [s.index for s in search.search_space]
        factors = [s.factor for s in net.sites]

        def score(logits: torch.Tensor, state: tuple) -> float:
            if criterion == "entropy":
                return float(normalized_entropy(logits))
            return float(displacement(torch.tensor([state]), factors, space[0]).sum())

        with torch.no_grad():
            for i in range(x.shape[0]):
                ref, single = reference_search(net, x[i:i + 1], 15, space, score)
                assert [tuple(s) for s in result.states[i].tolist()] == ref
                for j, state in enumerate(ref):  # candidate logits equal a plain forward at that state
                    torch.testing.assert_close(result.candidate_logits[i, j], single[state], rtol=1e-4, atol=1e-4)

    def test_criterion_changes_the_early_candidates(self, net: PhaseNet, x: torch.Tensor) -> None:
        """The published code sorts before scoring, so up to B≈4 every criterion gives the same set; not here."""
        sets = {c: PhaseSearch(net, budget=7, criterion=c, seed=3).run(x).states for c in ("entropy", "random")}
        assert not torch.equal(sets["entropy"], sets["random"])


class TestInvariants:
    def test_budget_one_is_the_plain_model_bit_for_bit(self, net: PhaseNet, x: torch.Tensor) -> None:
        with torch.no_grad():
            expected = net.model(x)
        for aggregate, on in [("mean", "features"), ("entropy", "logits")]:
            out = PhaseSearch(net, budget=1, aggregate=aggregate, aggregate_on=on)(x)
            assert torch.equal(out, expected)

    @pytest.mark.parametrize("criterion", ["entropy", "random", "delta"])
    def test_every_state_is_reachable(self, net: PhaseNet, x: torch.Tensor, criterion: str) -> None:
        search = PhaseSearch(net, budget=64, criterion=criterion, search_space=["maxpool", "layer2.0", "layer3.0"])
        states = search.run(x[:1]).states[0]
        assert {tuple(s) for s in states.tolist()} == {
            (0, a, b, c, 0) for a, b, c in itertools.product(range(4), repeat=3)
        }

    def test_smaller_budgets_are_prefixes(self, net: PhaseNet, x: torch.Tensor) -> None:
        search = PhaseSearch(net, budget=10, aggregate="entropy")
        both = search.run(x, budgets=[4, 10])
        alone = PhaseSearch(net, budget=4, aggregate="entropy").run(x)
        assert torch.equal(both.states[:, :4], alone.states)
        torch.testing.assert_close(both.logits[4], alone.logits[4])
        assert both.forward_equivalents_at(4) == pytest.approx(alone.forward_equivalents_at(4))

    def test_random_is_deterministic_for_a_seed(self, net: PhaseNet, x: torch.Tensor) -> None:
        a = PhaseSearch(net, budget=10, criterion="random", seed=5).run(x).states
        b = PhaseSearch(net, budget=10, criterion="random", seed=5).run(x).states
        c = PhaseSearch(net, budget=10, criterion="random", seed=6).run(x).states
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_cost_reuses_prefixes(self, net: PhaseNet, x: torch.Tensor) -> None:
        result = PhaseSearch(net, budget=15).run(x, budgets=[1, 15])
        assert result.forward_equivalents_at(1) == pytest.approx(1.0)
        assert 1.0 < result.forward_equivalents_at(15) < 15.0
        assert result.states_evaluated == 14 * x.shape[0]

    def test_aggregation_matches_a_direct_computation(self, net: PhaseNet, x: torch.Tensor) -> None:
        search = PhaseSearch(net, budget=7, aggregate="mean", align=False)
        result = search.run(x)
        with torch.no_grad():
            seg = net.head_segment
            feats = torch.stack([net.run_to(x, seg, net.encode_phases(result.states[:, j], x.shape[0]))[0]
                                 for j in range(7)], 1)
            expected = net.head(feats.mean(1))
        torch.testing.assert_close(result.logits[7], expected, rtol=1e-4, atol=1e-4)

    def test_default_search_space(self, net: PhaseNet) -> None:
        assert [s.name for s in PhaseSearch(net).search_space] == ["maxpool", "layer2.0", "layer3.0"]


class TestErrors:
    @pytest.mark.parametrize("budget", [0, 65, -3])
    def test_budget_out_of_range(self, net: PhaseNet, budget: int) -> None:
        with pytest.raises(ValueError, match=rf"budget {budget} out of range.*64 states"):
            PhaseSearch(net, budget=budget)

    def test_unknown_names_list_the_known(self, net: PhaseNet) -> None:
        with pytest.raises(ValueError, match="unknown criterion 'entropi'; choose one of: delta, entropy, learned, random"):
            PhaseSearch(net, criterion="entropi")
        with pytest.raises(ValueError, match="unknown aggregator 'median'; choose one of: entropy, learned, mean"):
            PhaseSearch(net, aggregate="median")
        with pytest.raises(ValueError, match="unknown site 'layer7'"):
            PhaseSearch(net, search_space=["layer7"])

    def test_model_without_sites(self) -> None:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        with pytest.raises(ValueError, match="no subsampling sites"):
            PhaseSearch(PhaseNet(model.eval(), input_size=(3, 8, 8)))


def align_reference(features: torch.Tensor, shift: torch.Tensor, factor: tuple[int, int]) -> torch.Tensor:
    """REFERENCE.md §1 literally: upsample by T (nearest), shift right/down with zero fill, average-pool T x T."""
    out = []
    for f, (dy, dx) in zip(features, shift.tolist()):
        up = F.interpolate(f[None], scale_factor=factor, mode="nearest")[0]
        moved = torch.zeros_like(up)
        h, w = up.shape[-2:]
        if dy < h and dx < w:
            moved[..., dy:, dx:] = up[..., : h - dy, : w - dx]
        out.append(F.avg_pool2d(moved[None], factor)[0])
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(th=st.sampled_from([2, 4, 8]), tw=st.sampled_from([2, 4]), h=st.integers(1, 5), w=st.integers(1, 5),
       data=st.data())
def test_align_equals_upsample_shift_pool(th: int, tw: int, h: int, w: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(1, 4))
    shift = torch.tensor([[data.draw(st.integers(0, th * 2)), data.draw(st.integers(0, tw * 2))] for _ in range(m)])
    feats = torch.randn(m, 3, h, w, dtype=torch.float64)
    torch.testing.assert_close(align(feats, shift, (th, tw)), align_reference(feats, shift, (th, tw)))


def test_displacement_uses_every_later_factor() -> None:
    factors = [(2, 2), (2, 2), (3, 3), (2, 2)]
    states = torch.tensor([[0, 3, 0, 0], [0, 1, 4, 0], [0, 0, 0, 3]])  # flat: dy * R_w + dx
    shift = displacement(states, factors, first=1)
    assert shift.tolist() == [[1, 1], [2, 3], [6, 6]]
    assert alignment_factor(factors, first=1) == (12, 12)
