"""Shift-and-stitch against independent references: torchvision's dilated ResNets, an à trous copy built by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from polyglean import PhaseNet
from polyglean.errors import ArgumentError, ModelError
from polyglean.phase.stitch import plan
from tests.phase.test_net import lively


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def resnet50_body(dilate: list[bool], returns: dict[str, str] | None = None) -> nn.Module:
    model = torchvision.models.resnet50(replace_stride_with_dilation=dilate)
    return IntermediateLayerGetter(model, returns or {"layer4": "out"}).eval()


def atrous(model: nn.Module, site_ops: dict[str, tuple[int, int]]) -> nn.Module:
    """An independent reference: a copy with the named ops at stride 1 and every later conv/pool dilated.

    ``site_ops`` maps each stitched op to its site's factor; modules are taken in definition order, which is the
    execution order of the models used here.
    """
    model = copy.deepcopy(model)
    fy = fx_ = 1
    pending: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        site = next((op for op in site_ops if name == op), None)
        if not isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            continue
        if site is None and pending:  # the first op after a site: later ops see the finer grid
            for r in {v for v in pending.values()}:
                fy, fx_ = fy * r[0], fx_ * r[1]
            pending.clear()
        if isinstance(m, nn.Conv2d):
            m.dilation = (m.dilation[0] * fy, m.dilation[1] * fx_)
            m.padding = (m.padding[0] * fy, m.padding[1] * fx_)
            if site is not None:
                m.stride = (1, 1)
                pending[site] = site_ops[site]
    return model


class TestExactness:
    @pytest.mark.slow
    def test_resnet50_os16_to_os8(self) -> None:
        os16 = lively(resnet50_body([False, False, True]))
        os8 = resnet50_body([False, True, True])
        os8.load_state_dict(os16.state_dict())
        net = PhaseNet(os16, input_size=(3, 64, 64))
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            out = net.stitch(x, sites=["layer3.0"])["out"]
            ref = os8(x)["out"]
        assert out.shape == ref.shape == (2, 2048, 8, 8)
        assert rel(out, ref) < 1e-5

    @pytest.mark.slow
    def test_resnet50_two_sites_and_dict_leaves(self) -> None:
        plain = lively(resnet50_body([False, False, False], {"layer2": "low", "layer4": "out"}))
        os8 = resnet50_body([False, True, True], {"layer2": "low", "layer4": "out"})
        os8.load_state_dict(plain.state_dict())
        net = PhaseNet(plain, input_size=(3, 64, 64))
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            out = net.stitch(x, sites=["layer3.0", "layer4.0"])
            chunked = net.stitch(x, sites=["layer4.0", "layer3.0"], chunk=3)
            ref = os8(x)
        assert list(out) == ["low", "out"]
        assert out["out"].shape == (1, 2048, 8, 8)
        assert rel(out["out"], ref["out"]) < 1e-5
        assert torch.equal(out["low"], ref["low"])  # before the sites: returned as computed, not interleaved
        assert rel(chunked["out"], out["out"]) < 1e-5

    def test_mobilenet_v3_by_hand(self) -> None:
        model = torchvision.models.mobilenet_v3_large().features
        for name, m in list(model.named_modules()):
            for child, sub in list(m.named_children()):
                if isinstance(sub, torchvision.ops.SqueezeExcitation):
                    setattr(m, child, nn.Identity())
        model = lively(model)
        net = PhaseNet(model, input_size=(3, 64, 64))
        last = net.sites[-1]
        ref_model = atrous(model, {op: last.factor for op in last.ops}).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            out = net.stitch(x, sites=[last.name])
            ref = ref_model(x)
        assert out.shape == ref.shape == (2, 960, 4, 4)
        assert rel(out, ref) < 1e-5

    def test_non_square_factors(self) -> None:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=(2, 3), padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, (3, 5), stride=(3, 2), padding=(1, 2)), nn.ReLU(),
            nn.Conv2d(8, 4, 3, padding=1),
        )
        model = lively(model)
        net = PhaseNet(model, input_size=(3, 36, 36))
        assert [s.factor for s in net.sites] == [(2, 3), (3, 2)]
        ref_model = atrous(model, {"2": (2, 3), "7": (3, 2)}).eval()
        x = torch.randn(2, 3, 36, 36)
        with torch.no_grad():
            out = net.stitch(x, sites=[0, 1], chunk=5)
            ref = ref_model(x)
        assert out.shape == ref.shape == (2, 4, 36, 36)
        assert rel(out, ref) < 1e-5

    @pytest.mark.slow
    def test_odd_size_rule(self) -> None:
        """At sizes the stride does not divide, every cell is still the phase state's cell (the documented rule)."""
        model = lively(resnet50_body([False, False, False]))
        net = PhaseNet(model, input_size=(3, 64, 64))
        x = torch.randn(1, 3, 100, 84)
        with torch.no_grad():
            out = net.stitch(x, sites=["layer3.0", "layer4.0"])["out"]
            default = net(x)["out"]
            h, w = default.shape[-2:]
            assert out.shape == (1, 2048, 4 * h, 4 * w)
            for (dy3, dx3), (dy4, dx4) in [((0, 0), (0, 0)), ((1, 0), (0, 1)), ((1, 1), (1, 1))]:
                state = net(x, phases={"layer3.0": (dy3, dx3), "layer4.0": (dy4, dx4)})["out"]
                assert rel(out[..., dy3 + 2 * dy4::4, dx3 + 2 * dx4::4], state) < 1e-5
        assert rel(out[..., ::4, ::4], default) < 1e-5


class TestRefusals:
    @pytest.fixture(scope="class")
    def resnet18(self) -> PhaseNet:
        return PhaseNet(lively(torchvision.models.resnet18()), input_size=(3, 64, 64))

    def test_global_pool_named(self, resnet18: PhaseNet) -> None:
        with pytest.raises(ModelError, match="'avgpool' \\(AdaptiveAvgPool2d\\)"):
            resnet18.stitch(torch.randn(1, 3, 64, 64), sites=["layer4.0"])

    def test_squeeze_excitation_named(self) -> None:
        net = PhaseNet(torchvision.models.mobilenet_v3_large().features.eval(), input_size=(3, 64, 64))
        with pytest.raises(ModelError, match="13.block.2.avgpool"):
            plan(net, [net.sites[-1].name])

    def test_not_a_suffix(self, resnet18: PhaseNet) -> None:
        body = PhaseNet(IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "o"}).eval(),
                        input_size=(3, 64, 64))
        with pytest.raises(ArgumentError, match="site 'layer4.0' lies after"):
            body.stitch(torch.randn(1, 3, 64, 64), sites=["layer3.0"])

    def test_unknown_site_and_bad_chunk(self, resnet18: PhaseNet) -> None:
        x = torch.randn(1, 3, 64, 64)
        with pytest.raises(ArgumentError, match="unknown site 'layer9'"):
            resnet18.stitch(x, sites=["layer9"])
        with pytest.raises(ArgumentError, match="at least one site"):
            resnet18.stitch(x, sites=[])
        with pytest.raises(ArgumentError, match="chunk"):
            resnet18.stitch(x, sites=["layer4.0"], chunk=0)

    def test_fixed_size_resize_named(self) -> None:
        class Seg(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return nn.functional.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear")

        net = PhaseNet(Seg().eval(), input_size=(3, 32, 32))
        with pytest.raises(ModelError, match="'interpolate'"):
            net.stitch(torch.randn(1, 3, 32, 32), sites=[1])


@pytest.fixture(scope="module")
def small() -> PhaseNet:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 5, padding=2), nn.ReLU(),
        nn.Conv2d(8, 5, 1),
    )
    return PhaseNet(lively(model), input_size=(3, 64, 64))


class TestMasked:

    def test_equals_full_inside_mask(self, small: PhaseNet) -> None:
        from polyglean.phase.stitch import stitch_masked

        x = torch.randn(2, 3, 96, 80)
        sites = [1, 2]
        with torch.no_grad():
            full = small.stitch(x, sites)
            plain = small(x)
            mask = torch.rand(2, full.shape[-2], full.shape[-1]) < 0.05
            res = stitch_masked(small, x, sites, mask, tile=(4, 6))
        assert res.halo == (15, 15)  # strided 3x3: 1, dilated 3x3 at x2: 2*2, max pool at x2: 1*2, 5x5 at x4: 2*4
        assert res.tiles > 1
        inside = mask[:, None].expand_as(full)
        assert torch.allclose(res.output[inside], full[inside], rtol=1e-5, atol=1e-5)
        nearest = plain.repeat_interleave(4, -2).repeat_interleave(4, -1)
        assert torch.equal(res.output[~inside], nearest[~inside])
        with torch.no_grad():  # a halo too small to hold the receptive field: crops see false borders
            short = stitch_masked(small, x, sites, mask, tile=(4, 6), halo=1)
        assert not torch.allclose(short.output[inside], full[inside], rtol=1e-5, atol=1e-5)

    def test_auto_tile_and_mask_functions(self, small: PhaseNet) -> None:
        from polyglean.phase.stitch import edge_mask, stitch_masked, uncertain_mask

        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            full = small.stitch(x, [1, 2])
            res = stitch_masked(small, x, [1, 2], lambda out: edge_mask(out, (4, 4), 1))
        inside = res.mask[:, None].expand_as(full)
        assert torch.allclose(res.output[inside], full[inside], rtol=1e-5, atol=1e-5)
        assert res.tile[0] % 4 == 0 and res.tile[1] % 4 == 0 and res.computed <= 1.0  # never more than full

        scores = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]], [[0.0, 5.0], [0.1, 0.1]]]])  # (1, 2, 2, 2)
        labels_edge = edge_mask(scores, (2, 2), 0)
        assert labels_edge.shape == (1, 4, 4)
        # class 0 only at the top-left cell: the boundary is on both sides of its two fine edges
        assert labels_edge[0].int().tolist() == [[0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
        assert edge_mask(scores, (2, 2), 1)[0].sum() == 15 and not edge_mask(scores, (2, 2), 1)[0, 3, 3]
        low = uncertain_mask(scores, (2, 2), 0.6)
        assert low[0].int().tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]

    def test_bad_mask(self, small: PhaseNet) -> None:
        from polyglean.phase.stitch import stitch_masked

        with pytest.raises(ArgumentError, match="mask must be a bool tensor of shape \\(1, 32, 32\\)"):
            stitch_masked(small, torch.randn(1, 3, 64, 64), [1, 2], torch.ones(1, 16, 16, dtype=torch.bool))
        with pytest.raises(ArgumentError, match="tile"):
            stitch_masked(small, torch.randn(1, 3, 64, 64), [1, 2], torch.ones(1, 32, 32, dtype=torch.bool), tile=0)


def test_stitch_strides() -> None:
    from polyglean.phase.stitch import stitch_strides

    body = PhaseNet(IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "o"}).eval(),
                    input_size=(3, 64, 64))
    assert stitch_strides(body) == [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]
    full = PhaseNet(torchvision.models.resnet18().eval(), input_size=(3, 64, 64))
    assert stitch_strides(full) == [None] * 5


class _Injection(nn.Module):
    """A main path and a side branch that pools the image twice and meets it at level 2 (as ESPNet's input
    projections do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.pool_a = nn.AvgPool2d(3, 2, 1)
        self.pool_b = nn.AvgPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, 2, 1)
        self.conv3 = nn.Conv2d(7, 2, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat([self.conv2(torch.relu(self.conv1(x))), self.pool_b(self.pool_a(x))], 1))


class TestBranches:
    def test_side_branch_rules(self) -> None:
        net = PhaseNet(_Injection().eval(), input_size=(3, 32, 32))
        assert [(s.name, s.ops) for s in net.sites] == [("conv1", ("conv1",)), ("conv2", ("conv2", "pool_b")),
                                                         ("pool_a", ("pool_a",))]
        level2 = net.site("conv2")
        with pytest.raises(ArgumentError, match=f"site '{level2.name}' lies after the stitched site 'pool_a'"):
            plan(net, ["pool_a"])
        with pytest.raises(ArgumentError, match="different stitched sites"):
            plan(net, ["pool_a", level2.name])
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            out = net.stitch(x, [level2.name])
            for dy, dx in [(0, 1), (1, 1)]:
                assert torch.allclose(out[..., dy::2, dx::2], net(x, phases={level2.name: (dy, dx)}), atol=1e-6)

    def test_camvid_models_refused_by_name(self) -> None:
        from polyglean.models.segmentation import cgnet_camvid, espnet_camvid

        espnet = PhaseNet(espnet_camvid().eval(), input_size=(3, 64, 64))
        with pytest.raises(ModelError, match="'up_l3.0' \\(ConvTranspose2d\\)"):
            plan(espnet, [espnet.sites[-1].name])
        cgnet = PhaseNet(cgnet_camvid().eval(), input_size=(3, 64, 64))
        with pytest.raises(ModelError, match="'mean'"):
            plan(cgnet, [cgnet.sites[-1].name])


def test_stitch_strides_ignore_a_side_branch() -> None:
    """An image projection beside the main path (CGNet, ESPNet) subsamples too, but the finer map's stride is the
    stride of the stitched site's input, and the stitched map really has it."""
    from polyglean.phase.stitch import stitch_strides

    class Projected(nn.Module):  # as CGNet's: the image, pooled twice, joins the main path at 1/4
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, 2, 1)
            self.pool0, self.pool1 = nn.AvgPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1)
            self.b = nn.Conv2d(4, 4, 3, 2, 1)
            self.c = nn.Conv2d(7, 4, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([self.b(self.a(x)), self.pool1(self.pool0(x))], 1))

    model = Projected().eval()
    net = PhaseNet(model, input_size=(3, 32, 32))
    strides = dict(zip([s.name for s in net.sites], stitch_strides(net)))
    assert strides["b"] == (2, 2)
    with torch.no_grad():
        assert net.stitch(torch.randn(1, 3, 32, 32), ["b"]).shape[-2:] == (16, 16)  # 32 / 2
