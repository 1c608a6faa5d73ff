"""``polyglean eval`` on a segmentation preset: refusals before any work, and a real run on two CamVid images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyglean.cli.main import main
from tests.folders import link_camvid_pairs


@pytest.mark.parametrize("extra, message", [
    ([], "give its label maps with --labels"),
    (["--labels", "LAB", "--aggregate", "learned"], "no trained aggregator ships for 'camvid-espnet'"),
    (["--labels", "LAB", "--aggregate", "nope"], "unknown dense aggregator 'nope'"),
    (["--labels", "LAB", "--seg-tta", "zoom"], "--seg-tta 'zoom'"),
    (["--labels", "LAB", "--seg-tta-budget", "4"], "--seg-tta-budget applies to --seg-tta"),
    (["--labels", "LAB", "--tta", "mean"], "--tta: not supported for segmentation"),
    (["--labels", "LAB", "--no-align", "--align-both"], "contradict"),
])
def test_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                 message: str) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    extra = [str(tmp_path / "lab") if e == "LAB" else e for e in extra]
    rc = main(["eval", "--model", "camvid-espnet", "--data", str(tmp_path / "img"), *extra, "--no-progress"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_labels_refused_for_a_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--model", "torchvision:resnet18", "--data", str(tmp_path), "--labels", str(tmp_path)])
    assert rc == 2 and "for segmentation models" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_espnet_on_two_camvid_images(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    link_camvid_pairs(shared_data / "camvid", tmp_path)
    out, fig = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "--model", "camvid-espnet", "--data", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
               "--budgets", "1,2", "--batch-size", "2", "--json", str(out), "--plot", str(fig), "--no-progress"])
    assert rc == 0 and fig.stat().st_size > 1000
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [(r["budget"], r["aggregate"], r["align"]) for r in rows] == [(1, "none", False), (2, "entropy", True)]
    assert rows[0]["miou"] > 50 and len(rows[0]["per_class_iou"]) == 11
    assert rows[0]["forward_equivalents"] == 1.0 and 1.0 < rows[1]["forward_equivalents"] <= 2.0
    assert {"delta", "low", "high"} <= set(rows[1]["miou_delta"])
    assert payload["num_images"] == 2 and payload["machine"]
