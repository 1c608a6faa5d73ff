"""TTA aggregators: Mean/Max exact, GPS picks the best view, AugTTA/ClassTTA weights, fitted state on disk."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polyglean.errors import CheckpointError
from polyglean.tta import (
    GPS,
    TTA_AGGREGATORS,
    AugTTA,
    ClassTTA,
    FitError,
    MaxTTA,
    MeanTTA,
    calibrated_nll,
    fit_key,
    load_fitted,
    save_fitted,
)


def _toy(n: int = 400, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three views: 0 is noise, 1 knows the label, 2 points at a wrong class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    onehot = F.one_hot(y, k).float()
    noise = torch.randn(n, 3, k, generator=g)
    views = torch.stack([noise[:, 0], 3.0 * onehot + noise[:, 1], 3.0 * F.one_hot((y + 1) % k, k) + noise[:, 2]], 1)
    return views, y


def test_registry() -> None:
    assert TTA_AGGREGATORS.names() == ["augtta", "classtta", "gps", "max", "mean"]
    with pytest.raises(ValueError, match="unknown TTA aggregator 'median'; choose one of: augtta"):
        TTA_AGGREGATORS.get("median")


def test_mean_and_max_exact() -> None:
    z = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # (1, 2, 3)
    p = z.softmax(-1)
    assert torch.allclose(MeanTTA()(z), p.mean(1).log(), atol=1e-7)
    assert torch.allclose(MaxTTA()(z), p.log().amax(1), atol=1e-7)
    # hand values: softmax([1,0,0]) = (e, 1, 1)/(e+2)
    e = math.e
    first = torch.tensor([e, 1.0, 1.0]) / (e + 2)
    second = torch.tensor([1.0, e * e, 1.0]) / (e * e + 2)
    assert torch.allclose(MeanTTA()(z)[0].exp(), (first + second) / 2, atol=1e-6)
    assert torch.allclose(MaxTTA()(z)[0].exp(), torch.maximum(first, second), atol=1e-6)


def test_budget_uses_the_first_views() -> None:
    z, _ = _toy(20)
    assert torch.allclose(MeanTTA(2)(z), MeanTTA()(z[:, :2]))
    assert torch.allclose(MeanTTA(1)(z), torch.log_softmax(z[:, 0], -1))
    assert MeanTTA(2).views(3) == [0, 1]
    with pytest.raises(ValueError, match="TTA budget 4 exceeds the policy's 3 views"):
        MeanTTA(4)(z)
    with pytest.raises(ValueError, match="TTA budget must be an int >= 1"):
        MeanTTA(0)
    with pytest.raises(ValueError, match=r"logits \(N, A, K\)"):
        MeanTTA()(z[:, 0])


def test_gps_picks_the_informative_view() -> None:
    z, y = _toy()
    gps = GPS(1).fit(z, y)
    assert gps.selected == [1]
    assert gps.views(3) == [1]
    assert torch.allclose(gps(z), torch.log_softmax(z[:, 1], -1), atol=1e-6)
    more = GPS(3).fit(z, y)
    assert more.selected[0] == 1 and 2 not in more.selected  # the misleading view never helps
    assert more.temperature is not None and more.temperature > 0


def test_gps_with_replacement_weights_repeats() -> None:
    z, y = _toy(50)
    gps = GPS(3)
    gps.load_state_dict({"name": "gps", "budget": 3, "num_views": 3, "selected": [1, 1, 0], "temperature": 1.0})
    p = z.softmax(-1)
    assert torch.allclose(gps(z).exp(), (2 * p[:, 1] + p[:, 0]) / 3, atol=1e-6)


def test_calibrated_nll_finds_the_temperature() -> None:
    z, y = _toy(2000, seed=3)
    logp = torch.log_softmax(5.0 * z[:, 1], -1)  # over-confident
    nll, t = calibrated_nll(logp, y)
    assert nll < F.cross_entropy(logp, y).item() - 0.02
    assert t > 1.2
    for other in (t * 0.8, t * 1.25):
        assert nll <= F.cross_entropy(logp / other, y).item() + 1e-6


@pytest.mark.parametrize("cls", [AugTTA, ClassTTA])
def test_weights_nonnegative_normalised_and_improve_nll(cls: type) -> None:
    z, y = _toy()
    held, held_y = _toy(seed=1)
    agg = cls().fit(z, y)
    w = agg.weights
    assert (w >= 0).all()
    assert torch.allclose(w.sum(0), torch.ones(w.shape[1:]), atol=1e-5)
    uniform = F.cross_entropy(z.mean(1), y).item()
    assert F.cross_entropy(agg(z), y).item() < uniform - 0.3
    assert F.cross_entropy(agg(held), held_y).item() < F.cross_entropy(held.mean(1), held_y).item() - 0.3
    view_weight = w if w.dim() == 1 else w.mean(1)
    assert int(view_weight.argmax()) == 1
    again = cls().fit(z, y)
    assert again.theta.equal(agg.theta)  # deterministic


def test_classtta_weights_per_class() -> None:
    z, y = _toy()
    z = z.clone()
    z[:, 0, 0] += 3.0 * (y == 0).float()  # view 0 is informative for class 0 only
    agg = ClassTTA().fit(z, y)
    assert agg.weights.shape == (3, 5)
    assert agg.weights[0, 0] > agg.weights[0, 1:].max()


@pytest.mark.parametrize("name", ["gps", "augtta", "classtta"])
def test_unfitted_refused(name: str) -> None:
    z, _ = _toy(10)
    with pytest.raises(FitError, match="must be fitted"):
        TTA_AGGREGATORS.get(name)()(z)


def test_save_load_round_trip(tmp_path: Path) -> None:
    z, y = _toy()
    fits = {fit_key("gps", 2, 1): GPS(2).fit(z, y), fit_key("augtta", None, 4): AugTTA().fit(z, y),
            fit_key("classtta", None, 1): ClassTTA().fit(z, y)}
    path = tmp_path / "tta.pt"
    views = ["identity", "hflip", "scale(1.2)"]
    save_fitted(path, fits, model="cifar10-resnet20", policy="p", views=views)
    raw = torch.load(path, weights_only=True)
    assert raw["model"] == "cifar10-resnet20" and raw["policy"] == "p" and raw["views"] == views
    states = load_fitted(path, model="cifar10-resnet20", policy="p", views=views)
    assert set(states) == {"gps:views=2:phase=1", "augtta:views=all:phase=4", "classtta:views=all:phase=1"}
    for key, agg in fits.items():
        fresh = TTA_AGGREGATORS.get(key.split(":")[0])(agg.budget)
        fresh.load_state_dict(states[key])
        assert fresh(z).equal(agg(z)), key


def test_mismatch_refused(tmp_path: Path) -> None:
    z, y = _toy(50)
    path = tmp_path / "tta.pt"
    save_fitted(path, {"augtta": AugTTA().fit(z, y)}, model="cifar10-resnet20", policy="flip",
                views=["identity", "hflip", "x"])
    with pytest.raises(FitError, match="fitted for model 'cifar10-resnet20', not 'cifar10-resnet56'"):
        load_fitted(path, model="cifar10-resnet56", policy="flip", views=["identity", "hflip", "x"])
    with pytest.raises(FitError, match="fitted for policy 'flip', not 'ten-crop'"):
        load_fitted(path, model="cifar10-resnet20", policy="ten-crop", views=["identity", "hflip", "x"])
    with pytest.raises(FitError, match="fitted on views"):
        load_fitted(path, model="cifar10-resnet20", policy="flip", views=["identity", "hflip"])
    with pytest.raises(CheckpointError, match="does not exist"):  # the error family, not a bare FileNotFoundError
        load_fitted(tmp_path / "nope.pt", model="m", policy="flip", views=[])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(FitError, match="not a polyglean TTA weights file"):
        load_fitted(other, model="m", policy="flip", views=[])
    state = AugTTA().fit(z, y).state_dict()
    with pytest.raises(FitError, match="budget"):
        AugTTA(2).load_state_dict(state)
    with pytest.raises(FitError, match="'augtta' loaded into a 'classtta'"):
        ClassTTA().load_state_dict(state)
    with pytest.raises(ValueError, match="fitted on 3 views"):
        AugTTA().fit(z, y)(z[:, :2])
