"""eval's JSON keeps per-image outcomes (for paired statistics across runs); --tta-fit-subset selects fit images."""

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
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    return tmp_path / "data"


def _correct(row: dict) -> list[bool]:  # type: ignore[type-arg]
    return [c == "1" for c in row["correct"]]


def test_rows_carry_per_image_outcomes(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--budgets", "1,4",
                 "--aggregate", "mean", "--subset", "2:", "--json", str(out), "--no-progress", "--workers", "0"]) == 0
    payload = json.loads(out.read_text())
    labels = payload["labels"]
    assert len(labels) == 6 and set(labels) <= {0, 1}
    for r in payload["results"]:
        assert len(r["correct"]) == 6 and set(r["correct"]) <= {"0", "1"}
        assert sum(_correct(r)) / 6 * 100 == pytest.approx(r["top1"])
    one, four = payload["results"]
    fixed = sum(b and not a for a, b in zip(_correct(one), _correct(four)))
    broken = sum(a and not b for a, b in zip(_correct(one), _correct(four)))
    assert (fixed, broken) == (four["fixed"], four["broken"])


def test_tta_fit_subset(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--subset", "5:",
                 "--budgets", "1", "--tta", "none,gps", "--tta-policy", "flip", "--tta-fit-data", str(folder),
                 "--tta-fit-subset", "0:5", "--json", str(out), "--no-progress", "--workers", "0"]) == 0
    payload = json.loads(out.read_text())
    assert payload["config"]["fit_subset"] == [0, 5] and payload["config"]["fit_images"] == 5
    assert all(len(r["correct"]) == 3 for r in payload["results"]) and len(payload["labels"]) == 3


def test_tta_fit_subset_needs_fit_data(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(folder), "--tta", "mean",
                 "--tta-fit-subset", "0:5", "--no-progress"]) == 2
    assert "--tta-fit-subset select images of --tta-fit-data" in capsys.readouterr().err
