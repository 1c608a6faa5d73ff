"""``polyglean eval --shift-consistency`` (both protocols) and ``--downsample`` without a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from polyglean.cli.main import main


def _folder(root: Path, size: tuple[int, int]) -> Path:
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def _eval(argv: list[str], out: Path) -> dict:
    assert main(["eval", "--budgets", "1", "--aggregate", "mean", "--no-progress", "--workers", "0",
                 "--json", str(out), *argv]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_crop_protocol_for_imagenet_sized_models(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", (40, 48))
    payload = _eval(["--model", "torchvision:resnet18", "--random-weights", "--data", str(data), "--shift-consistency",
                     "--seed", "3"],
                    tmp_path / "r.json")
    sc = payload["shift_consistency"]
    assert sc["protocol"] == "crop" and sc["n_images"] == 4 and sc["seed"] == 3
    assert 0 <= sc["percent"] <= 100 and sc["percent"] * 4 / 100 == round(sc["percent"] * 4 / 100)


@pytest.mark.data
@pytest.mark.slow
def test_cifar_shift_protocol_and_swapped_pretrained(shared_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    data = shared_data / "cifar10-jpeg" / "test"
    base = ["--model", "cifar10-resnet20", "--data", str(data), "--limit", "40"]
    plain = _eval([*base, "--shift-consistency"], tmp_path / "plain.json")
    aps = _eval([*base, "--downsample", "aps"], tmp_path / "aps.json")  # pretrained weights, APS swapped in
    assert plain["shift_consistency"]["protocol"] == "shift" and plain["downsample"] is None
    assert aps["downsample"] == "aps" and "shift_consistency" not in aps  # measured only when asked
    assert plain["results"][0]["top1"] > 50 and aps["results"][0]["top1"] > 50
    assert plain["shift_consistency"]["percent"] > 50


def test_not_with_tta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path / "data", (32, 32))
    assert main(["eval", "--model", "torchvision:resnet18", "--random-weights", "--data", str(data), "--tta", "mean",
                 "--shift-consistency", "--no-progress"]) == 2
    assert "not supported together with --tta" in capsys.readouterr().err
