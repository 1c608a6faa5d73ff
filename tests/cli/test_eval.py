"""``polyglean eval`` on a tiny image folder (random model) and on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from polyglean.cli.main import main


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    return tmp_path


def test_eval_json_plot(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, fig = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--budgets", "1,4",
               "--batch-size", "4", "--aggregate", "mean,entropy", "--align-both", "--json", str(out),
               "--plot", str(fig), "--no-progress", "--workers", "0"])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert fig.stat().st_size > 1000
    rows = payload["results"]
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert {"budget", "top1", "top5", "nll", "ece", "fixed", "broken", "n_images", "seconds",
                "forward_equivalents"} <= set(r)
        assert r["n_images"] == 6
    ones = [r for r in rows if r["budget"] == 1]
    assert all(r["fixed"] == 0 and r["broken"] == 0 and r["forward_equivalents"] == pytest.approx(1) for r in ones)
    assert len({r["top1"] for r in ones}) == 1
    assert payload["config"]["search_space"] == ["maxpool", "layer2.0", "layer3.0"]
    assert "commit" in payload["machine"]
    assert "aggregate" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "0,4"], "budget 0 out of range"),
    (["--budgets", "1,99"], "budget 99 out of range"),
    (["--aggregate", "median"], "unknown aggregator 'median'"),
    (["--criterion", "entropi"], None),
])
def test_bad_arguments(folder: Path, argv: list[str], message: str | None,
                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--no-progress"]
    if message is None:
        with pytest.raises(SystemExit):
            main(base + argv)
        return
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(tmp_path),
                 "--no-progress"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_cifar_budget_one_is_the_plain_model(shared_data: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from polyglean.data import ImageDataset, limit_dataset
    from polyglean.models import load_model

    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    data = shared_data / "cifar10-jpeg" / "test"
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "cifar10-resnet20", "--data", str(data), "--limit", "40", "--budgets", "1,4",
                 "--json", str(out), "--no-progress", "--workers", "0"]) == 0
    rows = {r["budget"]: r for r in json.loads(out.read_text())["results"]}
    model, pre = load_model("cifar10-resnet20")
    subset = limit_dataset(ImageDataset(data, pre), 40, spread=True)
    x = torch.stack([subset[i][0] for i in range(len(subset))])
    y = torch.tensor([subset[i][1] for i in range(len(subset))])
    with torch.no_grad():
        top1 = (model(x).argmax(-1) == y).float().mean().item() * 100
    assert rows[1]["top1"] == pytest.approx(top1)
    assert 1 < rows[4]["forward_equivalents"] < 4
