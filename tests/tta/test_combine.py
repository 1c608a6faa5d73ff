"""TTA over phase search: every view searched, then aggregated; B_total = B_image x B_phase and its cost."""

from __future__ import annotations

import pytest
import torch

from polyglean import PhaseNet, PhaseSearch
from polyglean.models.cifar_resnet import cifar_resnet
from polyglean.tta import AugmentedSearch, AugTTA, MeanTTA, ViewLogits, build_policy, search_views
from polyglean.tta.aggregators import FitError


@pytest.fixture(scope="module")
def search() -> PhaseSearch:
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    return PhaseSearch(PhaseNet(model, (3, 32, 32)), budget=4)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_views_at_phase_budget_one_are_the_plain_model(search: PhaseSearch, x: torch.Tensor) -> None:
    policy = build_policy("flip", (3, 32, 32))
    with torch.no_grad():
        plain = torch.stack([search.net.model(x), search.net.model(x.flip(-1))], 1)
    views = search_views(search, policy, x, [1, 2, 4])
    assert views.logits.shape == (2, 3, 3, 10)
    assert views.at(1).equal(plain)
    assert views.cost([0, 1], 1)[0] == pytest.approx(2.0)
    assert views.cost([0], 4)[0] > views.cost([0], 2)[0] > 1.0
    searched = search.run(x.flip(-1), budgets=[4]).logits[4]
    assert views.at(4)[:, 1].equal(searched)


def test_augmented_search(search: PhaseSearch, x: torch.Tensor) -> None:
    policy = build_policy("ten-crop", (3, 32, 32))
    tta = AugmentedSearch(search, policy, MeanTTA(2))
    out = tta.run(x, budgets=[1, 4])
    assert out.views == [0, 1]
    with torch.no_grad():
        plain = torch.stack([search.net.model(x), search.net.model(policy[1](x))], 1)
    assert torch.allclose(out.logits[1], torch.log_softmax(plain, -1).exp().mean(1).log(), atol=1e-6)
    one = search.run(x, budgets=[4])
    assert out.forward_equivalents[1] == pytest.approx(2.0)
    assert out.forward_equivalents[4] == pytest.approx(2 * one.forward_equivalents_at(4), rel=0.02)
    assert out.seconds[4] >= out.seconds[1] > 0


def test_fitted_aggregator_searches_only_its_views(search: PhaseSearch, x: torch.Tensor) -> None:
    policy = build_policy("flip", (3, 32, 32))
    tta = AugmentedSearch(search, policy, AugTTA())
    with pytest.raises(FitError, match="augtta must be fitted"):
        tta.run(x, budgets=[1])
    tta.fit(x, torch.tensor([0, 1, 2]), budget=2)
    out = tta.run(x, budgets=[2])
    assert out.logits[2].shape == (3, 10) and out.views == [0, 1]


def test_view_logits_select_and_errors(search: PhaseSearch, x: torch.Tensor) -> None:
    views = search_views(search, build_policy("flip", (3, 32, 32)), x, [1])
    one = views.select(["hflip"])
    assert one.views == ["hflip"] and one.logits.equal(views.logits[1:])
    with pytest.raises(ValueError, match="phase budget 2 was not computed"):
        views.at(2)
    with pytest.raises(ValueError, match="not computed"):
        views.select(["scale(2)"])
    assert isinstance(ViewLogits.stack([one, views.select(["identity"])]), ViewLogits)


def test_collect_then_aggregate_equals_run(search: PhaseSearch, x: torch.Tensor, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from polyglean.tta import ViewCache

    policy = build_policy("flip", (3, 32, 32))
    tta = AugmentedSearch(search, policy, MeanTTA())
    y = torch.tensor([0, 1, 2])
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    cache = ViewCache(tmp_path, {"model": "test"})
    views = tta.collect(batches, [1, 4], total=3, cache=cache)
    assert views.views == ["identity", "hflip"] and views.labels.equal(y)
    out, ran = tta.aggregate(views, [1, 4]), tta.run(x, budgets=[1, 4])
    for b in (1, 4):
        assert torch.allclose(out.logits[b], ran.logits[b], atol=1e-6)
    assert out.forward_equivalents[1] == pytest.approx(2.0)

    def never() -> object:
        raise AssertionError("the cache should have served every view")
        yield  # pragma: no cover

    again = tta.collect(never(), [1], total=3, cache=cache)  # a smaller budget from the entries of [1, 4]
    assert again.at(1).equal(views.at(1)) and again.labels.equal(y)
