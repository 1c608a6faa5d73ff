"""``polyglean train-aggregator`` and ``eval --aggregate learned`` on real CIFAR-10 images and ResNet-20."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyglean.aggregate import load_aggregator, shipped_aggregator
from polyglean.cli.main import main

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def trained(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agg") / "agg.pt"
    train = str(shared_data / "cifar10-jpeg" / "train")
    argv = ["train-aggregator", "--model", "cifar10-resnet20", "--data", train, "--subset", "0:48",
            "--val-data", train, "--val-subset", "48:80", "--batch-size", "16", "--out", str(out),
            "--cache", str(out.parent / "cache"), "--no-progress"]
    assert main([*argv, "--epochs", "1"]) == 0
    # resume to a second epoch, reusing the cached candidates
    assert main([*argv, "--epochs", "2", "--resume", "--export", str(out.parent / "slim.pt")]) == 0
    return out


def test_checkpoint_records_training_and_resumes(trained: Path) -> None:
    payload = torch.load(trained, weights_only=True)
    assert payload["epoch"] == 1 and [h["epoch"] for h in payload["history"]] == [1, 2]
    assert payload["meta"]["model"] == "cifar10-resnet20"
    assert payload["meta"]["search_space"] == ["layer2.0", "layer3.0"] and payload["meta"]["align"] is True
    assert payload["meta"]["training"]["budget"] == 16  # capped at the 16 states of the search space
    assert "optimizer" in payload
    slim = torch.load(trained.parent / "slim.pt", weights_only=True)
    assert "optimizer" not in slim
    assert len(list((trained.parent / "cache").glob("candidates-*.pt"))) == 2


def test_eval_learned(shared_data: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "cifar10-resnet20", "--data", str(shared_data / "cifar10-jpeg" / "test"),
                 "--limit", "20", "--budgets", "1,4,10", "--aggregate", "mean,learned", "--criterion", "learned",
                 "--aggregator", str(trained), "--json", str(out), "--no-progress"]) == 0
    rows = {(r["aggregate"], r["budget"]): r for r in json.loads(out.read_text())["results"]}
    assert rows[("learned", 1)]["top1"] == rows[("mean", 1)]["top1"]
    assert {a for a, _ in rows} == {"mean", "learned", "learned@default"}  # + the module on the default state alone
    module = load_aggregator(trained)
    assert module.meta["model"] == "cifar10-resnet20"


def test_refusals(shared_data: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = str(shared_data / "cifar10-jpeg" / "test")
    assert main(["eval", "--model", "cifar10-resnet32", "--data", test, "--limit", "4", "--aggregate", "learned",
                 "--aggregator", str(trained), "--no-progress"]) == 2
    assert "trained for model 'cifar10-resnet20', not 'cifar10-resnet32'" in capsys.readouterr().err
    if shipped_aggregator("cifar10-resnet32") is None:
        assert main(["eval", "--model", "cifar10-resnet32", "--data", test, "--limit", "4", "--aggregate",
                     "learned", "--no-progress"]) == 2
        assert "no trained aggregator ships" in capsys.readouterr().err
    assert main(["train-aggregator", "--model", "cifar10-resnet20", "--data", test, "--out", str(trained)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train-aggregator", "--model", "cifar10-resnet20", "--data", test, "--epochs", "0",
                 "--out", str(tmp_path / "a.pt")]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_holdout(shared_data: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = str(shared_data / "cifar10-jpeg" / "train")
    base = ["train-aggregator", "--model", "cifar10-resnet20", "--data", train, "--subset", "0:48", "--epochs", "1",
            "--cache", str(trained.parent / "cache"), "--no-progress"]  # the candidates cached by the fixture
    assert main([*base, "--holdout", "16", "--out", str(tmp_path / "h.pt")]) == 0
    meta = torch.load(tmp_path / "h.pt", weights_only=True)["meta"]["training"]
    assert meta["train"]["images"] == 32 and meta["val"]["images"] == 16 and meta["val"]["holdout"] == 16
    assert "val top-1" in capsys.readouterr().out
    assert main([*base, "--holdout", "48", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--holdout must be between 1 and 47" in capsys.readouterr().err
    assert main([*base, "--holdout", "8", "--val-data", train, "--out", str(tmp_path / "y.pt")]) == 2
    assert "either --val-data or --holdout" in capsys.readouterr().err
