"""CIFAR ResNets: structure, option-A shortcut, fx tracing, and the published weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn
from torch.utils.data import DataLoader

from polyglean.data import ImageDataset, limit_dataset
from polyglean.models import (
    CifarResNet,
    ShortcutA,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet56,
    load_checkpoint,
    load_model,
    shortcut_a,
)
from polyglean.models.presets import CIFAR_RESNET_FILES


class TestShortcutA:
    def test_against_reference(self) -> None:
        x = torch.randn(2, 16, 8, 8)
        y = shortcut_a(x, 8)
        assert y.shape == (2, 32, 4, 4)
        assert y[:, :8].eq(0).all() and y[:, 24:].eq(0).all()
        assert y[:, 8:24].equal(x[:, :, ::2, ::2])

    def test_odd_size_keeps_first_pixel(self) -> None:
        x = torch.randn(1, 4, 7, 5)
        assert shortcut_a(x, 1).shape == (1, 6, 4, 3)

    def test_module_equals_function(self) -> None:
        x = torch.randn(3, 32, 16, 16)
        assert ShortcutA(16)(x).equal(shortcut_a(x, 16))

    def test_non_contiguous(self) -> None:
        x = torch.randn(2, 16, 8, 8).transpose(2, 3)
        assert shortcut_a(x, 8).equal(shortcut_a(x.contiguous(), 8))

    def test_negative_pad_raises(self) -> None:
        with pytest.raises(ValueError, match="pad"):
            ShortcutA(-1)

    def test_gradcheck(self) -> None:
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: shortcut_a(t, 1), (x,))


class TestCifarResNet:
    @pytest.mark.parametrize(("depth", "blocks"), [(20, 3), (32, 5), (44, 7), (56, 9)])
    def test_depths(self, depth: int, blocks: int) -> None:
        model = cifar_resnet(depth)
        assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) + 1 == depth  # plus the linear layer

    @pytest.mark.parametrize("depth", [0, 7, 21, 2])
    def test_bad_depth_raises(self, depth: int) -> None:
        with pytest.raises(ValueError, match="6n \\+ 2"):
            cifar_resnet(depth)

    def test_forward_shape_and_params(self) -> None:
        model = cifar_resnet20(num_classes=7).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        assert sum(p.numel() for p in model.parameters()) == 269_722 - 650 + 7 * 65

    def test_shortcuts(self) -> None:
        model = cifar_resnet20()
        assert isinstance(model.layer2[0].shortcut, ShortcutA)
        assert isinstance(model.layer3[0].shortcut, ShortcutA)
        assert isinstance(model.layer1[0].shortcut, nn.Identity)
        assert isinstance(model.layer2[1].shortcut, nn.Identity)

    def test_fx_trace_whole_model(self) -> None:
        model = cifar_resnet20().eval()
        traced = torch.fx.symbolic_trace(model)
        targets = {str(n.target) for n in traced.graph.nodes}
        assert "layer2.0.conv1" in targets and "linear" in targets
        # the two option-A shortcuts appear as slicing + pad nodes, not as opaque modules
        slices = [n for n in traced.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)]
        assert len(slices) == 2
        x = torch.randn(2, 3, 32, 32)
        assert traced(x).equal(model(x))

    def test_checkpoint_keys_roundtrip(self, tmp_path: Path) -> None:
        src = cifar_resnet20()
        sd = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
        torch.save({"state_dict": sd, "best_prec1": 91.0}, tmp_path / "r20.th")
        dst = load_checkpoint(cifar_resnet20(), tmp_path / "r20.th").eval()
        x = torch.randn(2, 3, 32, 32)
        assert dst(x).equal(src.eval()(x))


@pytest.mark.data
@pytest.mark.parametrize("depth", sorted(CIFAR_RESNET_FILES))
def test_published_weights_load_strictly(shared_data: Path, depth: int) -> None:
    path = shared_data / "weights" / "cifar10-resnet" / CIFAR_RESNET_FILES[depth]
    model, preprocess = load_model(f"cifar10-resnet{depth}", weights=path)
    assert isinstance(model, CifarResNet) and not model.training
    assert preprocess.input_size == (3, 32, 32)
    # and the default-weights resolver finds the same file
    default, _ = load_model(f"cifar10-resnet{depth}")
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), default.state_dict().values()))


@pytest.mark.data
@pytest.mark.slow
def test_resnet20_accuracy_on_cifar10_jpeg(shared_data: Path) -> None:
    """ResNet-20 is ~81% on the 5000 JPEG test images; 1000 evenly spaced ones (100 per class) must give >= 78%.

    (The first 1000 in sorted order are only airplanes and automobiles, 76.7%: not representative.)
    """
    model, preprocess = load_model("cifar10-resnet20")
    dataset = ImageDataset(shared_data / "cifar10-jpeg" / "test", preprocess, num_classes=10)
    subset = limit_dataset(dataset, 1000, spread=True)
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(subset, batch_size=250):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct / len(subset) >= 0.78


def test_resnet56_builds() -> None:
    assert cifar_resnet56()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
