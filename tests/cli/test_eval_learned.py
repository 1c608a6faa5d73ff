"""``--no-align`` and ``--align-both`` with the learned aggregator: honoured row by row, or refused; never the
trained aggregator's alignment silently put in place of the one asked for (ResNet-20 and its shipped aggregator,
trained on aligned features)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyglean.cli.main import main


def _eval(shared_data: Path, out: Path, *argv: str) -> int:
    return main(["eval", "--model", "cifar10-resnet20", "--data", str(shared_data / "cifar10-jpeg" / "test"),
                 "--limit", "8", "--budgets", "1,4", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--json", str(out), *argv])


@pytest.mark.data
@pytest.mark.slow
def test_no_align_is_honoured_or_refused(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    out = tmp_path / "r.json"
    # a learned row without alignment cannot be made from an aggregator trained with it: refused
    assert _eval(shared_data, out, "--aggregate", "mean,learned", "--no-align") == 2
    assert "trained with alignment" in capsys.readouterr().err and not out.exists()

    # the learned criterion with --no-align: the mean rows are unaligned, as asked
    assert _eval(shared_data, out, "--aggregate", "mean", "--criterion", "learned", "--no-align") == 0
    payload = json.loads(out.read_text())
    assert {r["align"] for r in payload["results"] if r["aggregate"] == "mean"} == {False}
    assert payload["config"]["align"] == [False] and payload["config"]["search_align"] is True

    # --align-both: mean both ways, learned for the alignment it was trained with
    assert _eval(shared_data, out, "--aggregate", "mean,learned", "--align-both") == 0
    rows = {(r["aggregate"], r["align"], r["budget"]) for r in json.loads(out.read_text())["results"]}
    assert rows == {("mean", True, 1), ("mean", True, 4), ("mean", False, 1), ("mean", False, 4),
                    ("learned", True, 1), ("learned", True, 4), ("learned@default", True, 1)}
