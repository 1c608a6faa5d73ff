"""``polyglean train --phase-augment``: a few steps on real CIFAR images; settings recorded, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyglean.cli.main import main
from tests.folders import link_class_folders

pytestmark = [pytest.mark.data]


@pytest.fixture(scope="module")
def tiny(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 real lossless CIFAR-10 training images (two of each of 8 classes) as links in class folders."""
    return link_class_folders(shared_data / "cifar10" / "train", tmp_path_factory.mktemp("tiny"), classes=8,
                              per_class=2)


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", "cifar10-resnet20", "--data", str(data), "--batch-size", "8", "--no-progress",
                 "--lr", "0.05", "--out", str(out), *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_phase_augmented_training(shared_data: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    plain, zero, phased = tmp_path / "plain.pt", tmp_path / "zero.pt", tmp_path / "phased.pt"
    assert _train(tiny, plain, "--epochs", "2") == 0
    assert _train(tiny, zero, "--epochs", "2", "--phase-augment", "0") == 0
    assert _train(tiny, phased, "--epochs", "2", "--phase-augment", "1") == 0
    for key, value in _weights(plain).items():  # P = 0 is ordinary training, bit for bit
        assert torch.equal(_weights(zero)[key], value), key
    after = _weights(phased)
    changed = [k for k, v in _weights(plain).items() if v.is_floating_point() and not torch.equal(after[k], v)]
    assert "layer3.0.conv1.weight" in changed and "layer1.0.conv1.weight" in changed  # the phases changed training

    ckpt = torch.load(phased, weights_only=True)
    assert ckpt["phase_augment"] == {"p": 1.0, "sites": ["layer2.0", "layer3.0"]}
    assert ckpt["config"]["phase_augment"] == 1.0 and ckpt["config"]["phase_sites"] is None
    assert torch.load(zero, weights_only=True)["phase_augment"] is None

    # a crash in epoch 2, then --resume, gives the weights of the run straight through (the draws are per epoch)
    import polyglean.training.finetune as finetune

    calls = []
    real = finetune.train_epoch

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    crashed = tmp_path / "crashed.pt"
    monkeypatch.setattr(finetune, "train_epoch", crash_in_epoch_two)
    assert _train(tiny, crashed, "--epochs", "2", "--phase-augment", "1") == 130
    monkeypatch.setattr(finetune, "train_epoch", real)
    assert _train(tiny, crashed, "--epochs", "2", "--phase-augment", "0.5", "--resume") == 2
    assert "phase_augment=1.0 (now 0.5)" in capsys.readouterr().err
    assert _train(tiny, crashed, "--epochs", "2", "--phase-augment", "1", "--resume") == 0
    for key, value in _weights(phased).items():
        assert torch.equal(_weights(crashed)[key], value), key

    # the checkpoint evaluates like any other
    out = tmp_path / "e.json"
    assert main(["eval", "--model", "cifar10-resnet20", "--weights", str(phased), "--data",
                 str(shared_data / "cifar10" / "test"), "--limit", "16", "--budgets", "1,4", "--no-progress",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["budget"] for r in rows] == [1, 4]


@pytest.mark.slow
def test_from_scratch_and_chosen_sites(shared_data: Path, tiny: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    ckpt = tmp_path / "scratch.pt"
    assert _train(tiny, ckpt, "--epochs", "1", "--from-scratch", "--seed", "3", "--phase-augment", "0.5",
                  "--phase-sites", "layer3.0", "--limit", "8") == 0
    payload = torch.load(ckpt, weights_only=True)
    assert payload["phase_augment"] == {"p": 0.5, "sites": ["layer3.0"]}
    assert payload["config"]["from_scratch"] is True and payload["config"]["phase_sites"] == "layer3.0"
    from polyglean.models import load_model

    trained, _ = load_model("cifar10-resnet20")  # far from the pretrained weights after one step from scratch
    w = payload["state_dict"]["conv1.weight"]
    assert (w - trained.conv1.weight).abs().max() > 0.1


@pytest.mark.parametrize("argv, message", [
    (["--phase-augment", "1.5"], "--phase-augment must be a probability in [0, 1], got 1.5"),
    (["--phase-augment", "-0.1"], "--phase-augment must be a probability in [0, 1]"),
    (["--phase-sites", "all"], "--phase-sites all has no effect without --phase-augment P > 0"),
    (["--phase-augment", "0.5", "--phase-sites", "layer9.0"], "unknown site 'layer9.0'"),
    (["--from-scratch", "--random-weights", "1"], "it contradicts --random-weights"),
])
def test_bad_phase_arguments(tiny: Path, tmp_path: Path, argv: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tiny, tmp_path / "x.pt", "--epochs", "1", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
