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
    import polyglean.training.aggregator as training

    real, calls = training.train_epoch, []

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # interrupted during the second epoch: the first one's checkpoint
        mp.setattr(training, "train_epoch", crash_in_epoch_two)
        assert main([*argv, "--epochs", "2"]) == 130
    assert torch.load(out, weights_only=True)["epoch"] == 0
    # resume to the second epoch, reusing the cached candidates
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
    assert main(["train-aggregator", "--model", "cifar10-resnet20", "--data", test, "--device", "cpu",
                 "--precision", "bf16", "--out", str(tmp_path / "b.pt")]) == 2
    assert "trained in fp32 only" in capsys.readouterr().err
    assert main(["train-aggregator", "--model", "cifar10-resnet20", "--data", test, "--device", "nonsense",
                 "--out", str(tmp_path / "c.pt")]) == 2
    assert "unknown device 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "c.pt").exists()


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


def _base(shared_data: Path, out: Path, cache: Path, *extra: str, **options: str) -> list[str]:
    """The fixture's run (2 epochs) writing to ``out``; ``options`` replace its values (``lr="0.01"``)."""
    train = str(shared_data / "cifar10-jpeg" / "train")
    values = {"subset": "0:48", "val_subset": "48:80", "batch_size": "16", "epochs": "2", **options}
    argv = ["train-aggregator", "--model", "cifar10-resnet20", "--data", train, "--val-data", train, "--out",
            str(out), "--cache", str(cache), "--no-progress", *extra]
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return argv


@pytest.mark.slow
def test_cold_and_warm_cache_and_resume_give_the_same_module(shared_data: Path, trained: Path,
                                                             tmp_path: Path) -> None:
    cold, warm = tmp_path / "cold.pt", tmp_path / "warm.pt"
    assert main(_base(shared_data, cold, tmp_path / "fresh-cache", "--workers", "0")) == 0  # searches again
    assert main(_base(shared_data, warm, trained.parent / "cache")) == 0  # the fixture's cached candidates
    resumed = torch.load(trained, weights_only=True)["state_dict"]  # interrupted and resumed, warm cache
    for other in (cold, warm):
        state = torch.load(other, weights_only=True)["state_dict"]
        for key, value in resumed.items():
            assert torch.equal(state[key], value), (other.name, key)


def test_resume_refuses_other_settings_and_keeps_the_metadata(shared_data: Path, trained: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = trained.read_bytes()
    cache = trained.parent / "cache"
    for options, message in [({"lr": "0.01"}, "lr=0.001 (now 0.01)"),
                             ({"subset": "0:40"}, "subset='0:48' (now '0:40')"),
                             ({"epochs": "3"}, "epochs=2 (now 3)"),
                             ({"dim": "32"}, "dim=64 (now 32)")]:
        assert main(_base(shared_data, trained, cache, "--resume", **options)) == 2, options
        assert message in capsys.readouterr().err
    assert main(_base(shared_data, trained, cache, "--resume")) == 0  # finished: nothing left to train
    assert "has already trained 2 of 2 epochs; nothing to do" in capsys.readouterr().out
    assert trained.read_bytes() == before  # never rewritten by a refused or empty resume


def test_an_existing_checkpoint_is_never_overwritten_silently(shared_data: Path, trained: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agg.pt"
    out.write_bytes(trained.read_bytes())
    argv = _base(shared_data, out, trained.parent / "cache")
    assert main(argv) == 2
    assert "exists; pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == trained.read_bytes()
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--epochs", "1"]) == 0
    assert torch.load(out, weights_only=True)["meta"]["training"]["epochs"] == 1
