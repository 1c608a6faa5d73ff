"""PhaseNet on whole models: discovery by rule, bit-exact default, non-default states against a reference."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from polyglean import PhaseNet, TraceError, UnsupportedOpError
from tests.reference import reference_forward

# name -> (builder, input size, expected site factors from input to output)
F2 = (2, 2)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), 64, [F2] * 5),
    "resnet50": (lambda: torchvision.models.resnet50(), 64, [F2] * 5),
    "resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(), 64, [F2] * 5),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 64, [F2] * 5),
    "mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(), 64, [F2] * 5),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), 64, [F2] * 5),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(), 64, [F2] * 5),
    "shufflenet_v2_x1_0": (lambda: torchvision.models.shufflenet_v2_x1_0(), 64, [F2] * 5),
    "inception_v3": (lambda: torchvision.models.inception_v3(aux_logits=False, init_weights=False), 107, [F2] * 5),
    "densenet121": (lambda: torchvision.models.densenet121(), 64, [F2] * 5),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(), 64, [F2] * 5),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 64, [(4, 4), F2, F2, F2]),
    "swin_t": (lambda: torchvision.models.swin_t(), 64, [(4, 4), F2, F2, F2]),
    "timm:resnet18": (lambda: timm.create_model("resnet18"), 64, [F2] * 5),
    "timm:tf_efficientnet_lite0": (lambda: timm.create_model("tf_efficientnet_lite0"), 64, [F2] * 5),
}


def lively(model: nn.Module) -> nn.Module:
    """Variance-preserving weights and random normalisation statistics, so that a random network's output depends
    visibly on its input (torchvision's own initialisation leaves some models nearly constant)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear", generator=g)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, PhaseNet, torch.Tensor, list]:
    name = request.param
    build, size, factors = MODELS[name]
    torch.manual_seed(0)
    model = lively(build())
    net = PhaseNet(model, input_size=(3, size, size))
    x = torch.randn(2, 3, size, size)
    return name, model, net, x, factors


@pytest.mark.slow
class TestModelSweep:
    def test_sites_and_total_reduction(self, case: tuple) -> None:
        name, model, net, x, factors = case
        assert [s.factor for s in net.sites] == factors, name
        assert net.total_factor == (32, 32)
        assert [s.index for s in net.sites] == list(range(len(net.sites)))
        for a, b in zip(net.sites, net.sites[1:]):
            assert a.out_size == b.in_size or b.in_size[0] < a.out_size[0]  # valid convs may shrink in between
            assert b.level == a.level + 1

    def test_default_is_bit_exact(self, case: tuple) -> None:
        _, model, net, x, _ = case
        with torch.no_grad():
            assert torch.equal(net(x), model(x))
            assert torch.equal(net(x, phases={}), model(x))

    def test_non_default_state_matches_reference(self, case: tuple) -> None:
        name, model, net, x, _ = case
        mid = len(net.sites) // 2
        phases = {mid: (1, 1), len(net.sites) - 1: (1, 0)}
        with torch.no_grad():
            default = model(x)
            out = net(x, phases={net.sites[i].name: p for i, p in phases.items()})
        ref = reference_forward(net, x, phases)
        scale = default.abs().max().item()
        assert (out - default).abs().max().item() > 1e-4 * scale, f"{name}: the state did not change the output"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)

    def test_first_site_phase_matches_reference(self, case: tuple) -> None:
        _, _, net, x, _ = case
        with torch.no_grad():
            out = net(x, phases={0: (1, 0)})
        ref = reference_forward(net, x, {0: (1, 0)})
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, PhaseNet]:
    model = lively(torchvision.models.resnet18())
    return model, PhaseNet(model, input_size=(3, 64, 64))


class TestPerImageAndAllPhases:
    def test_per_image_phases_equal_separate_runs(self, resnet: tuple) -> None:
        _, net = resnet
        x = torch.randn(3, 3, 64, 64)
        per_image = [{"layer2.0": (1, 0)}, {}, {"maxpool": (1, 1), "layer3.0": (0, 1)}]
        with torch.no_grad():
            out = net(x, phases=per_image)
            for i, phases in enumerate(per_image):
                torch.testing.assert_close(out[i:i + 1], net(x[i:i + 1], phases=phases), rtol=1e-5, atol=1e-5)

    def test_phase_tensor_forms_agree(self, resnet: tuple) -> None:
        _, net = resnet
        x = torch.randn(2, 3, 64, 64)
        flat = torch.tensor([[0, 1, 2, 3, 0], [3, 0, 0, 1, 2]])
        pairs = torch.stack([flat // 2, flat % 2], -1)
        dicts = [{s.name: (int(p) // 2, int(p) % 2) for s, p in zip(net.sites, row)} for row in flat]
        with torch.no_grad():
            a, b, c = net(x, phases=flat), net(x, phases=pairs), net(x, phases=dicts)
        assert torch.equal(a, b) and torch.equal(a, c)

    def test_all_phases(self, resnet: tuple) -> None:
        model, net = resnet
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            out = net.all_phases(x, "layer2.0", phases={"maxpool": (1, 0)})
            assert out.shape == (2, 4, 1000)
            for p in range(4):
                single = net(x, phases={"maxpool": (1, 0), "layer2.0": divmod(p, 2)})
                torch.testing.assert_close(out[:, p], single, rtol=1e-5, atol=1e-5)

    def test_prefix_reuse_matches_full_run(self, resnet: tuple) -> None:
        _, net = resnet
        x = torch.randn(2, 3, 64, 64)
        phases = net.encode_phases({"layer3.0": (1, 1)}, 2)
        seg = net.entry_segment("layer3.0")
        with torch.no_grad():
            values = net.run_to(x, seg, phases)
            out, kept = net.run_from(seg, values, phases, keep=range(seg + 1, len(net.segments)))
            assert torch.equal(out, net(x, phases={"layer3.0": (1, 1)}))
            again, _ = net.run_from(seg + 1, kept[seg + 1], phases)
            assert torch.equal(again, out)
        assert sorted(kept) == list(range(seg + 1, len(net.segments)))

    def test_site_lookup(self, resnet: tuple) -> None:
        _, net = resnet
        assert net.site("layer2.0.downsample.0").name == "layer2.0"
        assert net.site(-1).name == "layer4.0"
        assert net.site(2) is net.site("layer2.0")


class TestErrors:
    def test_unknown_site(self, resnet: tuple) -> None:
        _, net = resnet
        with pytest.raises(ValueError, match=r"unknown site 'layer9'.*sites are: 0:conv1, 1:maxpool"):
            net(torch.randn(1, 3, 64, 64), phases={"layer9": (0, 1)})

    def test_phase_out_of_range(self, resnet: tuple) -> None:
        _, net = resnet
        with pytest.raises(ValueError, match=r"phase \(2, 0\) out of range for factor \(2, 2\) at site 'layer3.0'"):
            net(torch.randn(1, 3, 64, 64), phases={"layer3.0": (2, 0)})
        with pytest.raises(ValueError, match="phase index 4 out of range"):
            net(torch.randn(1, 3, 64, 64), phases=torch.tensor([[0, 0, 4, 0, 0]]))

    @pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 3, 64, 64)])
    def test_input_not_4d(self, resnet: tuple, shape: tuple) -> None:
        _, net = resnet
        with pytest.raises(ValueError, match=r"4-D batch \(N, C, H, W\)"):
            net(torch.randn(shape))

    def test_input_smaller_than_reduction(self, resnet: tuple) -> None:
        _, net = resnet
        with pytest.raises(ValueError, match="smaller than the model's largest path reduction 32x32"):
            net(torch.randn(1, 3, 16, 64))

    def test_wrong_channels(self, resnet: tuple) -> None:
        _, net = resnet
        with pytest.raises(ValueError, match="has 1 channels"):
            net(torch.randn(1, 1, 64, 64))

    def test_no_subsampling(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        net = PhaseNet(model, input_size=(3, 16, 16))
        assert net.sites == []
        x = torch.randn(1, 3, 16, 16)
        assert torch.equal(net(x), model(x))
        with pytest.raises(ValueError, match="has no subsampling sites"):
            net(x, phases={"0": (1, 0)})

    def test_untraceable_names_the_module(self) -> None:
        class Branchy(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x[..., ::2, ::2] if x.sum() > 0 else x

        model = nn.Sequential(nn.Conv2d(3, 3, 3), Branchy()).eval()
        with pytest.raises(TraceError, match="module '1'.*Hint"):
            PhaseNet(model, input_size=(3, 16, 16))

    def test_opaque_subsampling_leaf_is_refused(self) -> None:
        class Down(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x[..., ::2, ::2]

        model = nn.Sequential(nn.Conv2d(3, 3, 3), Down()).eval()
        assert len(PhaseNet(model, input_size=(3, 16, 16)).sites) == 1  # traced into: found
        with pytest.raises(UnsupportedOpError, match="module '1'.*opaque"):
            PhaseNet(model, input_size=(3, 16, 16), leaf_modules=[Down])


class TestDiscoveryRules:
    def test_explicit_pad_layer_before_strided_conv(self) -> None:
        model = lively(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                                     nn.Conv2d(4, 4, 3, stride=3, padding=1)))
        net = PhaseNet(model, input_size=(3, 17, 17))
        assert [s.factor for s in net.sites] == [(2, 2), (3, 3)]
        x = torch.randn(2, 3, 17, 17)
        for phases in ({0: (1, 1)}, {1: (2, 1)}):
            with torch.no_grad():
                out = net(x, phases=phases)
            torch.testing.assert_close(out, reference_forward(net, x, phases))

    def test_functional_ops_and_concat_grouping(self) -> None:
        class Reduction(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 5, 3, stride=2)
                self.blur = nn.Parameter(torch.rand(3, 1, 3, 3))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                a = self.conv(x)
                b = F.max_pool2d(x, 3, 2)
                c = F.conv2d(x, self.blur, stride=2, groups=x.shape[1])
                d = F.avg_pool2d(x, 3, 2)
                return torch.cat([a, b, c, d], 1)[..., ::2, ::2]

        model = Reduction().eval()
        net = PhaseNet(model, input_size=(3, 21, 21))
        assert len(net.sites) == 2
        first = net.sites[0]
        assert first.ops == ("conv", "max_pool2d", "conv2d", "avg_pool2d") and first.factor == (2, 2)
        assert net.sites[1].ops == ("getitem",)
        x = torch.randn(2, 3, 21, 21)
        for phases in ({0: (1, 0)}, {0: (1, 1), 1: (0, 1)}):
            with torch.no_grad():
                torch.testing.assert_close(net(x, phases=phases), reference_forward(net, x, phases))

    def test_unet_skip_does_not_merge_levels(self) -> None:
        class TinyUNet(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.down1 = nn.Conv2d(3, 4, 3, 2, 1)
                self.down2 = nn.Conv2d(4, 4, 3, 2, 1)
                self.up = nn.Upsample(scale_factor=2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                a = self.down1(x)
                return torch.cat([a, self.up(self.down2(a))], 1)

        net = PhaseNet(TinyUNet().eval(), input_size=(3, 16, 16))
        assert [s.ops for s in net.sites] == [("down1",), ("down2",)]

    def test_rectangular_and_large_factors(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 4, (3, 5), stride=(2, 3), padding=(1, 2)), nn.MaxPool2d(4, 4),
                              nn.Conv2d(4, 2, 16, 16)).eval()
        net = PhaseNet(model, input_size=(3, 128, 192))
        assert [s.factor for s in net.sites] == [(2, 3), (4, 4), (16, 16)]
        assert math.prod(s.num_phases for s in net.sites) == 6 * 16 * 256
        x = torch.randn(2, 3, 128, 192)
        phases = {0: (1, 2), 1: (3, 1), 2: (15, 7)}
        with torch.no_grad():
            torch.testing.assert_close(net(x, phases=phases), reference_forward(net, x, phases))

    def test_same_padding_phase0_equals_original(self) -> None:
        """The published code's bug: timm's "SAME" convs at phase 0 must be the original op."""
        from timm.layers import Conv2dSame

        conv = Conv2dSame(3, 4, 3, stride=2)
        net = PhaseNet(nn.Sequential(conv).eval(), input_size=(3, 16, 16))
        op = next(iter(net.discovery.ops.values()))[0]
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(op.at_phase((0, 0), x), conv(x))
        for phase in [(0, 1), (1, 0), (1, 1)]:
            torch.testing.assert_close(op.at_phase(phase, x), reference_forward(net, x, {0: phase}))

    def test_to_double_keeps_working(self) -> None:
        model = lively(torchvision.models.resnet18())
        net = PhaseNet(model, input_size=(3, 64, 64)).double()
        x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(net(x), model(x))
            assert net(x, phases={"layer2.0": (1, 1)}).dtype == torch.float64


@pytest.mark.data
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_cifar_presets_with_pretrained_weights(shared_data, monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    """The CIFAR ResNets (option-A shortcuts subsample by slicing) with their real weights."""
    from polyglean.models import load_model

    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    model, preprocess = load_model(f"cifar10-resnet{depth}")
    net = PhaseNet(model, input_size=preprocess.input_size)
    assert [(s.name, s.factor) for s in net.sites] == [("layer2.0", (2, 2)), ("layer3.0", (2, 2))]
    assert net.sites[0].ops == ("layer2.0.conv1", "layer2.0.shortcut.getitem")
    assert net.total_factor == (4, 4)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        default = model(x)
        assert torch.equal(net(x), default)
        for phases in ({0: (1, 1)}, {0: (0, 1), 1: (1, 0)}):
            out = net(x, phases=phases)
            assert (out - default).abs().max() > 1e-3
            torch.testing.assert_close(out, reference_forward(net, x, phases), rtol=1e-4, atol=1e-4)
