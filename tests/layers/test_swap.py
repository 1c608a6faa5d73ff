"""Tests of polyglean.layers.swap: layer surgery on torchvision ResNet-18 and the CIFAR ResNet-20."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

from polyglean.layers import (
    APS2d,
    AdaPool2d,
    BlurPool2d,
    PASA2d,
    SoftPool2d,
    SwapSequential,
    swap,
    swap_key_map,
)
from polyglean.layers.phase_ops import subsample_at
from polyglean.layers.softpool import soft_pool2d
from polyglean.models import cifar_resnet20
from polyglean.phase.net import PhaseNet
from polyglean.sites import discover

LAYERS = ("blurpool", "softpool", "adapool", "pasa")
MODELS = {"resnet18": 64, "cifar_resnet20": 32}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18() if name == "resnet18" else cifar_resnet20()
    return model.eval()


@pytest.fixture(scope="module")
def originals() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], PhaseNet]]:
    out = {}
    for name, size in MODELS.items():
        model = _build(name)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out[name] = (model, x, y, state, PhaseNet(model, (3, size, size)))
    return out


@pytest.fixture(scope="module")
def swapped(originals) -> dict[tuple[str, str], nn.Module]:
    out = {}
    for name, size in MODELS.items():
        for layer in LAYERS:
            out[(name, layer)] = swap(originals[name][0], layer, input_size=(3, size, size)).eval()
    return out


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_swap_keeps_model_and_weights(originals, swapped, name: str, layer: str) -> None:
    model, x, y, state, _ = originals[name]
    new = swapped[(name, layer)]
    assert new is not model
    with torch.no_grad():
        assert torch.equal(model(x), y)  # the input model is untouched
        assert new(x).shape == y.shape
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    key_map = swap_key_map(new)
    new_state = new.state_dict()
    for key, value in state.items():  # every original weight survives, under its (documented) new name
        assert torch.equal(new_state[key_map.get(key, key)], value), key


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_phasenet_on_swapped(originals, swapped, name: str, layer: str) -> None:
    _, x, _, _, base = originals[name]
    new = swapped[(name, layer)]
    net = PhaseNet(new, (3, MODELS[name], MODELS[name]))
    assert net.total_factor == base.total_factor
    assert len(net.sites) == len(base.sites)
    with torch.no_grad():
        assert torch.equal(net(x), new(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_blurpool_loads_original_checkpoint_strictly(originals, swapped, name: str) -> None:
    model, x, _, state, _ = originals[name]
    new = swapped[(name, "blurpool")]
    fresh = copy.deepcopy(new)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    key_map = swap_key_map(fresh)
    fresh.load_state_dict({key_map.get(k, k): v for k, v in state.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), new(x))
    assert not any("filt" in k for k in new.state_dict())


def test_blurpool_rules_resnet18(swapped) -> None:
    new = swapped[("resnet18", "blurpool")]
    assert new.conv1.stride == (1, 1)  # Zhang: conv -> bn -> relu (called once) -> blur
    assert isinstance(new.relu, SwapSequential) and isinstance(new.relu[1], BlurPool2d)
    assert isinstance(new.maxpool[0], nn.MaxPool2d) and new.maxpool[0].stride == 1
    block = new.layer2[0]
    assert block.conv1[0].stride == (1, 1) and block.conv1[1].stride == (2, 2)  # shared ReLU: blur after conv
    assert isinstance(block.downsample[0][0], BlurPool2d) and block.downsample[0][1].stride == (1, 1)
    assert swap_key_map(new)["layer2.0.downsample.0.weight"] == "layer2.0.downsample.0.1.weight"


def test_blurpool_cifar_keeps_sliced_shortcut(swapped, originals) -> None:
    new = swapped[("cifar_resnet20", "blurpool")]
    sites = discover(new, (3, 32, 32)).sites
    assert [s.name for s in sites] == ["layer2.0", "layer3.0"]
    assert any(op.endswith("getitem") for op in sites[0].ops)
    assert [s.out_size for s in sites] == [s.out_size for s in originals["cifar_resnet20"][4].sites]


def test_pooling_rules_resnet18(swapped) -> None:
    soft, ada = swapped[("resnet18", "softpool")], swapped[("resnet18", "adapool")]
    assert isinstance(soft.maxpool, SoftPool2d) and soft.maxpool.padding == (1, 1)
    assert isinstance(ada.maxpool, AdaPool2d) and ada.maxpool.stride == (2, 2)
    assert soft.conv1.stride == (2, 2)  # strided convs are left as they are
    pasa = swapped[("resnet18", "pasa")]
    assert isinstance(pasa.conv1[0], PASA2d) and pasa.conv1[1].stride == (1, 1)


def test_nothing_to_replace_logs(originals, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="polyglean.layers.swap"):
        swap(originals["cifar_resnet20"][0], "softpool", input_size=(3, 32, 32))
    assert "getitem" in caplog.text and "unchanged" in caplog.text


def test_aps_single_op_sites() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(3, 3, 16, 16)
    new = swap(model, "aps", input_size=(3, 16, 16)).eval()
    assert isinstance(new[0][1], APS2d) and isinstance(new[2][1], APS2d)
    net = PhaseNet(new, (3, 16, 16))
    assert net.total_factor == (4, 4)
    with torch.no_grad():
        assert new(x).shape == model(x).shape
        assert torch.equal(net(x), new(x))
        y = net(x, phases={net.sites[0].name: (1, 1)})
    assert y.shape == new(x).shape


def test_softpool_phase_op_matches_stride1_sliced() -> None:
    pool = SoftPool2d(3, 2, 1)
    op = discover(nn.Sequential(pool), (2, 9, 9)).ops
    (phase_op, _), = op.values()
    x = torch.randn(2, 2, 9, 9)
    ref = soft_pool2d(x, 3, 1, 1)[..., 1::2, 0::2]
    ref = torch.nn.functional.pad(ref, (0, 0, 0, 1))  # row past the stride-1 map is zero
    assert torch.allclose(phase_op(x, phase=2), ref)
    assert torch.equal(subsample_at(x, (2, 2), (0, 0), (5, 5)), x[..., ::2, ::2])


def test_unknown_layer() -> None:
    with pytest.raises(ValueError, match="unknown layer 'bogus'.*'blurpool'"):
        swap(nn.Conv2d(3, 3, 3, 2), "bogus", input_size=(3, 8, 8))


def test_no_subsampling() -> None:
    with pytest.raises(ValueError, match="no subsampling site"):
        swap(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), "blurpool", input_size=(3, 8, 8))


@pytest.mark.parametrize(("layer", "cls"), [("softpool", SoftPool2d), ("adapool", AdaPool2d)])
def test_pooling_layers_can_replace_strided_convs(originals, layer: str, cls: type) -> None:
    model, x, _, state, _ = originals["cifar_resnet20"]
    new = swap(model, layer, input_size=(3, 32, 32), convs=True).eval()
    block = new.layer2[0]
    assert block.conv1[0].stride == (1, 1) and isinstance(block.conv1[1], cls) and block.conv1[1].stride == (2, 2)
    key_map = swap_key_map(new)
    assert key_map["layer2.0.conv1.weight"] == "layer2.0.conv1.0.weight"
    with torch.no_grad():
        assert new(x).shape == model(x).shape
    unchanged = swap(model, layer, input_size=(3, 32, 32))  # without convs=True: no pooling layer, no change
    assert unchanged.layer2[0].conv1.stride == (2, 2)
