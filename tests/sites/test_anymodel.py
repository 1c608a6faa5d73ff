"""Issue 17's models: multi-branch networks, attention with spatial reduction, ViTs, opaque timm blocks.

Random weights, small inputs where the model allows them; each passes the zoo's four checks (sites found, bit-exact
default, a phase at a middle site changes the output, and it matches the reference executor).
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import vgg
from torch import nn

from polyglean import PhaseNet, PhaseSearch
from polyglean.errors import ModelError
from tests.zoo import check, lively


def build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return lively(timm.create_model(name, pretrained=False, **kwargs))


def test_pvt_spatial_reduction_sites_are_off_the_main_path() -> None:
    model = build("pvt_v2_b0")
    net = PhaseNet(model, (3, 64, 64))
    main = [s for s in net.sites if s.main_path]
    off = [s for s in net.sites if not s.main_path]
    assert [s.name for s in main] == ["patch_embed.proj", "stages.1.downsample.proj", "stages.2.downsample.proj",
                                      "stages.3.downsample.proj"]
    assert off and all(s.name.endswith("attn.sr") for s in off)
    # keys and values are reduced 8x in stage 1 (32 in all): the path through them, not the product of all sites
    assert [s.reduction for s in main] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert {s.reduction for s in off} == {(32, 32)}
    assert net.total_factor == (32, 32) and net.max_reduction == (32, 32)
    check(net, model, torch.randn(2, 3, 64, 64))
    # an off-path site is searchable by name, and its phase is exact against the reference too
    search = PhaseSearch(net, budget=3, search_space=[off[0].name], aggregate_on="logits")
    assert search.search_space == [off[0]]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(PhaseSearch(net, budget=1)(x), model(x))
        assert search(x).shape == (1, 1000)


def test_default_search_space_and_alignment_follow_the_main_path() -> None:
    net = PhaseNet(build("pvt_v2_b0"), (3, 64, 64))
    search = PhaseSearch(net, budget=4)
    assert [s.name for s in search.search_space] == ["stages.1.downsample.proj", "stages.2.downsample.proj"]
    first = search.search_space[0].index
    assert net.alignment_factor(first) == (8, 8)  # from the input of stage 1's downsampling (r=4) to r=32
    states = torch.zeros(1, len(net.sites), dtype=torch.long)
    off = next(s for s in net.sites if not s.main_path and s.index > first)
    states[0, off.index] = 3
    assert net.displacement(states, first).tolist() == [[0, 0]]  # off the main path: no displacement
    states[0, search.search_space[1].index] = 3  # (1, 1) at stage 2's downsampling: 2 pixels of stage 1's grid
    assert net.displacement(states, first).tolist() == [[2, 2]]


def test_hrnet_reduction_per_path() -> None:
    model = build("hrnet_w18_small")
    net = PhaseNet(model, (3, 64, 64))
    assert net.max_reduction == (32, 32) and net.total_factor == (32, 32)
    assert max(s.level for s in net.sites) == 5
    assert {s.reduction for s in net.sites} == {(2, 2), (4, 4), (8, 8), (16, 16), (32, 32)}
    assert any(not s.main_path for s in net.sites)  # parallel branches: no single site at 8x or 16x is a cut
    check(net, model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_arguments_with_defaults_are_traced_at_their_defaults(name: str) -> None:
    model = build(name, img_size=64)
    net = PhaseNet(model, (3, 64, 64))
    assert [(s.name, s.factor) for s in net.sites] == [("patch_embed.proj", (16, 16))]
    check(net, model, torch.randn(2, 3, 64, 64))


def test_valid_conv_that_shrinks_a_map_is_not_subsampling() -> None:
    """timm vgg's pre_logits: a 7x7 valid convolution on a 7x7 map (stride 1), opaque to tracing."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), vgg.ConvMlp(8, 16, kernel_size=7)).eval()
    net = PhaseNet(model, (3, 14, 14))
    assert [s.name for s in net.sites] == ["0"]
    x = torch.randn(2, 3, 14, 14)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))


def test_opaque_module_with_a_stride_inside_is_refused() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = nn.Sequential(Block()).eval()
    with pytest.raises(ModelError, match=r"'0' \(Block\).*stride at '0.conv'.*opaque"):
        PhaseNet(model, (3, 16, 16), leaf_modules=[Block])


@pytest.mark.slow
def test_vgg11_pre_logits() -> None:
    model = build("vgg11")
    net = PhaseNet(model, (3, 224, 224))
    assert [s.factor for s in net.sites] == [(2, 2)] * 5 and net.total_factor == (32, 32)
    check(net, model, torch.randn(1, 3, 224, 224))


@pytest.mark.slow
def test_nfnet_traced_into_its_norm_free_blocks() -> None:
    model = build("nfnet_l0")
    net = PhaseNet(model, (3, 64, 64))
    names = [s.name for s in net.sites]
    assert "stages.1.0" in names and len(net.sites) == 5  # NormFreeBlock's strided conv and shortcut pool
    assert any("conv2" in op for op in net.site("stages.1.0").ops)
    check(net, model, torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_crossvit_default_search_is_refused_clearly() -> None:
    """Two patch sizes (12 and 16) in parallel branches: PhaseNet runs each exactly, but no site is on the main
    path, so there is no default search space nor a common grid to align: the default search is refused."""
    model = build("crossvit_tiny_240")
    net = PhaseNet(model, (3, 240, 240))
    assert [s.factor for s in net.sites] == [(12, 12), (16, 16)]
    assert not any(s.main_path for s in net.sites)
    check(net, model, torch.randn(1, 3, 240, 240))
    with pytest.raises(ModelError, match="no subsampling site of CrossVit lies on its main path"):
        PhaseSearch(net, aggregate_on="logits")


@pytest.mark.parametrize("cls", ["StdConv2dSame", "ScaledStdConv2dSame"])
def test_weight_standardised_same_conv_is_an_op_kind(cls: str) -> None:
    """timm's untraceable weight-standardised "SAME" convs (ViT hybrids' stems) run at every phase exactly."""
    from timm.layers import std_conv

    from tests.reference import reference_forward

    torch.manual_seed(0)
    model = nn.Sequential(getattr(std_conv, cls)(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    net = PhaseNet(model, (3, 15, 15))
    assert [(s.name, s.factor) for s in net.sites] == [("0", (2, 2))]
    assert net.discovery.ops[next(iter(net.discovery.ops))][0].kind == "std_conv_same"
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        for phase in [(0, 1), (1, 0), (1, 1)]:
            torch.testing.assert_close(net(x, phases={"0": phase}), reference_forward(net, x, {0: phase}),
                                       rtol=1e-5, atol=1e-5)


def test_padding_is_not_upsampling() -> None:
    """A reflect pad before a strided blur grows the map by 2: the reduction must not drop (sites still group)."""
    import torch.nn.functional as F

    class Blur(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), torch.ones(3, 1, 3, 3, device=x.device) / 9,
                            stride=2, groups=3)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blur = Blur()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blur(x) + x[:, :, ::2, ::2]

    net = PhaseNet(Block().eval(), (3, 16, 16))
    assert len(net.sites) == 1 and net.sites[0].reduction == (2, 2) and net.sites[0].main_path
