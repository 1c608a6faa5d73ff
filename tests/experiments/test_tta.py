"""``evaluate_tta``: the view cache is keyed on content (weights, images, settings), never on paths; the image
selection is honoured; fitted aggregators need exactly one source of fits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from polyglean.data import ImageDataset
from polyglean.errors import ArgumentError
from polyglean.experiments import ImageSelection, TTAConfig, evaluate_tta, select_images
from polyglean.phase.net import PhaseNet
from polyglean.tta import ViewCache
from tests.experiments.conftest import tiny_model


def _run(model: torch.nn.Module, preprocess, dataset, cache: Path | None, **kw):  # type: ignore[no-untyped-def]
    config = TTAConfig(tta=("none", "mean"), policy="flip", phase_budgets=(1, 2), batch_size=5, cache=cache,
                       model_id="tiny", **kw)
    return evaluate_tta(PhaseNet(model, (3, 16, 16)), preprocess, dataset, config)


def _scores(result) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    return [(r["top1"], round(r["nll"], 6)) for r in result.rows]


def test_cache_is_keyed_on_content(folder: Path, preprocess, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    data = ImageDataset(folder, preprocess)
    first = _run(tiny_model(0), preprocess, data, cache)
    files = set(cache.glob("*"))
    assert len(files) == 2 and all(f.suffix == ".pt" for f in files)  # one per view, no temporary left behind
    assert _scores(_run(tiny_model(0), preprocess, data, cache)) == _scores(first)
    assert set(cache.glob("*")) == files  # served from the cache

    # other weights under the same name: searched again, equal to a run without the cache
    retrained = _run(tiny_model(1), preprocess, data, cache)
    assert _scores(retrained) == _scores(_run(tiny_model(1), preprocess, data, None))
    assert _scores(retrained) != _scores(first)
    assert len(set(cache.glob("*.pt"))) == 4

    # an image replaced in place (same path): searched again
    victim = folder / "a" / "0.png"
    Image.fromarray((torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()).save(victim)
    os.utime(victim, ns=(1, 1))
    replaced = _run(tiny_model(0), preprocess, ImageDataset(folder, preprocess), cache)
    assert len(set(cache.glob("*.pt"))) == 6
    assert _scores(replaced) == _scores(_run(tiny_model(0), preprocess, ImageDataset(folder, preprocess), None))

    # a setting that changes the logits (the criterion) and another image selection get their own entries
    _run(tiny_model(0), preprocess, ImageDataset(folder, preprocess), cache, criterion="random")
    assert len(set(cache.glob("*.pt"))) == 8
    part = select_images(ImageDataset(folder, preprocess), ImageSelection(part="odd"))
    assert _run(tiny_model(0), preprocess, part, cache).rows[0]["n_images"] == 6
    assert len(set(cache.glob("*.pt"))) == 10


def test_cache_entry_with_another_key_is_not_served(tmp_path: Path) -> None:
    from polyglean.tta import ViewLogits

    views = ViewLogits(["identity"], [1], torch.randn(1, 1, 4, 3), torch.ones(1, 1), torch.ones(1, 1), 1.0,
                       torch.zeros(4, dtype=torch.long))
    ViewCache(tmp_path, {"model_sha256": "a"}).put(views)
    assert ViewCache(tmp_path, {"model_sha256": "a"}).get("identity", [1], 4) is not None
    assert ViewCache(tmp_path, {"model_sha256": "b"}).get("identity", [1], 4) is None
    # a file planted under the right name but holding another key is ignored
    other = ViewCache(tmp_path, {"model_sha256": "c"})
    os.replace(ViewCache(tmp_path, {"model_sha256": "a"}).path("identity", 4), other.path("identity", 4))
    assert other.get("identity", [1], 4) is None


def test_selection_is_honoured(folder: Path, preprocess) -> None:  # type: ignore[no-untyped-def]
    data = select_images(ImageDataset(folder, preprocess), ImageSelection(subset=(0, 5)))
    result = _run(tiny_model(0), preprocess, data, None)
    assert {r["n_images"] for r in result.rows} == {5}
    assert result.rows[0]["delta_top1"] == 0 and result.rows[0]["mcnemar_p"] == 1.0


def test_fit_sources(folder: Path, preprocess) -> None:  # type: ignore[no-untyped-def]
    net = PhaseNet(tiny_model(0), (3, 16, 16))
    data = ImageDataset(folder, preprocess)
    with pytest.raises(ArgumentError, match="must be fitted"):
        evaluate_tta(net, preprocess, data, TTAConfig(tta=("augtta",)))
    with pytest.raises(ArgumentError, match="must be fitted"):
        evaluate_tta(net, preprocess, data, TTAConfig(tta=("augtta",)), fit_dataset=data, fitted_states={})
    with pytest.raises(ArgumentError, match="fits nothing"):
        evaluate_tta(net, preprocess, data, TTAConfig(tta=("mean",)), fitted_states={})
    with pytest.raises(ArgumentError, match="named twice"):
        TTAConfig(tta=("mean", "mean"))


@pytest.mark.parametrize("kwargs, message", [
    ({"view_budgets": ()}, "no view budget given"),
    ({"view_budgets": (0, 2)}, "--tta-budget must be >= 1, got 0"),
    ({"phase_budgets": (0,)}, "budget 0 out of range"),
    ({"tta": ()}, "no TTA aggregator named"),
    ({"tta": ("median",)}, "unknown TTA aggregator 'median'"),
    ({"aggregate": "learned"}, "needs its trained aggregator"),
])
def test_bad_tta_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        TTAConfig(**kwargs)
