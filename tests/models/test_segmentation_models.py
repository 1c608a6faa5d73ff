"""Segmentation models under PhaseNet: torchvision's (random weights), the CamVid presets' architectures and a
SegFormer-style model: sites, bit-exact default, non-default states against the reference executor, and the dense
search on them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from polyglean import PhaseNet
from polyglean.models.segmentation import cgnet_camvid, espnet_camvid
from polyglean.search.dense import DenseSearch, main_path
from tests.phase.test_net import lively
from tests.reference import reference_forward


class _OverlapPatchEmbed(nn.Module):
    """SegFormer's overlapping patch embedding: a strided conv (kernel > stride), then LayerNorm over channels."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, k, stride, k // 2)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _EfficientAttention(nn.Module):
    """Self-attention whose keys and values come from a spatially reduced map (a conv of stride ``sr``)."""

    def __init__(self, c: int, sr: int) -> None:
        super().__init__()
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(c, 2 * c)
        self.sr = nn.Conv2d(c, c, sr, sr) if sr > 1 else nn.Identity()
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.q(x.flatten(2).transpose(1, 2))
        kv = self.kv(self.sr(x).flatten(2).transpose(1, 2))
        k, v = kv[..., :c], kv[..., c:]
        att = (q @ k.transpose(1, 2) / c ** 0.5).softmax(-1)
        out = self.proj(att @ v)
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class TinySegFormer(nn.Module):
    """A SegFormer-style model: 4 stages of overlapping patch embeddings (strides 4, 2, 2, 2) and spatial-reduction
    attention, an all-MLP decoder upsampling every stage to 1/4, and a last bilinear upsampling to the input."""

    def __init__(self, classes: int = 5, dims: tuple[int, ...] = (8, 16, 16, 16)) -> None:
        super().__init__()
        self.embeds = nn.ModuleList()
        self.blocks = nn.ModuleList()
        c_in = 3
        for i, (c, sr) in enumerate(zip(dims, (8, 4, 2, 1))):
            self.embeds.append(_OverlapPatchEmbed(c_in, c, 7 if i == 0 else 3, 4 if i == 0 else 2))
            self.blocks.append(_EfficientAttention(c, sr))
            c_in = c
        self.linear = nn.ModuleList([nn.Conv2d(c, 16, 1) for c in dims])
        self.fuse = nn.Conv2d(16 * len(dims), 16, 1)
        self.cls = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for embed, block in zip(self.embeds, self.blocks):
            h = block(embed(h))
            feats.append(h)
        size = feats[0].shape[-2:]
        up = [F.interpolate(lin(f), size=size, mode="bilinear", align_corners=False)
              for lin, f in zip(self.linear, feats)]
        out = self.cls(self.fuse(torch.cat(up, 1)))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _tv(name: str) -> nn.Module:
    return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=5)


# name -> (builder, (H, W), output stride)
MODELS = {
    "fcn_resnet50": (lambda: _tv("fcn_resnet50"), (64, 64), 8),
    "deeplabv3_resnet50": (lambda: _tv("deeplabv3_resnet50"), (64, 64), 8),
    "deeplabv3_mobilenet_v3_large": (lambda: _tv("deeplabv3_mobilenet_v3_large"), (64, 64), 16),
    "lraspp_mobilenet_v3_large": (lambda: _tv("lraspp_mobilenet_v3_large"), (64, 64), 16),
    "espnet": (espnet_camvid, (32, 48), 8),
    "cgnet": (cgnet_camvid, (32, 48), 8),
    "segformer_style": (TinySegFormer, (64, 64), 32),
}


def _out(y: object) -> torch.Tensor:
    return y["out"] if isinstance(y, dict) else y  # type: ignore[index]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, PhaseNet, torch.Tensor]:
    build, (h, w), _ = MODELS[request.param]
    torch.manual_seed(0)
    model = lively(build())
    net = PhaseNet(model, input_size=(3, h, w))
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    return request.param, model, net, x


@pytest.mark.slow
class TestSegmentationModels:
    def test_sites_and_output_stride(self, case: tuple) -> None:
        name, _, net, _ = case
        stride = MODELS[name][2]
        assert len(net.sites) >= 3, (name, net.sites)
        assert net.max_reduction == (stride, stride), name  # the output stride: the largest path reduction
        chain = main_path(net.sites)
        assert math.prod(s.factor[0] for s in chain) == stride, (name, chain)
        assert chain[-1] == net.sites[-1] and tuple(chain[0].in_size) == tuple(net.input_size[1:])

    def test_default_is_bit_exact_and_full_size(self, case: tuple) -> None:
        _, model, net, x = case
        with torch.no_grad():
            ref = _out(model(x))
            assert torch.equal(_out(net(x)), ref)
        assert tuple(ref.shape[-2:]) == tuple(x.shape[-2:])  # the last op upsamples to the input size

    def test_non_default_state_matches_reference(self, case: tuple) -> None:
        name, model, net, x = case
        chain = [s for s in net.sites]
        phases = {chain[1].index: (1, 1), chain[-1].index: (1, 0)}
        with torch.no_grad():
            default = _out(model(x))
            out = _out(net(x, phases={net.sites[i].name: p for i, p in phases.items()}))
        ref = _out(reference_forward(net, x, phases))
        scale = default.abs().max().item()
        assert (out - default).abs().max().item() > 1e-4 * scale, f"{name}: the state did not change the output"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)

    def test_dense_search_runs_and_b1_is_exact(self, case: tuple) -> None:
        _, model, net, x = case
        search = DenseSearch(net, budget=4, criterion="entropy", aggregate="entropy")
        result = search.run(x, budgets=[1, 4])
        with torch.no_grad():
            assert torch.equal(result.logits[1], _out(model(x)))
        assert result.logits[4].shape == result.logits[1].shape
        assert result.states.shape[:2] == (2, 4)
        assert 1.0 < result.forward_equivalents_at(4) <= 4.0
