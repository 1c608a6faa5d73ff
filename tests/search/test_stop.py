"""Adaptive budgets: early stop per image, real savings, calibration to a target cost."""

from __future__ import annotations

import pytest
import torch

from polyglean.errors import ArgumentError
from polyglean.models.cifar_resnet import cifar_resnet20
from polyglean.phase.net import PhaseNet
from polyglean.search import PhaseSearch, calibrate_stop, parse_stop
from polyglean.search.stop import AnyStop, ConfidenceStop, StableStop, calibrate_threshold


@pytest.fixture(scope="module")
def net() -> PhaseNet:
    torch.manual_seed(0)
    return PhaseNet(cifar_resnet20().eval(), (3, 32, 32))


def test_stopped_at_one_is_the_plain_model_bit_for_bit(net: PhaseNet) -> None:
    x = torch.randn(10, 3, 32, 32)
    full = PhaseSearch(net, budget=10, aggregate="mean").run(x, budgets=[1, 10])
    conf = torch.softmax(full.logits[1], -1).amax(-1)
    t = float(conf.sort().values[5])
    result = PhaseSearch(net, budget=10, aggregate="mean", stop=f"confidence:{t}").run(x, budgets=[10])
    stopped = conf >= t
    assert 0 < int(stopped.sum()) < 10
    assert torch.equal(result.counts, torch.where(stopped, 1, 10))
    with torch.no_grad():
        plain = net.model(x)
    assert torch.equal(result.logits[10][stopped], plain[stopped])
    torch.testing.assert_close(result.logits[10][~stopped], full.logits[10][~stopped], rtol=1e-5, atol=1e-5)
    # the stopped images' searches were not run: their cost is one forward each
    per_forward = full.forward_flops / 10
    cost = result.image_flops_by_budget[10] / per_forward
    assert torch.allclose(cost[stopped], torch.ones(int(stopped.sum()), dtype=cost.dtype))
    assert torch.allclose(cost[~stopped], (full.image_flops_by_budget[10] / per_forward)[~stopped])
    assert result.states_evaluated == full.states_evaluated * int((~stopped).sum()) // 10


def test_stable_rule_stops_when_the_aggregate_settles(net: PhaseNet) -> None:
    x = torch.randn(6, 3, 32, 32)
    result = PhaseSearch(net, budget=16, aggregate="mean", stop="stable:1").run(x, budgets=[16])
    full = PhaseSearch(net, budget=16, aggregate="mean").run(x, budgets=[16])
    assert result.counts is not None and int(result.counts.min()) >= 4  # one expansion at least
    assert result.flops_by_budget[16] < full.flops_by_budget[16]


def test_budget_one_never_changes(net: PhaseNet) -> None:
    x = torch.randn(3, 3, 32, 32)
    result = PhaseSearch(net, budget=4, stop="confidence:0.0").run(x, budgets=[1, 4])
    with torch.no_grad():
        assert torch.equal(result.logits[4], net.model(x))


def test_calibration_hits_the_target_cost(net: PhaseNet) -> None:
    x = torch.randn(40, 3, 32, 32) * 2
    search = PhaseSearch(net, budget=10, aggregate="mean")
    full = search.run(x, budgets=[10])
    full_cost = full.forward_equivalents_at(10)
    target = 1 + (full_cost - 1) / 2
    rule, info = calibrate_stop(search, [x[:20], x[20:]], target)
    assert abs(info["achieved"] - target) / target <= 0.10
    adaptive = PhaseSearch(net, budget=10, aggregate="mean", stop=rule).run(x, budgets=[10])
    assert adaptive.forward_equivalents_at(10) == pytest.approx(info["achieved"], rel=1e-6)


def test_calibrate_threshold_by_hand() -> None:
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    cost = torch.tensor([5.0, 5.0, 5.0, 5.0])
    # stopping the two most confident: (1 + 1 + 5 + 5) / 4 = 3
    t = calibrate_threshold(conf, cost, 3.0)
    assert 0.7 < t <= 0.8
    with pytest.raises(ArgumentError, match="outside what the rule can reach"):
        calibrate_threshold(conf, cost, 6.0)


@pytest.mark.parametrize("text, match", [("confidence", "NAME:VALUE"), ("confidence:2", "out of range"),
                                         ("nope:1", "unknown stop rule"), ("stable:1.5", "whole number")])
def test_bad_rules(text: str, match: str) -> None:
    with pytest.raises(ArgumentError, match=match):
        parse_stop(text)


def test_combined_rules() -> None:
    rule = parse_stop("confidence:0.9+stable:2")
    assert isinstance(rule, AnyStop) and rule.watches_aggregate
    assert isinstance(rule.rules[0], ConfidenceStop) and isinstance(rule.rules[1], StableStop)
