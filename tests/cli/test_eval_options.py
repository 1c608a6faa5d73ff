"""``polyglean eval``: every flag honoured or refused before any work, output paths checked first, one-line errors
for the user's mistakes and tracebacks for bugs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from polyglean.cli import eval as eval_cmd
from polyglean.cli.main import main


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    return tmp_path / "data"


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case below must be refused before a model is loaded."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("polyglean.experiments.load_eval_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--aggregate", "mean,mean"], "--aggregate names 'mean' twice"),
    (["--aggregate", "mean,entropy,mean"], "--aggregate names 'mean' twice"),
    (["--tta", "mean,mean"], "--tta names 'mean' twice"),
    (["--no-align", "--align-both"], "contradict"),
    (["--align-both", "--aggregate-on", "logits"], "logits are never aligned"),
    (["--aggregator", "x.pt"], "--aggregator is used only by --aggregate learned or --criterion learned"),
    (["--tta-policy", "ten-crop"], "--tta-policy apply only with --tta"),
    (["--tta-data-part", "even", "--tta-cache", "c"], "--tta-data-part, --tta-cache apply only with --tta"),
    (["--tta", "mean", "--align-both"], "--align-both is not supported with --tta"),
    (["--tta", "mean", "--aggregate", "mean,entropy"], "with --tta every view is searched with one phase aggregation"),
    (["--tta", "mean", "--tta-weights", "w.pt"], "--tta-weights: --tta mean fits nothing"),
    (["--tta", "none,max", "--tta-fit-data", "."], "--tta-fit-data: --tta none,max fits nothing"),
    (["--tta", "mean", "--tta-save", "s.pt"], "--tta-save: --tta mean fits nothing"),
    (["--tta", "gps", "--tta-fit-data", ".", "--tta-weights", "w.pt"], "give one"),
    (["--tta", "gps", "--tta-weights", "w.pt", "--tta-fit-limit", "5"], "select images of --tta-fit-data"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--subset", "5:2"], None),  # argparse refuses it
])
def test_refused_before_any_work(folder: Path, no_model: None, argv: list[str], message: str | None,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--no-progress"]
    if message is None:
        with pytest.raises(SystemExit):
            main(base + argv)
        return
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_output_paths_checked_first(folder: Path, tmp_path: Path, no_model: None, flag: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--no-progress"]
    assert main([*base, flag, str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*base, flag, str(tmp_path / "file" / "r.out")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_missing_data_folder(no_model: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", "/no/such/folder"]) == 2
    assert "--data folder not found: /no/such/folder" in capsys.readouterr().err


def test_subset_outside_the_data(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--subset", "10:", "--budgets", "1",
                 "--no-progress", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "subset 10: is outside the 6 selected images" in err and "Traceback" not in err


def test_tta_cache_must_be_a_folder(folder: Path, tmp_path: Path, no_model: None,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--tta", "mean",
                 "--tta-cache", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--search-space", "nosuch"], "nosuch"),
    (["--aggregate", "learned"], "no trained aggregator ships for 'torchvision:resnet18'"),
    (["--tta", "mean", "--tta-budget", "3"], "--tta-budget 3 exceeds the 2 views of policy 'flip'"),
])
def test_refused_after_loading(folder: Path, argv: list[str], message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--budgets", "1,2",
                 "--no-progress", "--workers", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> int:
        raise TypeError("a bug")

    monkeypatch.setattr(eval_cmd, "run", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder)])


def test_inspect_huge_input_refused_before_allocating(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet18", "--input-size", "100000", "100000"]) == 2
    err = capsys.readouterr().err
    assert "input size (3, 100000, 100000) needs about" in err and "Traceback" not in err


@pytest.mark.slow
def test_tta_subset_honoured_and_json_mode_kept(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("{}")
    os.chmod(out, 0o604)
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--tta", "none,mean",
                 "--tta-policy", "flip", "--budgets", "1", "--subset", "1:", "--tta-data-part", "even",
                 "--batch-size", "4", "--workers", "0", "--no-progress", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {r["n_images"] for r in payload["results"]} == {2}  # the 3 even images, then 1: of their shuffled order
    assert stat.S_IMODE(out.stat().st_mode) == 0o604
    assert not [p for p in tmp_path.iterdir() if "polyglean-tmp" in p.name]
