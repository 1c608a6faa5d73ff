"""``polyglean bench`` (a smoke test: timings are measured by the command, never asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyglean.cli.main import main


def test_bench_writes_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "torchvision:resnet18", "--budget", "4", "--batch-size", "1",
                 "--input-size", "64", "64", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["flop_ratio_without_reuse"] == 4.0
    assert 1.0 < result["flop_ratio"] < 4.0
    assert result["time_ratio"] > 0 and result["machine"]["torch"]
    assert "time ratio" in capsys.readouterr().out


def test_bench_bad_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--budget", "0", "--input-size", "64", "64"]) == 2
    assert "budget 0 out of range" in capsys.readouterr().err


def test_bench_json_path_checked_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--budget", "4", "--input-size", "64", "64", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [
    ["bench", "--model", "cifar10-resnet20", "--device", "cuda"],
    ["inspect", "cifar10-resnet20", "--device", "cuda"],
    ["demo", "--device", "cuda"],
    ["export", "--model", "cifar10-resnet20", "--states", "2", "--fit-data", ".", "--out", "x.onnx", "--device", "cuda"],
])
def test_an_unavailable_device_is_one_clear_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from polyglean.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err
