"""scripts/reproduce.py: the registry, the statistics it prints, README blocks, and its fastest entry on real data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_experiment_names_known_runs() -> None:
    rep = _module()
    assert rep.EXPERIMENTS and all(r in rep.RUNS for e in rep.EXPERIMENTS.values() for r in e.runs)
    assert next(iter(rep.EXPERIMENTS)) == "cifar10-resnet20"  # the cheapest first; CI runs it


def test_fit_and_report_parts_are_disjoint() -> None:
    """Nothing is fitted on an image a figure is reported on (positions of the same shuffled order)."""
    rep = _module()
    ctx = rep.Context(Path("/data"), Path("/out"), None, None, sys.executable)
    train = rep.RUNS["cifar10-resnet20-agg"].argv(ctx)
    fit = {train[train.index("--subset") + 1], train[train.index("--val-subset") + 1]}
    assert fit == {"0:1600", "1600:2000"} and rep.REPORT == "2000:"
    for name in ("cifar10-resnet20-learned", "cifar10-resnet20-tta-flip"):
        argv = rep.RUNS[name].argv(ctx)
        assert argv[argv.index("--subset") + 1] == "2000:"
    tta = rep.RUNS["cifar10-resnet20-tta-flip-scales"].argv(ctx)
    assert tta[tta.index("--tta-fit-subset") + 1] == "0:2000"


def test_change_against_plain() -> None:
    rep = _module()
    ref = {"correct": "1100" * 250}
    row = {"correct": "1110" * 250}  # 250 images fixed, none broken
    c = rep.change(ref, row)
    assert c["delta"] == pytest.approx(25.0) and c["fixed"] == 250 and c["broken"] == 0
    assert c["significant"] and c["low"] > 0 and c["p"] < 1e-6
    same = rep.change(ref, ref)
    assert same["delta"] == 0 and not same["significant"] and same["p"] == 1.0
    assert rep.fmt_change(c).startswith("**+25.00 [")


def test_cached_result_is_reused_and_a_changed_command_is_not(tmp_path: Path) -> None:
    rep = _module()
    ctx = rep.Context(tmp_path, tmp_path / "out", None, None, sys.executable)
    run = rep.RUNS["cifar10-resnet20-entropy"]
    result = run.result(ctx)
    result.parent.mkdir(parents=True)
    result.write_text("{}")
    assert run.done(ctx)  # made by hand: adopted
    recorded = rep.portable(run.argv(ctx), ctx)
    assert "$DATA/cifar10/test" in recorded and "$OUT/runs/cifar10-resnet20-entropy.json" in recorded
    rep._record_path(result).write_text(json.dumps({"argv": recorded + ["--device", "cuda"]}))
    assert run.done(ctx)  # the device does not change what is computed
    moved = rep.Context(tmp_path / "elsewhere", tmp_path / "out", None, None, sys.executable)
    assert run.done(moved)  # nor where the data lies
    rep._record_path(result).write_text(json.dumps({"argv": recorded[:-4]}))
    assert not run.done(ctx)


def test_readme_blocks(tmp_path: Path) -> None:
    rep = _module()
    out = tmp_path / "docs" / "results"
    out.mkdir(parents=True)
    (out / "a.md").write_text("| x |\n\n![a]({results}/a.png)\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:a -->\nold\n<!-- /table:a -->\n<!-- table:b -->\nkept\n<!-- /table:b -->\n")
    ctx = rep.Context(tmp_path, out, None, None, sys.executable)
    assert rep.update_readme(readme, ctx, ["a", "b"]) == ["a"]
    assert readme.read_text() == ("intro\n<!-- table:a -->\n| x |\n\n![a](docs/results/a.png)\n<!-- /table:a -->\n"
                                  "<!-- table:b -->\nkept\n<!-- /table:b -->\n")


def test_unknown_experiment_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "--only", "nope"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unknown experiment(s) nope" in proc.stderr


@pytest.mark.data
@pytest.mark.slow
def test_fastest_entry_on_a_few_images(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce.py"), "--only", "cifar10-resnet20", "--limit", "20",
           "--data-root", str(shared_data), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (out / "cifar10-resnet20.md").read_text()
    assert "20 images" in table and "| mean | yes |" in table and "| entropy | no |" in table
    payload = json.loads((out / "runs" / "cifar10-resnet20-entropy.json").read_text())
    assert payload["config"]["subset"] in ("2000:", [2000, -1]) and payload["config"]["limit"] == 20
    assert (out / "cifar10-resnet20.png").stat().st_size > 1000
    again = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path)  # cached: runs nothing
    assert again.returncode == 0 and "running" not in again.stdout
