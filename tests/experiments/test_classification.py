"""``evaluate_classification``: budget 1 is the plain model, per-image outcomes, differences against budget 1 with
their interval and McNemar's p, and bad configurations refused before any work."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from polyglean.errors import ArgumentError, DataError
from polyglean.experiments import ClassificationConfig, evaluate_classification
from polyglean.phase.net import PhaseNet
from polyglean.stats import mcnemar, paired_bootstrap
from tests.experiments.conftest import tiny_model


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_rows_outcomes_and_differences() -> None:
    model = tiny_model()
    x, y = _data()
    config = ClassificationConfig(budgets=(1, 4, 16), aggregates=("mean", "entropy"), aligns=(True, False),
                                  batch_size=7)
    result = evaluate_classification(PhaseNet(model, (3, 16, 16)), TensorDataset(x, y), config)
    assert [(r["aggregate"], r["align"], r["budget"]) for r in result.rows] == [
        (a, al, b) for a in ("mean", "entropy") for al in (True, False) for b in (1, 4, 16)]
    with torch.no_grad():
        plain = model(x)
    assert result.labels.equal(y)
    for key, out in result.outcomes.items():
        assert out.correct.shape == out.nll.shape == out.pred.shape == (24,)
        if key[2] == 1:  # budget 1 is the plain model, bit for bit
            assert out.pred.equal(plain.argmax(-1))
            assert out.nll.equal(torch.nn.functional.cross_entropy(plain, y, reduction="none"))
    reference = result.outcomes[("mean", True, 1)]
    for r in result.rows:
        out = result.outcomes[(r["aggregate"], r["align"], r["budget"])]
        assert r["top1"] == pytest.approx(100 * out.correct.float().mean().item())
        assert r["delta_top1"] == pytest.approx(r["top1"] - 100 * reference.correct.float().mean().item())
        low, high = r["delta_top1_ci"]
        assert low <= r["delta_top1"] + 1e-9 and r["delta_top1"] - 1e-9 <= high
        expect = paired_bootstrap(reference.nll, out.nll, seed=0)
        assert r["delta_nll"] == pytest.approx(expect.delta) and r["delta_nll_ci"] == [expect.low, expect.high]
        test = mcnemar(reference.correct, out.correct)
        assert (r["fixed"], r["broken"], r["mcnemar_p"]) == (test.fixed, test.broken, test.p_value)
        if r["budget"] == 1:
            assert r["delta_top1"] == 0 and r["mcnemar_p"] == 1.0 and r["forward_equivalents"] == 1.0
    assert result.search_space == ["2", "4"] and any(r["delta_nll"] != 0 for r in result.rows)


def test_budget_one_is_always_the_reference() -> None:
    x, y = _data(10)
    config = ClassificationConfig(budgets=(4,), aggregates=("mean",), batch_size=5)
    result = evaluate_classification(PhaseNet(tiny_model(), (3, 16, 16)), TensorDataset(x, y), config)
    assert [r["budget"] for r in result.rows] == [4]  # only what was asked for is reported ...
    assert {"fixed", "broken", "delta_top1", "mcnemar_p"} <= set(result.rows[0])  # ... against the plain model


@pytest.mark.parametrize("kwargs, message", [
    ({"aggregates": ("mean", "mean")}, "aggregate 'mean' is named twice"),
    ({"aggregates": ("median",)}, "unknown aggregator 'median'"),
    ({"budgets": (0, 4)}, "budget 0 out of range"),
    ({"budgets": (4, 1)}, "ascending"),
    ({"aligns": (True,), "aggregate_on": "logits"}, "logits cannot be aligned"),
    ({"aggregates": ("learned",)}, "needs a trained aggregator"),
    ({"learned": {True: object()}}, "neither the aggregates nor the criterion is 'learned'"),
    ({"batch_size": 0}, "batch size must be >= 1"),
])
def test_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        ClassificationConfig(**kwargs)


def test_budget_beyond_the_states_and_empty_data() -> None:
    net = PhaseNet(tiny_model(), (3, 16, 16))
    x, y = _data(4)
    with pytest.raises(ArgumentError, match="budget 99 out of range"):
        evaluate_classification(net, TensorDataset(x, y), ClassificationConfig(budgets=(1, 99)))
    with pytest.raises(DataError, match="empty"):
        evaluate_classification(net, TensorDataset(x[:0], y[:0]), ClassificationConfig(budgets=(1, 4)))
    with pytest.raises(DataError, match="label 7 out of range"):
        evaluate_classification(net, TensorDataset(x, torch.full((4,), 7)), ClassificationConfig(budgets=(1, 4)))
