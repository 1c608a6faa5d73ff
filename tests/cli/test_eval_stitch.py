"""``polyglean eval --stitch``: refusals before any work (and before the model is loaded where the options alone say
so), named layers a model cannot run at a finer stride, and a real run of CGNet's à trous network on CamVid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyglean.cli.main import main
from tests.folders import link_camvid_pairs

CGNET_LAST = "level3_0.conv1x1.conv"


def _run(tmp_path: Path, model: str, extra: list[str]) -> int:
    for d in ("img", "lab"):
        (tmp_path / d).mkdir(exist_ok=True)
    return main(["eval", "--model", model, "--data", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
                 *extra, "--no-progress"])


@pytest.mark.parametrize("extra, message", [
    (["--stitch-mask", "edges"], "--stitch-mask only apply with --stitch"),
    (["--stitch-mode", "atrous"], "--stitch-mode only apply with --stitch"),
    (["--stitch-no-register"], "--stitch-no-register only apply with --stitch"),
    (["--stitch", CGNET_LAST, "--stitch-width", "3"], "--stitch-width is the trimap width of --stitch-mask edges"),
    (["--stitch", CGNET_LAST, "--stitch-mask", "edges", "--stitch-threshold", "0.5"],
     "--stitch-threshold is the confidence threshold of --stitch-mask uncertain"),
    (["--stitch", CGNET_LAST, "--stitch-mask", "edgy"], "--stitch-mask 'edgy': choose from edges, uncertain"),
    (["--stitch", CGNET_LAST, "--budgets", "1,4"], "--budgets: not combined with --stitch"),
    (["--stitch", CGNET_LAST, "--budgets", "1,4,10,15"], "--budgets: not combined with --stitch"),
    (["--stitch", CGNET_LAST, "--seg-tta", "flip"], "--seg-tta: not combined with --stitch"),
    (["--stitch", CGNET_LAST, "--criterion", "random"], "--criterion: not combined with --stitch"),
    (["--stitch", CGNET_LAST, "--stitch-mode", "atrous", "--stitch-chunk", "4"],
     "--stitch-chunk bounds the phase states"),
    (["--stitch", f"{CGNET_LAST},{CGNET_LAST}"], "names 'level3_0.conv1x1.conv' twice"),
    (["--stitch", CGNET_LAST, "--tta", "mean"], "--tta: not supported for segmentation"),
])
def test_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                 message: str) -> None:
    assert _run(tmp_path, "camvid-cgnet", extra) == 2
    assert message in capsys.readouterr().err


def test_stitch_refused_for_a_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--model", "torchvision:resnet18", "--data", str(tmp_path), "--stitch", "layer4.0"])
    assert rc == 2 and "--stitch* are for segmentation models" in capsys.readouterr().err


@pytest.mark.parametrize("model, extra, message", [
    ("camvid-cgnet", ["--stitch", "level9"], "unknown site 'level9'; sites are: 0:level1_0.conv"),
    ("camvid-cgnet", ["--stitch", CGNET_LAST], "'mean' at node"),
    ("camvid-cgnet", ["--stitch", "level2_0.conv1x1.conv", "--stitch-mode", "atrous"],
     "site 'level3_0.conv1x1.conv' lies after"),
    ("camvid-espnet", ["--stitch", "encoder.level3_0.c1.conv"], "layer 'up_l3.0' (ConvTranspose2d) after it changes"),
    ("camvid-espnet", ["--stitch", "encoder.level3_0.c1.conv"], "CLI --stitch-mode atrous"),
])
def test_model_refusals_name_the_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str,
                                       extra: list[str], message: str) -> None:
    """Checked on the model before any image is read (the folders are empty)."""
    assert _run(tmp_path, model, [*extra, "--random-weights", "0"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_cgnet_atrous_on_two_camvid_images(shared_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    link_camvid_pairs(shared_data / "camvid", tmp_path)
    out, fig = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "--model", "camvid-cgnet", "--data", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
               "--stitch", CGNET_LAST, "--stitch-mode", "atrous", "--stitch-mask", "edges,uncertain",
               "--stitch-width", "4", "--stitch-threshold", "0.8", "--batch-size", "1", "--json", str(out),
               "--plot", str(fig), "--no-progress"])
    assert rc == 0 and fig.stat().st_size > 1000
    payload = json.loads(out.read_text())
    rows = {(r["stitch"], r["mask_param"]): r for r in payload["results"]}
    assert list(rows) == [("none", None), ("full", None), ("edges", 4), ("uncertain", 0.8)]
    native, full = rows[("none", None)], rows[("full", None)]
    assert native["miou"] > 70 and native["output_stride"] == [8, 8] and full["output_stride"] == [4.0, 4.0]
    # level 3 (about 46% of the FLOPs) runs on 4x the cells: 2.37x, measured
    assert 2.2 < full["forward_equivalents"] < 2.5
    assert rows[("edges", 4)]["forward_equivalents"] == pytest.approx(1 + full["forward_equivalents"], rel=1e-6)
    assert 0 < rows[("edges", 4)]["mask_area"] < 0.5
    assert payload["config"]["registration_shift"] == [2.0, 2.0] and payload["machine"]
    # registered, the finer map is no worse than native on these two images (unregistered it loses ~4 points)
    assert full["miou"] > native["miou"] - 0.5


@pytest.mark.data
@pytest.mark.slow
def test_espnet_atrous_on_two_camvid_images(shared_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """ESPNet's decoder takes the factor back (kernel = stride transposed convs): its output stays on the trained
    grid, so nothing is registered, and the level-3 FLOPs (3x the cells' share) are measured."""
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    link_camvid_pairs(shared_data / "camvid", tmp_path)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", "camvid-espnet", "--data", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
               "--stitch", "encoder.level3_0.c1.conv", "--stitch-mode", "atrous", "--stitch-mask", "uncertain",
               "--stitch-threshold", "0.6", "--batch-size", "1", "--json", str(out), "--no-progress"])
    assert rc == 0
    payload = json.loads(out.read_text())
    rows = {(r["stitch"], r["mask_param"]): r for r in payload["results"]}
    native, full = rows[("none", None)], rows[("full", None)]
    assert full["output_stride"] == [4.0, 4.0] and payload["config"]["registration_shift"] == [0.0, 0.0]
    assert 2.7 < full["forward_equivalents"] < 3.2  # 2.93 on all of val
    assert 0 < rows[("uncertain", 0.6)]["mask_area"] < 0.2
    assert abs(full["miou"] - native["miou"]) < 5  # a different network, not a broken one
