"""The à trous rewrite: equals shift-and-stitch where every later op is local, equals a dilated copy built by hand
where a global op follows (CGNet), and refuses by name what has no dilated form (ESPNet's transposed convs)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from polyglean import PhaseNet
from polyglean.errors import ArgumentError, ModelError
from polyglean.models.segmentation import CGNet, ESPNet
from polyglean.phase.atrous import atrous
from tests.phase.test_net import lively


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class TestEqualsStitching:
    """Without global ops after the sites the à trous network is what stitching interleaves."""

    @pytest.mark.parametrize("sites", [["layer4.0"], ["layer3.0", "layer4.0"]])
    def test_resnet18(self, sites: list[str]) -> None:
        body = lively(IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "out"}))
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            before = body(x)["out"]
        net = PhaseNet(body, input_size=(3, 64, 64))
        fine = atrous(body, sites, input_size=(3, 64, 64))
        with torch.no_grad():
            out, ref = fine(x)["out"], net.stitch(x, sites)["out"]
            assert torch.equal(body(x)["out"], before)  # the model itself is untouched
        side = {1: 4, 2: 8}[len(sites)]  # 64 / 32, made finer by 2 per site
        assert out.shape == ref.shape == (2, 512, side, side)
        assert rel(out, ref) < 1e-5
        assert [k for k, _ in fine.state_dict().items()] == list(body.state_dict())

    def test_torchvision_dilated_resnet50_os16_to_os8(self) -> None:
        os16 = lively(IntermediateLayerGetter(
            torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]), {"layer4": "out"}))
        os8 = IntermediateLayerGetter(
            torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]), {"layer4": "out"}).eval()
        os8.load_state_dict(os16.state_dict())
        fine = atrous(os16, ["layer3.0"], input_size=(3, 64, 64))
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert rel(fine(x)["out"], os8(x)["out"]) < 1e-5


def _cgnet_by_hand(model: CGNet) -> CGNet:
    """Level 3 at stride 1: its first conv unstrided, every later 3x3 conv dilated by 2 (padding alike)."""
    ref = copy.deepcopy(model)
    ref.level3_0.conv1x1.conv.stride = (1, 1)
    for block in [ref.level3_0, *ref.level3]:
        for conv in (block.F_loc.conv, block.F_sur.conv):
            conv.dilation = (conv.dilation[0] * 2, conv.dilation[1] * 2)
            conv.padding = (conv.padding[0] * 2, conv.padding[1] * 2)
    return ref


class TestGlobalOps:
    def test_cgnet_equals_a_dilated_copy_built_by_hand(self) -> None:
        model = lively(CGNet(11, 2, 3))
        fine = atrous(model, ["level3_0.conv1x1.conv"], input_size=(3, 64, 96))
        ref = _cgnet_by_hand(model).eval()
        x = torch.randn(2, 3, 64, 96)
        with torch.no_grad():
            out, want, plain = fine(x), ref(x), model(x)
        assert out.shape == want.shape == plain.shape == (2, 11, 64, 96)  # resized to the input: same size
        assert rel(out, want) < 1e-5
        assert rel(out, plain) > 1e-3  # a different network than the plain one

    def test_cgnet_global_mean_is_over_the_finer_map(self) -> None:
        """Stitching refuses CGNet; the à trous network's global means differ from any phase's."""
        model = lively(CGNet(11, 2, 3))
        net = PhaseNet(model, input_size=(3, 64, 96))
        with pytest.raises(ModelError, match="'mean'"):
            net.stitch(torch.randn(1, 3, 64, 96), ["level3_0.conv1x1.conv"])
        seen: list[torch.Tensor] = []
        fine = atrous(model, ["level3_0.conv1x1.conv"], input_size=(3, 64, 96))
        handle = fine.get_submodule("level3.0.F_glo.fc.0").register_forward_hook(
            lambda m, i, o: seen.append(i[0]))
        try:
            with torch.no_grad():
                x = torch.randn(1, 3, 64, 96)
                fine(x)
        finally:
            handle.remove()
        feats: list[torch.Tensor] = []
        ref = _cgnet_by_hand(model).eval()
        handle = ref.level3[0].F_glo.register_forward_hook(lambda m, i, o: feats.append(i[0]))
        try:
            with torch.no_grad():
                ref(x)
        finally:
            handle.remove()
        assert feats[0].shape[-2:] == (16, 24)  # level 3 at 1/4 instead of 1/8
        assert torch.allclose(seen[0], feats[0].mean((2, 3)), atol=1e-5)


class TestRefusals:
    def test_espnet_transposed_conv_named(self) -> None:
        model = ESPNet(12, 1, 1).eval()
        with pytest.raises(ModelError, match=r"'up_l3\.0' \(ConvTranspose2d\)"):
            atrous(model, ["encoder.level3_0.c1.conv"], input_size=(3, 64, 64))

    def test_fixed_factor_resize_named(self) -> None:
        class Head(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a = nn.Conv2d(3, 4, 3, 2, 1)
                self.b = nn.Conv2d(4, 4, 3, 1, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return F.interpolate(self.b(self.a(x)), scale_factor=2.0, mode="bilinear")

        with pytest.raises(ModelError, match="fixed factor"):
            atrous(Head().eval(), ["a"], input_size=(3, 16, 16))

    def test_unknown_site_and_unstrided_later_site(self) -> None:
        body = IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "out"}).eval()
        with pytest.raises(ArgumentError, match="unknown site 'layer9'"):
            atrous(body, ["layer9"], input_size=(3, 64, 64))
        with pytest.raises(ArgumentError, match="keeps its stride"):
            atrous(body, ["layer3.0"], input_size=(3, 64, 64))

    def test_average_pool_after_the_site_named(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AvgPool2d(3, 1, 1), nn.Conv2d(4, 2, 1)).eval()
        with pytest.raises(ModelError, match=r"layer '2' \(AvgPool2d\).*no dilated form"):
            atrous(model, ["0"], input_size=(3, 16, 16))


class TestAtrousStrides:
    """``atrous_strides`` (inspect's "à trous OS" column): the stride the à trous network from each site keeps, and
    ``None`` exactly where :func:`atrous` refuses, checked on shapes only (fake tensors, no arithmetic)."""

    def test_resnet18_backbone(self) -> None:
        from polyglean.phase.atrous import atrous_strides

        body = lively(IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "out"}))
        net = PhaseNet(body, input_size=(3, 64, 64))
        strides = atrous_strides(body, net)
        by_name = dict(zip([s.name for s in net.sites], strides))
        assert by_name["layer4.0"] == (16, 16) and by_name["layer3.0"] == (8, 8) and by_name["layer2.0"] == (4, 4)
        # the real network from layer3.0 (every later site unstrided) has that stride: 64 / 8 cells
        with torch.no_grad():
            out = atrous(body, ["layer3.0", "layer4.0"], input_size=(3, 64, 64))(torch.randn(1, 3, 64, 64))["out"]
        assert out.shape[-2:] == (8, 8)

    def test_espnet_refused_everywhere(self) -> None:
        from polyglean.phase.atrous import atrous_strides

        model = lively(ESPNet(classes=12, p=2, q=3))
        net = PhaseNet(model, input_size=(3, 64, 64))
        assert atrous_strides(model, net) == [None] * len(net.sites)
