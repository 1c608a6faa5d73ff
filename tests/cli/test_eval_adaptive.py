"""``polyglean eval --adaptive``: options refused before any work, and a calibrated run on real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyglean.cli.main import main


@pytest.mark.parametrize("extra, match", [
    (["--target-cost", "2"], "apply only with --adaptive"),
    (["--adaptive", "stable:2", "--target-cost", "2", "--fit-data", "."], "confidence or entropy"),
    (["--adaptive", "confidence", "--target-cost", "2"], "--fit-data"),
    (["--adaptive", "confidence:x"], "needs a number"),
    (["--adaptive", "confidence:0.9", "--fit-data", "."], "--target-cost"),
    (["--adaptive", "confidence", "--target-cost", "0.5", "--fit-data", "."], "at least 1"),
])
def test_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                             match: str) -> None:
    (tmp_path / "a").mkdir()
    rc = main(["eval", "--model", "no-such-model", "--data", str(tmp_path), "--no-progress", *extra])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_fit_on_the_evaluated_images_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--model", "no-such-model", "--data", str(tmp_path), "--subset", "0:100", "--adaptive",
               "confidence", "--target-cost", "2", "--fit-data", str(tmp_path), "--fit-subset", "50:200"])
    assert rc == 2
    assert "disjoint" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_calibrated_adaptive_on_real_images(shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "cifar10" / "test"
    out = tmp_path / "a.json"
    rc = main(["eval", "--model", "cifar10-resnet20", "--data", str(data), "--subset", "4900:", "--budgets", "1,10",
               "--aggregate", "mean", "--adaptive", "confidence", "--target-cost", "2.5", "--fit-data", str(data),
               "--fit-subset", "0:100", "--batch-size", "50", "--workers", "0", "--no-progress", "--json", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    info = payload["config"]["adaptive"]
    assert info["rule"] == "confidence" and abs(info["achieved"] - 2.5) / 2.5 <= 0.10
    row = next(r for r in payload["results"] if r["budget"] == 10)
    assert 1.0 < row["mean_candidates"] < 10.0  # some images stopped at 1, the others searched on
    assert 1.0 < row["forward_equivalents"] < 5.0
