"""``polyglean demo``: offline, on photographs shipped with scikit-image."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyglean.cli.main import main


@pytest.mark.slow
def test_demo_prints_top5_and_draws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--images", "coffee", "--budget", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "plain model" in out and "phase search" in out and "espresso" in out
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_unknown_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--images", "nosuchimage"]) == 2
    assert "unknown sample image 'nosuchimage'" in capsys.readouterr().err
