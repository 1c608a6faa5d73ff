"""``swap(model, "blurpool", recipe="zhang")`` against antialiased-cnns' ResNet layout, written out here.

:class:`ZhangResNet` is a hand-written module with the layer order, key names and shapes of the antialiased ResNets
that antialiased-cnns publishes (Zhang 2019): blur after the ReLU, ``conv2 = Sequential(BlurPool, conv3x3)`` in a
strided ``BasicBlock`` (``conv3`` in a ``Bottleneck``), ``downsample = Sequential(BlurPool, conv1x1, BN)``, the stem
``maxpool = Sequential(MaxPool(2, 1), BlurPool)`` (``Sequential(BlurPool, MaxPool(2, 1), BlurPool)`` after a
stride-1 stem conv without ``pool_only``), and BlurPool filters stored as persistent ``filt`` buffers of shape
``(C, 1, k, k)``. Its weights are random; nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from polyglean.errors import ArgumentError, CheckpointError
from polyglean.layers import BlurPool2d, SwapSequential, convert_zhang_state_dict, swap, swap_key_map, zhang_key_map

SIZE = 64


class ZhangBlur(nn.Module):
    """antialiased-cnns' BlurPool: reflect pad ``((k-1)//2, ceil((k-1)/2))``, a persistent repeated filter."""

    def __init__(self, channels: int, filt_size: int, stride: int = 2) -> None:
        super().__init__()
        row = torch.tensor([float(math.comb(filt_size - 1, i)) for i in range(filt_size)])
        filt = row[:, None] * row[None, :]
        self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))
        self.pad = ((filt_size - 1) // 2, math.ceil((filt_size - 1) / 2)) * 2
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pad, mode="reflect"), self.filt, stride=self.stride, groups=x.shape[1])


def conv3x3(cin: int, cout: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


class ZhangBasic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, k: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes) if stride == 1 else nn.Sequential(ZhangBlur(planes, k, stride),
                                                                               conv3x3(planes, planes))
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ZhangBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, k: int) -> None:
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = (conv1x1(planes, planes * 4) if stride == 1
                      else nn.Sequential(ZhangBlur(planes, k, stride), conv1x1(planes, planes * 4)))
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ZhangResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], k: int, pool_only: bool, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2 if pool_only else 1, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        pools = [nn.MaxPool2d(kernel_size=2, stride=1), ZhangBlur(64, k)]
        self.maxpool = nn.Sequential(*(pools if pool_only else [ZhangBlur(64, k)] + pools))
        self.inplanes = 64
        self.layer1 = self._layer(block, 64, layers[0], 1, k)
        self.layer2 = self._layer(block, 128, layers[1], 2, k)
        self.layer3 = self._layer(block, 256, layers[2], 2, k)
        self.layer4 = self._layer(block, 512, layers[3], 2, k)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _layer(self, block: type, planes: int, blocks: int, stride: int, k: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            parts = [ZhangBlur(self.inplanes, k, stride)] if stride != 1 else []
            parts += [conv1x1(self.inplanes, planes * block.expansion), nn.BatchNorm2d(planes * block.expansion)]
            downsample = nn.Sequential(*parts)
        out = [block(self.inplanes, planes, stride, downsample, k)]
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes, 1, None, k) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (so that a misplaced BN or a wrong key changes the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("filt") or not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
    return model.eval()


CASES = {
    "basic": (BasicBlock, ZhangBasic, [2, 2, 2, 2]),  # ResNet-18
    "bottleneck": (Bottleneck, ZhangBottleneck, [1, 2, 1, 1]),
}


def _pair(case: str, k: int, pool_only: bool) -> tuple[nn.Module, nn.Module]:
    tv_block, zhang_block, layers = CASES[case]
    reference = _randomise(ZhangResNet(zhang_block, layers, k, pool_only), seed=1)
    swapped = swap(ResNet(tv_block, layers, num_classes=10).eval(), "blurpool", recipe="zhang", pool_only=pool_only,
                   filter_size=k, input_size=(3, SIZE, SIZE)).eval()
    return reference, swapped


@pytest.mark.parametrize(("case", "k", "pool_only"),
                         [("basic", 4, True), ("basic", 3, False), ("bottleneck", 4, True), ("bottleneck", 5, False)])
def test_checkpoint_transfers_and_logits_match_exactly(case, k, pool_only):
    reference, swapped = _pair(case, k, pool_only)
    state = reference.state_dict()
    assert any(key.endswith(".filt") for key in state)  # their filters are part of their checkpoints
    converted = convert_zhang_state_dict({"state_dict": state}, swapped)  # the published files wrap the dict
    swapped.load_state_dict(converted)  # strict
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(swapped(x), reference(x))


def test_layout_of_the_swapped_resnet18():
    swapped = swap(torchvision.models.resnet18(), "blurpool", recipe="zhang", filter_size=4, input_size=(3, 64, 64))
    assert swapped.conv1.stride == (2, 2)  # pool_only=True by default: the stem conv keeps its stride
    pool, blur = swapped.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (2, 1, 0) and isinstance(blur, BlurPool2d)
    block = swapped.layer2[0]
    assert block.conv1.stride == (1, 1)
    assert isinstance(block.conv2, SwapSequential) and block.conv2.kept == 1
    assert isinstance(block.conv2[0], BlurPool2d) and block.conv2[0].channels == 128
    assert block.conv2[1].stride == (1, 1)
    assert isinstance(block.downsample[0][0], BlurPool2d) and block.downsample[0][0].channels == 64
    assert block.downsample[0][1].stride == (1, 1)
    assert isinstance(block.relu, nn.ReLU)  # the shared ReLU is untouched
    key_map = zhang_key_map(swapped)
    assert key_map["layer2.0.downsample.1.weight"] == "layer2.0.downsample.0.1.weight"
    assert key_map["layer2.0.downsample.2.running_mean"] == "layer2.0.downsample.1.running_mean"
    assert key_map["layer2.0.conv2.1.weight"] == "layer2.0.conv2.1.weight"
    assert sorted(key_map.values()) == sorted(swapped.state_dict())
    # the original torchvision weights still load by swap_key_map
    original = torchvision.models.resnet18()
    renames = swap_key_map(swapped)
    swapped.load_state_dict({renames.get(k, k): v for k, v in original.state_dict().items()})


def test_pool_only_false_antialiases_the_stem():
    swapped = swap(torchvision.models.resnet18(), "blurpool", recipe="zhang", pool_only=False, filter_size=4,
                   input_size=(3, 64, 64))
    assert swapped.conv1.stride == (1, 1)
    relu, blur = swapped.relu  # the stem's ReLU is its own module: ReLU + BlurPool
    assert isinstance(relu, nn.ReLU) and isinstance(blur, BlurPool2d)


def test_wrong_checkpoints_are_refused():
    reference, swapped = _pair("basic", 4, True)
    state = reference.state_dict()
    with pytest.raises(CheckpointError, match="swap with filter_size=4"):
        convert_zhang_state_dict(state, _pair("basic", 3, True)[1])
    with pytest.raises(CheckpointError, match="BlurPool filters"):
        convert_zhang_state_dict(state, _pair("basic", 4, False)[1])
    bad = dict(state)
    bad["layer2.0.conv2.0.filt"] = bad["layer2.0.conv2.0.filt"] * 2
    with pytest.raises(CheckpointError, match="not the binomial filter of size 4"):
        convert_zhang_state_dict(bad, swapped)
    missing = {k: v for k, v in state.items() if k != "fc.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing keys \['fc.bias'\]"):
        convert_zhang_state_dict(missing, swapped)
    extra = dict(state, **{"layer9.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['layer9.weight'\]"):
        convert_zhang_state_dict(extra, swapped)


def test_recipe_arguments_are_checked():
    model = torchvision.models.resnet18()
    with pytest.raises(ArgumentError, match="unknown blurpool recipe 'zang'; choose one of 'default', 'zhang'"):
        swap(model, "blurpool", recipe="zang", input_size=(3, 64, 64))
    with pytest.raises(ArgumentError, match="pool_only=True applies to recipe='zhang' only"):
        swap(model, "blurpool", pool_only=True, input_size=(3, 64, 64))
