"""APS on sites of several ops: the main branch's choice reaches the shortcut, checked against a hand reference.

The reference below does not use the swapped model: it runs the original blocks with plain ``torch.nn.functional``
ops, computes each downsampling block's main conv at stride 1, picks per sample the 2x2 polyphase component with
the largest l2 norm (a Python loop over the four components), and slices the main branch *and* the shortcut at
that component. An optional extra phase ``(dy, dx)`` per site moves both branches further (what ``PhaseNet`` does
on the swapped model), with zeros past the map.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, fx, nn

from polyglean.layers import APS2d, APSIndex2d, swap, swap_key_map
from polyglean.models import cifar_resnet20
from polyglean.phase.net import PhaseNet
from polyglean.search import PhaseSearch

Offsets = dict[str, tuple[int, int]]


def reference_choice(y1: Tensor) -> list[tuple[int, int]]:
    """Per sample, the component ``(a, b)`` of ``y1[..., a::2, b::2]`` with the largest l2 norm (ties: lowest)."""
    out = []
    for n in range(y1.shape[0]):
        norms = [float(y1[n, :, a::2, b::2].double().pow(2).sum().sqrt()) for a in (0, 1) for b in (0, 1)]
        best = max(range(4), key=lambda k: (norms[k], -k))
        out.append(divmod(best, 2))
    return out


def take(t: Tensor, choice: list[tuple[int, int]], extra: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """Per sample, ``t[n, :, a + dy::2, b + dx::2]`` cropped to ``out_hw``, zero past the map."""
    padded = F.pad(t, (0, 2, 0, 2))
    oh, ow = out_hw
    return torch.stack([padded[n, :, a + extra[0]::2, b + extra[1]::2][:, :oh, :ow]
                        for n, (a, b) in enumerate(choice)])


def bn(t: Tensor, m: nn.BatchNorm2d) -> Tensor:
    return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def conv(t: Tensor, m: nn.Conv2d, stride: int = 1) -> Tensor:
    return F.conv2d(t, m.weight, m.bias, stride, m.padding)


def reference_cifar(model: nn.Module, x: Tensor, extra: Offsets | None = None) -> Tensor:
    """CIFAR ResNet forward with APS at the strided conv1 and the option-A slice of each downsampling block."""
    extra = extra or {}
    out = F.relu(bn(conv(x, model.conv1), model.bn1))
    for stage in (model.layer1, model.layer2, model.layer3):
        for i, block in enumerate(stage):
            name = f"layer{(model.layer1, model.layer2, model.layer3).index(stage) + 1}.{i}"
            if block.conv1.stride == (2, 2):
                y1 = conv(out, block.conv1)
                choice = reference_choice(y1)
                hw = (-(-out.shape[2] // 2), -(-out.shape[3] // 2))
                main = take(y1, choice, extra.get(name, (0, 0)), hw)
                pad = block.shortcut.pad
                short = F.pad(take(out, choice, extra.get(name, (0, 0)), hw), (0, 0, 0, 0, pad, pad))
            else:
                main, short = conv(out, block.conv1), out
            h = F.relu(bn(main, block.bn1))
            out = F.relu(bn(conv(h, block.conv2), block.bn2) + short)
    return model.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def reference_resnet18(model: nn.Module, x: Tensor, extra: Offsets | None = None) -> Tensor:
    """torchvision ResNet-18 with APS everywhere: stem conv, max pool, and every downsampling block."""
    extra = extra or {}

    def aps_single(t: Tensor) -> Tensor:
        hw = (-(-t.shape[2] // 2), -(-t.shape[3] // 2))
        return take(t, reference_choice(t), (0, 0), hw)

    out = aps_single(conv(x, model.conv1))
    out = aps_single(F.max_pool2d(F.relu(bn(out, model.bn1)), 3, 1, 1))
    for k, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
        for i, block in enumerate(stage):
            if block.downsample is not None:
                y1 = conv(out, block.conv1)
                choice = reference_choice(y1)
                hw = (-(-out.shape[2] // 2), -(-out.shape[3] // 2))
                offset = extra.get(f"layer{k}.{i}", (0, 0))
                main = take(y1, choice, offset, hw)
                short = bn(take(conv(out, block.downsample[0]), choice, offset, hw), block.downsample[1])
            else:
                main, short = conv(out, block.conv1), out
            h = F.relu(bn(main, block.bn1))
            out = F.relu(bn(conv(h, block.conv2), block.bn2) + short)
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


CASES = {
    "cifar_resnet20": (cifar_resnet20, 32, reference_cifar),
    "resnet18": (torchvision.models.resnet18, 64, reference_resnet18),
}


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrong branch or phase cannot hide behind identity BNs."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[nn.Module, nn.Module, Tensor]]:
    out: dict[str, tuple[nn.Module, nn.Module, Tensor]] = {}
    for name, (build, size, _) in CASES.items():
        torch.manual_seed(0)
        model = _randomise_bn(build()).eval()
        swapped = swap(model, "aps", input_size=(3, size, size)).eval()
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
        out[name] = (model, swapped, x)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_matches_hand_reference(cases, name: str) -> None:
    model, swapped, x = cases[name]
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), CASES[name][2](model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_shortcut_follows_the_main_branch(cases, name: str) -> None:
    """Every downsampling block has one index module whose output feeds both gathers."""
    _, swapped, _ = cases[name]
    assert isinstance(swapped, fx.GraphModule)
    graph = swapped.graph
    index_nodes = [n for n in graph.nodes if n.op == "call_module"
                   and isinstance(swapped.get_submodule(str(n.target)), APSIndex2d)]
    assert [str(n.target) for n in index_nodes][:2] == ["layer2.0.aps_index", "layer3.0.aps_index"]
    for node in index_nodes:
        gathers = [u for u in node.users if isinstance(swapped.get_submodule(str(u.target)), APS2d)]
        assert len(gathers) == 2 and all(u.kwargs["index"] is node for u in gathers)
        main, short = sorted(str(u.target) for u in gathers)
        assert main.endswith("conv1_aps") and ("downsample_0_aps" in short or "shortcut_getitem_aps" in short)


def test_choice_differs_between_samples_and_from_phase_zero(cases) -> None:
    """The test above would be weak if APS always picked phase 0; on these inputs it does not."""
    model, _, x = cases["cifar_resnet20"]
    with torch.no_grad():
        out = F.relu(bn(conv(x, model.conv1), model.bn1))
        out = model.layer1(out)
        choice = reference_choice(conv(out, model.layer2[0].conv1))
    assert len(set(choice)) > 1 and any(c != (0, 0) for c in choice)


def test_keys_unchanged_original_weights_load_and_trains(cases) -> None:
    model, swapped, x = cases["cifar_resnet20"]
    assert swap_key_map(swapped) == {}
    assert set(swapped.state_dict()) == set(model.state_dict())
    fresh = swap(cifar_resnet20(), "aps", input_size=(3, 32, 32)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), swapped(x))
    fresh.train()
    loss = F.cross_entropy(fresh(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()  # it trains: gradients reach the conv before the APS gather
    assert fresh.get_submodule("layer2.0.conv1").weight.grad.abs().sum() > 0


def test_input_model_untouched(cases) -> None:
    model, _, _ = cases["resnet18"]
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].downsample[0].stride == (2, 2)
    assert not isinstance(model, fx.GraphModule)


@pytest.fixture(scope="module")
def nets(cases) -> dict[str, PhaseNet]:
    return {name: PhaseNet(cases[name][1], (3, size, size)) for name, (_, size, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_phasenet_moves_both_branches(cases, nets, name: str) -> None:
    model, swapped, x = cases[name]
    net = nets[name]
    multi = [s for s in net.sites if len(s.ops) == 2]
    assert [s.name for s in multi][:2] == ["layer2.0", "layer3.0"]
    with torch.no_grad():
        assert torch.equal(net(x), swapped(x))
        for site, phase in (("layer2.0", (1, 0)), ("layer3.0", (1, 1))):
            expected = CASES[name][2](model, x, {site: phase})
            torch.testing.assert_close(net(x, phases={site: phase}), expected, rtol=1e-5, atol=1e-5)
        per_image = net(x, phases=[{"layer2.0": (k // 2, k % 2)} for k in range(4)])
        for k in range(4):
            expected = CASES[name][2](model, x[k:k + 1], {"layer2.0": (k // 2, k % 2)})
            torch.testing.assert_close(per_image[k:k + 1], expected, rtol=1e-5, atol=1e-5)


def test_search_runs_on_swapped(cases, nets) -> None:
    _, swapped, x = cases["cifar_resnet20"]
    net = nets["cifar_resnet20"]
    search = PhaseSearch(net, budget=4, criterion="entropy", aggregate="mean")
    with torch.no_grad():
        one = PhaseSearch(net, budget=1)(x)
        assert torch.equal(one, swapped(x))
        assert search(x).shape == (4, 10)


def test_unsupported_op_in_a_multi_op_site_names_it() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x) + F.avg_pool2d(x, 2)

    with pytest.raises(NotImplementedError, match=r"op 'avg_pool2d'.*no stride-1 rewrite"):
        swap(Block().eval(), "aps", input_size=(3, 8, 8))
