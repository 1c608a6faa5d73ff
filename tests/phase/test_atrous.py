"""The à trous rewrite: equals shift-and-stitch where every later op is local, equals a dilated copy built by hand
where a global op follows (CGNet), turns a kernel = stride transposed conv (ESPNet's decoder) into its own
sub-kernel per cell, and refuses by name what has no dilated form."""

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


class _Decoder(nn.Module):
    """Two stride-2 convs (with 3x3 convs after each), then a kernel = stride = 2 transposed conv."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.a, self.a2 = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1)
        self.b, self.b2 = nn.Conv2d(4, 6, 3, 2, 1), nn.Conv2d(6, 6, 3, 1, 1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.b2(torch.relu(self.b(self.a2(torch.relu(self.a(x)))))))


class TestTransposedConv:
    """A kernel = stride transposed conv after the sites becomes a 1x1 conv with each cell's own sub-kernel: the
    interleaving, on its output grid, of every phase's output at the cells that phase's samples cover."""

    @pytest.mark.parametrize("groups", [1, 2])
    def test_one_site_consumed_whole(self, groups: int) -> None:
        model = lively(_Decoder(groups))
        net = PhaseNet(model, input_size=(3, 16, 24))
        fine = atrous(model, ["b"], input_size=(3, 16, 24))
        assert fine.output_factor == (1, 1)
        x = torch.randn(2, 3, 16, 24)
        with torch.no_grad():
            out = fine(x)
            assert out.shape == model(x).shape == (2, 4, 8, 12)  # the trained output grid: nothing finer
            for dy in range(2):
                for dx in range(2):  # cell (2i + dy, 2j + dx) is covered by phase (dy, dx)'s samples
                    ref = net(x, phases={"b": (dy, dx)})
                    assert torch.allclose(out[..., dy::2, dx::2], ref[..., dy::2, dx::2], atol=1e-6)
        assert list(fine.state_dict()) == list(model.state_dict())

    def test_two_sites_one_factor_left(self) -> None:
        model = lively(_Decoder())
        net = PhaseNet(model, input_size=(3, 16, 24))
        fine = atrous(model, ["a", "b"], input_size=(3, 16, 24))
        assert fine.output_factor == (2, 2)
        x = torch.randn(1, 3, 16, 24)
        with torch.no_grad():
            out = fine(x)
            assert out.shape == (1, 4, 16, 24)  # twice as fine as the trained output (8x12)
            for m in range(16):
                for n in range(24):  # state: site a's phase m % 2, site b's (m // 2) % 2; its output cell m // 2
                    ref = net(x, phases={"a": (m % 2, n % 2), "b": ((m // 2) % 2, (n // 2) % 2)})
                    assert torch.allclose(out[..., m, n], ref[..., m // 2, n // 2], atol=1e-6)

    def test_espnet_builds_and_keeps_its_output_grid(self) -> None:
        model = lively(ESPNet(12, 1, 1))
        fine = atrous(model, ["encoder.level3_0.c1.conv"], input_size=(3, 64, 64))
        assert fine.output_factor == (1, 1)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert fine(x).shape == model(x).shape
        assert sorted(fine.state_dict()) == sorted(model.state_dict())
        two = atrous(model, ["encoder.level2_0.c1.conv", "encoder.level3_0.c1.conv"], input_size=(3, 64, 64))
        with torch.no_grad():
            assert two(x).shape == model(x).shape


class TestRefusals:
    def test_transposed_conv_without_an_atrous_form_named(self) -> None:
        class Overlap(nn.Module):  # kernel 4 > stride 2: the upsampled cells overlap
            def __init__(self) -> None:
                super().__init__()
                self.a = nn.Conv2d(3, 4, 3, 2, 1)
                self.up = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.up(self.a(x))

        with pytest.raises(ModelError, match=r"'up' \(ConvTranspose2d\).*kernel = stride"):
            atrous(Overlap().eval(), ["a"], input_size=(3, 16, 16))

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

    def test_refused_where_atrous_refuses(self) -> None:
        from polyglean.phase.atrous import atrous_strides

        class Skip(nn.Module):  # a resize by a fixed factor between the sites: no à trous form from 'a'
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1)
                self.c = nn.Conv2d(4, 4, 3, 1, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.a(x)
                y = y + F.interpolate(y, scale_factor=2.0)[..., : y.shape[-2], : y.shape[-1]]
                return self.c(self.b(y))

        model = Skip().eval()
        net = PhaseNet(model, input_size=(3, 16, 16))
        by_name = dict(zip([s.name for s in net.sites], atrous_strides(model, net)))
        assert by_name["b"] == (2, 2) and by_name["a"] is None
