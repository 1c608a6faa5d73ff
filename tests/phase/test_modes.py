"""PhaseNet with an example batch of any size, and the refusal of a model in training mode."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from polyglean import PhaseNet, PhaseSearch
from polyglean.errors import ModelError
from tests.zoo import lively


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return lively(torchvision.models.resnet18(num_classes=10))


@pytest.fixture(scope="module")
def plain(model: nn.Module) -> PhaseNet:
    return PhaseNet(model, (3, 64, 64))


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_example_of_any_batch_size_keeps_prefix_sharing_and_the_head(model: nn.Module, plain: PhaseNet,
                                                                      batch: int) -> None:
    example = torch.randn(batch, 3, 64, 64)
    net = PhaseNet(model, (3, 64, 64), example=example)
    assert [s.start for s in net.segments] == [s.start for s in plain.segments]
    assert len(net.segments) == len(net.sites) + 1  # one segment per site (conv1 opens the first) and the head
    assert net.head_segment == plain.head_segment is not None
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        assert torch.equal(PhaseSearch(net, budget=1)(x), model(x))


def test_example_must_be_a_batch(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="example must be a batch"):
        PhaseNet(model, (3, 64, 64), example=torch.randn(3, 64, 64))


def test_model_in_training_mode_is_refused_and_left_untouched() -> None:
    torch.manual_seed(0)
    model = lively(torchvision.models.resnet18(num_classes=10)).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"training mode.*model\.eval\(\)"):
        PhaseNet(model, (3, 64, 64))
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


def test_model_put_back_in_training_mode_is_refused_at_run_time() -> None:
    torch.manual_seed(0)
    model = lively(torchvision.models.resnet18(num_classes=10))
    net = PhaseNet(model, (3, 64, 64))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    model.layer2[0].bn1.train()  # one module is enough to make an image's logits depend on its batch
    x = torch.randn(3, 3, 64, 64)
    with pytest.raises(ModelError, match=r"'layer2\.0\.bn1'"):
        net(x)
    with pytest.raises(ModelError, match="training mode"):
        PhaseSearch(net, budget=3)(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    model.eval()
    with torch.no_grad():
        # in eval mode an image's logits do not depend on its batch
        alone = torch.cat([PhaseSearch(net, budget=3)(x[i:i + 1]) for i in range(3)])
        together = PhaseSearch(net, budget=3)(x)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
