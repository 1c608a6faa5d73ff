"""``polyglean inspect``."""

from __future__ import annotations

import json

import pytest

from polyglean.cli.inspect import format_table
from polyglean.cli.main import main


def test_json_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet18", "--input-size", "64", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_size"] == [3, 64, 64] and info["total_factor"] == [32, 32]
    names = [s["name"] for s in info["sites"]]
    assert names == ["conv1", "maxpool", "layer2.0", "layer3.0", "layer4.0"]
    shares = [s["flops_from_site"] for s in info["sites"]]
    assert shares[0] == pytest.approx(1.0) and shares == sorted(shares, reverse=True)
    assert all(s["discarded"] == pytest.approx(0.75) for s in info["sites"])
    assert info["sites"][2]["in_size"] == [16, 16] and info["sites"][2]["out_size"] == [8, 8]


def test_text_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:mobilenet_v2", "--input-size", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "features.2.conv.1.0" in out and "75%" in out and "total reduction 32x32" in out


def test_default_model_is_offline_lite0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "imagenet-efficientnet-lite0" and len(info["sites"]) == 5


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet18x"]) == 2
    err = capsys.readouterr().err
    assert "resnet18x" in err and "did you mean" in err and "Traceback" not in err


def test_bad_input_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet18", "--input-size", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "16x16 is smaller than the model's largest path reduction 32x32" in err


def test_no_sites_message() -> None:
    info = {"model": "m", "input_size": [3, 8, 8], "total_factor": [1, 1], "total_gflops": 0.0, "sites": []}
    assert "no subsampling sites found" in format_table(info)


@pytest.mark.data
def test_cifar_preset(shared_data, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    assert main(["inspect", "cifar10-resnet20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["ops"] for s in info["sites"]] == [["layer2.0.conv1", "layer2.0.shortcut.getitem"],
                                                  ["layer3.0.conv1", "layer3.0.shortcut.getitem"]]


def test_table_shows_reduction_and_main_path() -> None:
    from polyglean.cli.inspect import describe, format_table
    from polyglean.phase.net import PhaseNet
    from tests.zoo import lively

    import timm

    net = PhaseNet(lively(timm.create_model("pvt_v2_b0", pretrained=False)), (3, 64, 64))
    info = describe(net, "timm:pvt_v2_b0")
    sr = next(s for s in info["sites"] if s["name"] == "stages.0.blocks.0.attn.sr")
    assert sr["main_path"] is False and sr["reduction"] == [32, 32] and sr["factor"] == [8, 8]
    table = format_table(info)
    row = next(line for line in table.splitlines() if "stages.0.blocks.0.attn.sr " in line)
    assert "8x8" in row and "32x32" in row and " off " in row
    assert "total reduction 32x32" in table.splitlines()[0]
    assert table.splitlines()[1].split()[-3:] == ["OS", "à", "trous"] or "à trous OS" in table.splitlines()[1]


def test_segmentation_preset_columns(capsys: pytest.CaptureFixture[str]) -> None:
    """ESPNet: no site can be stitched (its transposed convs change the grid), the à trous network can be built from
    levels 2 and 3 (the decoder's kernel = stride transposed convs take the factor back), and the dense search's
    space is named instead of the classifier search's refusal."""
    assert main(["inspect", "camvid-espnet", "--input-size", "64", "96", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in info["sites"]}
    assert all(s["stitched_stride"] is None for s in info["sites"])
    assert by_name["encoder.level3_0.c1.conv"]["atrous_stride"] == [4, 4]
    assert by_name["encoder.level2_0.c1.conv"]["atrous_stride"] == [2, 2]
    assert info["dense_search_space"] == ["encoder.level2_0.c1.conv", "encoder.level3_0.c1.conv"]
    assert main(["inspect", "camvid-espnet", "--input-size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert "à trous OS" in out and "dense search" in out and "refuses" not in out
