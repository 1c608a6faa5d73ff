"""load_model: spec parsing, errors, torchvision/timm, user weights, offline failures."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.hub
from PIL import Image

from polyglean.errors import ArgumentError
from polyglean.models import CheckpointError, WeightsUnavailableError, load_model
from polyglean.models import presets as presets_module


def test_torchvision_random_init() -> None:
    model, preprocess = load_model("torchvision:resnet18", random_weights=0)
    assert not model.training
    assert preprocess.input_size == (3, 224, 224) and preprocess.mean == (0.485, 0.456, 0.406)
    x = preprocess(Image.new("RGB", (300, 260), (10, 200, 30))).unsqueeze(0)
    assert model(x).shape == (1, 1000)


def test_torchvision_sizes_from_weights_meta() -> None:
    _, preprocess = load_model("torchvision:efficientnet_b1", random_weights=0)
    assert preprocess.input_size == (3, 240, 240)
    assert "resize 255 bilinear" in repr(preprocess)


def test_timm_random_init() -> None:
    model, preprocess = load_model("timm:resnet18", random_weights=0)
    assert not model.training
    assert preprocess.input_size == (3, 224, 224)
    assert "timm eval" in repr(preprocess)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("resnet18", r"torchvision:NAME.*timm:NAME.*cifar10-resnet20.*imagenet-efficientnet-lite0"),
        ("cifar10-resnet21", r"presets: .*did you mean .*cifar10-resnet20"),
        ("keras:resnet", r"unknown model spec 'keras:resnet'.*torchvision:NAME"),
        ("torchvision:", r"unknown model spec"),
        ("", r"non-empty string"),
        ("torchvision:resnet181", r"unknown torchvision .*'resnet181'.*did you mean resnet18"),
        ("timm:efficientnet_lite", r"unknown timm model.*did you mean .*efficientnet_lite0"),
    ],
)
def test_unknown_specs(spec: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_model(spec)


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_no_weights_is_refused_not_random(spec: str) -> None:
    with pytest.raises(ArgumentError, match=f"{spec} has no weights here: .*--weights PATH.*--pretrained.*"
                                            "--random-weights SEED"):
        load_model(spec)


def test_random_weights_are_seeded_reported_and_leave_the_caller_rng_alone(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with caplog.at_level("WARNING"):
        a, _ = load_model("torchvision:resnet18", random_weights=3)
    assert "torchvision:resnet18 has random weights (seed 3)" in caplog.text
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = load_model("torchvision:resnet18", random_weights=3)
    c, _ = load_model("torchvision:resnet18", random_weights=4)
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)


@pytest.mark.data
def test_random_weights_for_a_preset_load_nothing(shared_data: Path) -> None:
    pretrained, _ = load_model("cifar10-resnet20")
    random, _ = load_model("cifar10-resnet20", random_weights=0)
    assert not torch.equal(pretrained.conv1.weight, random.conv1.weight)


@pytest.mark.parametrize("kwargs", [{"weights": "w.pt", "random_weights": 0}, {"pretrained": True, "random_weights": 1},
                                    {"weights": "w.pt", "pretrained": True}])
def test_one_source_of_weights(kwargs: dict) -> None:
    with pytest.raises(ArgumentError, match="give one source of weights"):
        load_model("torchvision:resnet18", **kwargs)


def test_random_weights_must_be_a_seed() -> None:
    with pytest.raises(ArgumentError, match="integer seed"):
        load_model("torchvision:resnet18", random_weights="yes")  # type: ignore[arg-type]


def test_user_weights_for_torchvision(tmp_path: Path) -> None:
    src, _ = load_model("torchvision:resnet18", random_weights=0)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "r18.pth")
    dst, _ = load_model("torchvision:resnet18", weights=tmp_path / "r18.pth")
    x = torch.randn(1, 3, 64, 64)
    assert dst(x).equal(src(x))


def test_user_weights_wrong_model(tmp_path: Path) -> None:
    src, _ = load_model("torchvision:resnet18", random_weights=0)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"(?s)r18.pth.*missing key\(s\).*unexpected key\(s\)"):
        load_model("cifar10-resnet20", weights=tmp_path / "r18.pth")


def test_user_weights_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad.th").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="bad.th"):
        load_model("cifar10-resnet20", weights=tmp_path / "bad.th")


def test_user_weights_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.th"):
        load_model("cifar10-resnet20", weights=tmp_path / "absent.th")


def _offline(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_cifar_preset_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No local file and no network: a clear error, and nothing is downloaded."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    monkeypatch.setattr(presets_module, "default_search_dirs", lambda subdir: [tmp_path / "empty"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(WeightsUnavailableError, match=r"resnet20-12fca82f.th.*offline.*weights=PATH"):
        load_model("cifar10-resnet20")


@pytest.mark.data
def test_cifar_preset_found_in_search_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_data: Path) -> None:
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    monkeypatch.setattr(presets_module, "default_search_dirs", lambda subdir: [tmp_path])
    (tmp_path / "resnet32-d509ac18.th").symlink_to(shared_data / "weights" / "cifar10-resnet" / "resnet32-d509ac18.th")
    model, _ = load_model("cifar10-resnet32")
    assert len(model.layer1) == 5


def test_a_file_that_is_not_the_published_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    monkeypatch.setattr(presets_module, "default_search_dirs", lambda subdir: [tmp_path])
    from polyglean.models import CheckpointError, cifar_resnet32

    stale = cifar_resnet32().state_dict()  # the right keys and shapes, other (here: NaN) values
    stale = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in stale.items()}
    torch.save({"state_dict": stale}, tmp_path / "resnet32-d509ac18.th")
    with pytest.raises(CheckpointError, match="resnet32-d509ac18.th' is not the published one"):
        load_model("cifar10-resnet32")


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_pretrained_offline(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", _offline)
    with pytest.raises(WeightsUnavailableError, match=r"offline.*--weights PATH"):
        load_model(spec, pretrained=True)
