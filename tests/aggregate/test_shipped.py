"""The aggregators shipped in the package: present, loadable, and made for the presets' own weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyglean.aggregate import load_aggregator, model_fingerprint, shipped_aggregator
from polyglean.cli.main import main
from polyglean.models import load_model

SHIPPED = ["cifar10-resnet20", "imagenet-efficientnet-lite0"]


@pytest.mark.parametrize("preset", SHIPPED)
def test_shipped_and_loadable(preset: str) -> None:
    path = shipped_aggregator(preset)
    assert path is not None, f"no aggregator shipped for {preset}"
    module = load_aggregator(path, model=preset)
    assert module.meta["training"]["criterion"] == "random"
    assert path.stat().st_size < 4_000_000  # small enough to ship
    assert shipped_aggregator("cifar10-resnet32") is None


@pytest.mark.data
@pytest.mark.parametrize("preset", SHIPPED)
def test_made_for_the_preset_weights(shared_data: Path, preset: str) -> None:
    model, _ = load_model(preset)
    fingerprint = model_fingerprint(model)
    module = load_aggregator(shipped_aggregator(preset), model=preset, fingerprint=fingerprint)  # else it raises
    assert module.meta["model_sha256"] == fingerprint


@pytest.mark.data
def test_eval_uses_the_shipped_one(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "cifar10-resnet20", "--data", str(shared_data / "cifar10-jpeg" / "test"),
                 "--limit", "8", "--budgets", "1,4", "--aggregate", "learned", "--json", str(out),
                 "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    assert payload["config"]["aggregators"]["aligned"]["path"] == str(shipped_aggregator("cifar10-resnet20"))


def test_resnet20_aggregator_never_saw_the_report_images() -> None:
    """The shipped ResNet-20 module was trained on positions 0-1599 of lossless cifar10/test and validated on
    1600-1999; the README reports on 2000-4999, and cifar10/train (the model's own training data) is not used."""
    module = load_aggregator(shipped_aggregator("cifar10-resnet20"), model="cifar10-resnet20")
    training = module.meta["training"]
    assert Path(training["train"]["data"]).parts[-2:] == ("cifar10", "test")
    assert training["train"]["subset"] == "0:1600" and training["val"]["subset"] == "1600:2000"
    assert Path(training["val"]["data"]).parts[-2:] == ("cifar10", "test")
