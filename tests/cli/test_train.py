"""``polyglean train`` (a few steps on a handful of real CIFAR images) and ``eval --downsample/--shift-consistency``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyglean.cli.main import main
from polyglean.training.finetune import CHECKPOINT_FORMAT
from tests.folders import link_class_folders

pytestmark = [pytest.mark.data]


@pytest.fixture(scope="module")
def tiny(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 real CIFAR training images (one of each of 8 classes) as symbolic links in class folders."""
    return link_class_folders(shared_data / "cifar10-jpeg" / "train", tmp_path_factory.mktemp("tiny"), classes=8,
                              per_class=1)


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", "cifar10-resnet20", "--data", str(data), "--batch-size", "8", "--no-progress",
                 "--out", str(out), *extra])


@pytest.mark.slow
def test_train_resume_and_eval(shared_data: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    ckpt = tmp_path / "aps.pt"
    assert _train(tiny, ckpt, "--downsample", "aps", "--epochs", "1") == 0
    first = torch.load(ckpt, weights_only=True)
    assert first["format"] == CHECKPOINT_FORMAT and first["epoch"] == 1 and first["total_epochs"] == 1
    assert (first["model"], first["downsample"]) == ("cifar10-resnet20", "aps")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    # the cosine schedule spans the epochs given at the start: resuming with more is refused, not silently wrong
    assert _train(tiny, ckpt, "--downsample", "aps", "--epochs", "2", "--resume") == 2
    assert "cosine schedule spans 1 epochs" in capsys.readouterr().err
    assert _train(tiny, ckpt, "--downsample", "aps", "--epochs", "1", "--resume", "--lr", "0.1") == 2
    assert "lr=0.01 (now 0.1)" in capsys.readouterr().err

    straight = tmp_path / "straight.pt"
    assert _train(tiny, straight, "--epochs", "2") == 0
    full = torch.load(straight, weights_only=True)
    assert full["epoch"] == 2 and len(full["history"]) == 2

    import polyglean.training.finetune as finetune  # a crash during epoch 2 leaves the checkpoint of epoch 1

    calls = []
    real = finetune.train_epoch

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    crashed = tmp_path / "crashed.pt"
    monkeypatch.setattr(finetune, "train_epoch", crash_in_epoch_two)
    assert _train(tiny, crashed, "--epochs", "2") == 130
    monkeypatch.setattr(finetune, "train_epoch", real)
    assert torch.load(crashed, weights_only=True)["epoch"] == 1
    assert _train(tiny, crashed, "--epochs", "2", "--resume") == 0
    resumed = torch.load(crashed, weights_only=True)
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    for key, value in full["state_dict"].items():  # resuming gives what training straight through gives
        torch.testing.assert_close(resumed["state_dict"][key], value, msg=key)

    out = tmp_path / "e.json"
    capsys.readouterr()
    assert main(["eval", "--model", "cifar10-resnet20", "--downsample", "aps", "--weights", str(ckpt), "--data",
                 str(shared_data / "cifar10-jpeg" / "test"), "--limit", "20", "--budgets", "1",
                 "--shift-consistency", "--no-progress", "--workers", "0", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["downsample"] == "aps"
    sc = payload["shift_consistency"]
    assert sc["protocol"] == "shift" and sc["n_images"] == 20 and 0 <= sc["percent"] <= 100
    assert "shift consistency (shift, seed 0, 20 images)" in capsys.readouterr().out
    # the checkpoint records its downsample; loading it as another architecture is refused
    assert main(["eval", "--model", "cifar10-resnet20", "--weights", str(ckpt), "--data",
                 str(shared_data / "cifar10-jpeg" / "test"), "--limit", "4", "--budgets", "1", "--no-progress"]) == 2
    assert "pass --model cifar10-resnet20 --downsample aps" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "1", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--epochs", "1", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["--epochs", "1", "--device", "cpu", "--precision", "bf16"], "fine-tunes in fp32 only"),
    (["--epochs", "1", "--device", "nonsense"], "unknown device 'nonsense'"),
])
def test_bad_arguments(tiny: Path, tmp_path: Path, argv: list[str], message: str,
                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tiny, tmp_path / "x.pt", *argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_downsample_is_an_argparse_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--model", "cifar10-resnet20", "--downsample", "maxblur", "--data", str(tmp_path),
              "--epochs", "1", "--out", str(tmp_path / "x.pt")])


def test_resume_without_checkpoint(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tiny, tmp_path / "none.pt", "--epochs", "1", "--resume") == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_a_finished_checkpoint_is_never_overwritten_silently(tiny: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "done.pt"
    ckpt.write_bytes(b"a finished run")
    assert _train(tiny, ckpt, "--epochs", "1") == 2
    assert "exists; pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert ckpt.read_bytes() == b"a finished run"
    assert _train(tiny, ckpt, "--epochs", "1", "--resume", "--overwrite") == 2
    assert "not both" in capsys.readouterr().err


def test_overwrite_and_resume_keep_the_recorded_settings(shared_data: Path, tiny: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"old")
    assert _train(tiny, ckpt, "--epochs", "1", "--limit", "4", "--overwrite") == 0
    first = ckpt.read_bytes()
    assert torch.load(ckpt, weights_only=True)["config"]["limit"] == 4
    assert _train(tiny, ckpt, "--epochs", "1", "--limit", "8", "--resume") == 2
    assert "limit=4 (now 8)" in capsys.readouterr().err
    assert _train(tiny, ckpt, "--epochs", "1", "--limit", "4", "--resume") == 0
    assert "already trained 1 of 1 epochs; nothing to do" in capsys.readouterr().out
    assert ckpt.read_bytes() == first


def test_a_torchvision_model_without_weights_is_refused(tiny: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--model", "torchvision:resnet18", "--data", str(tiny), "--epochs", "1", "--out",
                 str(tmp_path / "r.pt"), "--no-progress"]) == 2
    assert "has no weights here" in capsys.readouterr().err and not (tmp_path / "r.pt").exists()


def test_a_text_file_as_weights_is_one_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n" * 30)
    assert main(["train-aggregator", "--model", "cifar10-resnet20", "--weights", str(notes), "--data", str(tiny),
                 "--out", str(tmp_path / "a.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt' is not a readable PyTorch checkpoint: not a file written by torch.save" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "train-aggregator"])
def test_a_corrupt_image_with_workers_is_one_line(tiny: Path, tmp_path: Path, command: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for cls in sorted(tiny.iterdir())[:2]:
        (data / cls.name).mkdir(parents=True)
        for image in cls.iterdir():
            (data / cls.name / image.name).symlink_to(image.resolve())
    (data / sorted(tiny.iterdir())[0].name / "zz-broken.png").write_bytes(b"\x89PNG broken")
    argv = [command, "--model", "cifar10-resnet20", "--data", str(data), "--workers", "1", "--out",
            str(tmp_path / "c.pt"), "--epochs", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot read image" in err and "zz-broken.png" in err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--phase-augment", "1"]], ids=["plain", "phase-augment"])
def test_torchrun_trains_what_one_process_does(shared_data: Path, tiny: Path, tmp_path: Path,
                                               extra: list[str]) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    argv = ["--epochs", "1", "--batch-size", "8", "--device", "cpu", *extra]
    assert _train(tiny, tmp_path / "one.pt", *argv) == 0
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "POLYGLEAN_DATA": str(shared_data)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "polyglean", "train", "--model", "cifar10-resnet20", "--data", str(tiny),
                           "--no-progress", "--out", str(tmp_path / "two.pt"), *argv],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1:") == 1  # rank 0 alone reports
    a = torch.load(tmp_path / "one.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two.pt", weights_only=True)["state_dict"]
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(b[k], v, atol=1e-4, rtol=1e-3, msg=k)
