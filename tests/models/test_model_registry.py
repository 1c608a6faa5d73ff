"""The preset registry: registration, duplicates, wildcard listing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from polyglean.models import ModelPreset, Preprocess, get_preset, list_models, register_preset, unregister_preset

BUILTIN = ["cifar10-resnet20", "cifar10-resnet32", "cifar10-resnet44", "cifar10-resnet56",
           "imagenet-efficientnet-lite0", "imagenet-efficientnet-lite1", "imagenet-efficientnet-lite2"]
DENSE = ["camvid-cgnet", "camvid-espnet"]


def _preset(name: str) -> ModelPreset:
    return ModelPreset(
        name=name,
        builder=lambda: nn.Linear(2, 2),
        default_weights=lambda: Path("nowhere.pt"),
        preprocess=lambda: Preprocess.resize_crop(resize=None, crop=4),
        input_size=(3, 4, 4),
        num_classes=2,
        description="a toy",
    )


@pytest.fixture
def toy() -> Iterator[ModelPreset]:
    preset = register_preset(_preset("toy-linear"))
    yield preset
    unregister_preset("toy-linear")


def test_builtin_presets() -> None:
    assert list_models() == sorted(DENSE + BUILTIN)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("cifar10-*", BUILTIN[:4]),
        ("*lite0", BUILTIN[4:5]),
        ("*lite[12]", BUILTIN[5:]),
        ("cifar10-resnet[24]?", ["cifar10-resnet20", "cifar10-resnet44"]),
        ("resnet*", []),
    ],
)
def test_wildcards(pattern: str, expected: list[str]) -> None:
    assert list_models(pattern) == expected


def test_register_and_get(toy: ModelPreset) -> None:
    assert get_preset("toy-linear") is toy
    assert "toy-linear" in list_models("toy-*")


def test_duplicate_name_raises(toy: ModelPreset) -> None:
    with pytest.raises(ValueError, match="'toy-linear' is already registered"):
        register_preset(_preset("toy-linear"))


def test_builtin_duplicate_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_preset(_preset("cifar10-resnet20"))


def test_colon_in_name_raises() -> None:
    with pytest.raises(ValueError, match="must not contain ':'"):
        register_preset(_preset("timm:toy"))


def test_unknown_preset_lists_existing() -> None:
    with pytest.raises(KeyError, match="cifar10-resnet20"):
        get_preset("nope")
    with pytest.raises(KeyError, match="nope"):
        unregister_preset("nope")


@pytest.mark.parametrize("name", BUILTIN)
def test_preset_records(name: str) -> None:
    preset = get_preset(name)
    preprocess = preset.preprocess()
    assert preprocess.input_size == preset.input_size
    model = preset.builder()
    assert model.state_dict()  # builds
    assert preset.description
