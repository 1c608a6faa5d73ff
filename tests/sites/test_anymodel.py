"""Issue 17's models: multi-branch networks, attention with spatial reduction, ViTs, opaque timm blocks.

Random weights, small inputs where the model allows them; each passes the zoo's four checks (sites found, bit-exact
default, a phase at a middle site changes the output, and it matches the reference executor).
"""

from __future__ import annotations

from pathlib import Path

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


def test_starnet_float64_difference_is_the_models_rounding_floor() -> None:
    """StarNet's star blocks multiply two branches element-wise: random activations grow block by block, and so
    does any rounding difference. The phase op agrees with the stride-1 reference to rounding at the site; at the
    output the float64 difference is what a one-epsilon perturbation of the site's output makes there (the rounding
    floor), while a wrong phase is far beyond it."""
    import copy

    from tests.reference import reference_forward

    model = build("starnet_s1").double()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    net = PhaseNet(model, (3, 96, 96))
    site = net.site("stages.1.0.conv")
    # up to the end of stage 1 (the site and the blocks after it): equal to rounding
    head = nn.Sequential(model.stem, model.stages[0], model.stages[1]).eval()
    short = PhaseNet(head, (3, 96, 96))
    with torch.no_grad():
        moved = short(x, phases={short.sites[2].name: (1, 1)})
    ref = reference_forward(short, x, {2: (1, 1)})
    assert (moved - ref).abs().max() <= 1e-13 * ref.abs().max()
    # at the output: amplified to far beyond 1e-9 of it, but within the rounding floor
    with torch.no_grad():
        moved = net(x, phases={site.name: (1, 1)})
    ref = reference_forward(net, x, {site.index: (1, 1)})
    eps = torch.finfo(torch.float64).eps
    floor = (reference_forward(net, x, {site.index: (1, 1)}, noise=eps) - ref).abs().max()
    err, scale = (moved - ref).abs().max(), ref.abs().max()
    assert err > 1e-9 * scale and floor > 1e-9 * scale
    assert err <= 10 * floor and err <= 1e-3 * scale
    # a wrong phase breaks the rule: the check can fail
    wrong = reference_forward(net, x, {site.index: (1, 0)})
    assert (moved - wrong).abs().max() > 1e-3 * scale and (moved - wrong).abs().max() > 10 * floor
    check(PhaseNet(copy.deepcopy(model).float(), (3, 96, 96)), copy.deepcopy(model).float(), x.float())


def test_repvgg_random_logits_depend_on_the_input() -> None:
    """timm's RepVGG initialisation (batch-norm weights ~ N(0.1, 0.1^2), random biases) leaves logits that do not
    depend on the input; with lively()'s identity affine norms a phase at a middle site changes them."""
    torch.manual_seed(0)
    raw = timm.create_model("repvgg_b0", pretrained=False).eval()
    x, y = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (raw(x) - raw(y)).abs().max() < 1e-5 * raw(x).abs().max()
    model = build("repvgg_b0")
    with torch.no_grad():
        assert (model(x) - model(y)).abs().max() > 1e-2 * model(x).abs().max()
    check(PhaseNet(model, (3, 96, 96)), model, x)


@pytest.mark.slow
def test_tresnet_branch_and_shortcut_are_one_site() -> None:
    """A TResNet block's anti-aliased strided branch and its pooled shortcut meet at the add: one site, on the main
    path (each alone was once a site off it, and a phase in the branch, zeroed by timm's initialisation of its last
    norm, changed nothing)."""
    model = build("tresnet_l")
    net = PhaseNet(model, (3, 96, 96))
    assert [s.ops for s in net.sites][1] == ("body.layer3.0.downsample.0", "body.layer3.0.conv2.aa.conv2d")
    assert all(s.main_path for s in net.sites)
    check(net, model, torch.randn(2, 3, 96, 96))


@pytest.mark.slow
def test_naflexvit_has_no_strided_op() -> None:
    """NaFlexViT cuts patches by a reshape and embeds them by a linear layer: no site, reported as such."""
    from tests.zoo import check_model

    result = check_model("naflexvit", "naflexvit_base_patch16_gap")
    assert (result.status, result.sites) == ("no sites", 0), result


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
    # what the refusal suggests: name the sites, aggregate logits
    search = PhaseSearch(net, budget=3, search_space=["patch_embed.0.proj"], aggregate_on="logits")
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        assert torch.equal(PhaseSearch(net, budget=1, search_space=["patch_embed.0.proj"],
                                       aggregate_on="logits")(x), model(x))
        assert search(x).shape == (1, 1000)


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


@pytest.mark.slow
def test_crossvit_refusal_is_what_the_cli_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`polyglean inspect` lists both patch embeddings as off the main path; `polyglean eval` stops with one line
    naming both, before any image is evaluated."""
    from PIL import Image

    from polyglean.cli.main import main

    assert main(["inspect", "timm:crossvit_tiny_240", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1].startswith("no site lies on the main path") and "--search-space" in lines[-1]
    rows = {line.split()[1]: line.split() for line in lines[3:-1]}
    assert set(rows) == {"patch_embed.0.proj", "patch_embed.1.proj"}
    assert rows["patch_embed.0.proj"][3] == "12x12" and rows["patch_embed.1.proj"][3] == "16x16"
    assert all("off" in row for row in rows.values())
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / cls / "0.png")
    assert main(["eval", "--model", "timm:crossvit_tiny_240", "--random-weights", "--data", str(tmp_path),
                 "--budgets", "1,4", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("polyglean eval: error: no subsampling site of CrossVit lies on its main path")
    assert "patch_embed.0.proj (12, 12)" in err and "patch_embed.1.proj (16, 16)" in err
    assert "search_space" in err
