"""``polyglean eval --tta``: bad input refused clearly; a smoke run on real images with saved and reused fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyglean.cli.main import main


@pytest.mark.parametrize("argv, message", [
    (["--tta", "mean", "--tta-budget", "0"], "--tta-budget must be >= 1, got 0"),
    (["--tta", "mean", "--tta-policy", "tencrop"], "unknown TTA policy 'tencrop'; choose one of: expanded"),
    (["--tta", "median"], "unknown TTA aggregator 'median'; choose one of: augtta"),
    (["--tta", "gps,augtta"], "--tta gps,augtta must be fitted: pass held-out labelled images with --tta-fit-data"),
    (["--tta", "classtta", "--tta-fit-data", "/no/such/folder"], "--tta-fit-data folder not found"),
])
def test_bad_arguments(tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--model", "cifar10-resnet20", "--data", str(tmp_path), "--no-progress", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.data
def test_eval_tta_real_images(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", "cifar10-resnet20", "--data", str(shared_data / "cifar10-jpeg" / "test"),
            "--limit", "20", "--budgets", "1,2", "--tta-policy", "flip", "--batch-size", "10", "--workers", "0",
            "--no-progress", "--tta-cache", str(tmp_path / "cache")]
    fit = ["--tta-fit-data", str(shared_data / "cifar10-jpeg" / "train"), "--tta-fit-limit", "20"]
    weights = tmp_path / "fits.pt"
    out = tmp_path / "r.json"
    assert main(base + ["--tta", "none,mean,gps,augtta", *fit, "--tta-save", str(weights), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["tta"], r["phase_budget"]) for r in rows} == {(t, b) for t in ("none", "mean", "gps", "augtta")
                                                             for b in (1, 2)}
    by = {(r["tta"], r["phase_budget"]): r for r in rows}
    assert by[("none", 1)]["fixed"] == by[("none", 1)]["broken"] == 0
    assert by[("none", 1)]["forward_equivalents"] == pytest.approx(1.0)
    assert by[("mean", 1)]["b_image"] == 2 and by[("mean", 1)]["forward_equivalents"] == pytest.approx(2.0)
    assert by[("mean", 2)]["b_total"] == 4 and by[("mean", 2)]["forward_equivalents"] > 2.0
    assert all(r["n_images"] == 20 and r["seconds"] > 0 for r in rows)
    assert "B_total" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # two views, two data sets

    # the saved fits reproduce the rows without fit data (and the cache spares the search)
    again = tmp_path / "again.json"
    assert main(base + ["--tta", "gps,augtta", "--tta-weights", str(weights), "--json", str(again)]) == 0
    reused = {(r["tta"], r["phase_budget"]): r for r in json.loads(again.read_text())["results"]}
    for key, row in reused.items():
        assert row["top1"] == by[key]["top1"] and row["nll"] == pytest.approx(by[key]["nll"], abs=1e-6)

    # a fit for another policy is refused
    capsys.readouterr()
    assert main([*base[:-2], "--tta-policy", "ten-crop", "--tta", "augtta", "--tta-weights", str(weights),
                 "--tta-cache", str(tmp_path / "cache")]) == 2
    assert "fitted for policy 'flip', not 'ten-crop'" in capsys.readouterr().err
