"""EfficientNet-Lite0: the efficientnet_pytorch -> timm key map, and the shipped weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from polyglean.data import ImageDataset, limit_dataset
from polyglean.models import (
    CheckpointError,
    efficientnet_key_map,
    efficientnet_lite0,
    load_model,
    load_state_dict_strict,
)
from polyglean.models.efficientnet_lite import LITE0_STAGE_DEPTHS, efficientnet_lite0_weights


def _efficientnet_pytorch_keys(depths: tuple[int, ...]) -> list[str]:
    """Key names as efficientnet_pytorch writes them for a Lite model (no SE), written out independently."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["_conv_stem.weight"] + [f"_bn0.{s}" for s in bn]
    n = 0
    for stage, depth in enumerate(depths):
        for _ in range(depth):
            p = f"_blocks.{n}."
            if stage > 0:
                keys += [p + "_expand_conv.weight"] + [p + f"_bn0.{s}" for s in bn]
            keys += [p + "_depthwise_conv.weight"] + [p + f"_bn1.{s}" for s in bn]
            keys += [p + "_project_conv.weight"] + [p + f"_bn2.{s}" for s in bn]
            n += 1
    keys += ["_conv_head.weight"] + [f"_bn1.{s}" for s in bn] + ["_fc.weight", "_fc.bias"]
    return keys


class TestKeyMap:
    def test_maps_onto_timm_keys_exactly(self) -> None:
        km = efficientnet_key_map()
        src = _efficientnet_pytorch_keys(LITE0_STAGE_DEPTHS)
        renamed = [km.rename(k) for k in src]
        assert None not in renamed
        assert sorted(renamed) == sorted(efficientnet_lite0().state_dict())  # type: ignore[type-var]

    @pytest.mark.parametrize(
        ("old", "new"),
        [
            ("_conv_stem.weight", "conv_stem.weight"),
            ("_bn0.running_var", "bn1.running_var"),
            ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
            ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
            ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
            ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
            ("_blocks.1._bn0.weight", "blocks.1.0.bn1.weight"),
            ("_blocks.2._bn1.weight", "blocks.1.1.bn2.weight"),
            ("_blocks.3._project_conv.weight", "blocks.2.0.conv_pwl.weight"),
            ("_blocks.14._bn2.running_mean", "blocks.5.3.bn3.running_mean"),
            ("_blocks.15._depthwise_conv.weight", "blocks.6.0.conv_dw.weight"),
            ("_bn1.weight", "bn2.weight"),
            ("_fc.bias", "classifier.bias"),
        ],
    )
    def test_rules(self, old: str, new: str) -> None:
        assert efficientnet_key_map().rename(old) == new

    def test_block_beyond_depths_is_not_mapped(self) -> None:
        assert efficientnet_key_map().rename("_blocks.16._bn0.weight") is None

    def test_mismatch_lists_keys(self) -> None:
        model = efficientnet_lite0()
        sd = efficientnet_key_map().apply({k: v for k, v in _fake_source(model).items() if "_blocks.3." not in k})
        with pytest.raises(CheckpointError, match=r"missing key\(s\): 'blocks.2.0"):
            load_state_dict_strict(model, sd)

    def test_same_padding_kept(self) -> None:
        from timm.layers import Conv2dSame

        model = efficientnet_lite0()
        assert isinstance(model.conv_stem, Conv2dSame)
        assert isinstance(model.blocks[1][0].conv_dw, Conv2dSame)


def _fake_source(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random tensors under efficientnet_pytorch names, with the shapes timm expects."""
    km = efficientnet_key_map()
    target = model.state_dict()
    out = {}
    for key in _efficientnet_pytorch_keys(LITE0_STAGE_DEPTHS):
        new = km.rename(key)
        assert new is not None
        out[key] = torch.randn_like(target[new].float()).to(target[new].dtype)
    return out


def test_shipped_weights_load_strictly() -> None:
    path = efficientnet_lite0_weights()
    assert re.fullmatch(r"efficientnet-lite0-[0-9a-f]{8}\.pth", path.name)
    model, preprocess = load_model("imagenet-efficientnet-lite0")
    assert not model.training and preprocess.input_size == (3, 224, 224)
    assert preprocess.mean == pytest.approx((127 / 255,) * 3) and preprocess.std == pytest.approx((128 / 255,) * 3)


@pytest.mark.data
@pytest.mark.slow
def test_lite0_accuracy_on_imagenet_val1300(shared_data: Path) -> None:
    """EfficientNet-Lite0 is ~83.4% on all 1300 images; the first 300 must give >= 80%."""
    model, preprocess = load_model("imagenet-efficientnet-lite0")
    dataset = ImageDataset(shared_data / "imagenet-val1300", preprocess, num_classes=1000)
    subset = limit_dataset(dataset, 300)
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(subset, batch_size=50):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct / len(subset) >= 0.80
