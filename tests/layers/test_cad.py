"""CAD (content-adaptive downsampling): the function against a naive loop, gradients, masks, the model rewrite."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models._utils import IntermediateLayerGetter

import polyglean
from polyglean import PhaseNet
from polyglean.errors import ArgumentError, ModelError
from polyglean.layers.cad import (
    CADMask,
    CADPool2d,
    cad_multiply_adds,
    cad_pool2d,
    cad_swap,
    gumbel_mask,
    image_edge_mask,
)
from tests.phase.test_net import lively


def naive_cad(x: torch.Tensor, mask: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
    out = x.clone()
    n, c, h, w = x.shape
    for b in range(n):
        for i in range(mask.shape[-2]):
            for j in range(mask.shape[-1]):
                ys, xs = slice(i * rh, min(h, (i + 1) * rh)), slice(j * rw, min(w, (j + 1) * rw))
                m = float(mask[b, 0, i, j])
                mean = x[b, :, ys, xs].mean(dim=(-2, -1), keepdim=True)
                out[b, :, ys, xs] = m * x[b, :, ys, xs] + (1 - m) * mean
    return out


class TestCADPool:
    @pytest.mark.parametrize("shape,factor", [((2, 3, 8, 8), (2, 2)), ((1, 2, 7, 10), (2, 3)), ((2, 1, 9, 9), (3, 3))])
    def test_against_naive_loop(self, shape: tuple[int, ...], factor: tuple[int, int]) -> None:
        x = torch.randn(*shape)
        cells = (-(-shape[2] // factor[0]), -(-shape[3] // factor[1]))
        mask = (torch.rand(shape[0], 1, *cells) < 0.5).float()
        out = cad_pool2d(x, mask, factor)
        assert torch.allclose(out, naive_cad(x, mask, *factor), atol=1e-6)
        assert torch.equal(CADPool2d(factor)(x, mask), out)
        assert torch.equal(cad_pool2d(x, torch.ones_like(mask), factor), x)

    def test_non_contiguous_and_soft_mask(self) -> None:
        x = torch.randn(2, 6, 8, 3).permute(0, 3, 1, 2)  # (2, 3, 6, 8), not contiguous
        mask = torch.rand(2, 3, 4)
        assert torch.allclose(cad_pool2d(x, mask), naive_cad(x, mask[:, None], 2, 2), atol=1e-6)

    def test_gradcheck(self) -> None:
        x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
        mask = torch.rand(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, m: cad_pool2d(a, m, (2, 2)), (x, mask))

    def test_bad_input(self) -> None:
        with pytest.raises(ArgumentError, match=r"mask must have shape \(1, 1, 2, 2\)"):
            cad_pool2d(torch.randn(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
        with pytest.raises(ArgumentError, match="factor"):
            cad_pool2d(torch.randn(1, 1, 4, 4), torch.ones(1, 1, 4, 4), 0)


class TestMasks:
    def test_edge_mask(self) -> None:
        image = torch.zeros(1, 3, 16, 16)
        image[..., :, 8:] = 1.0  # a vertical edge between columns 7 and 8
        mask = image_edge_mask(image, (4, 4), threshold=0.1, width=0)
        assert mask.shape == (1, 1, 4, 4)
        assert mask[0, 0].tolist() == [[0, 1, 1, 0]] * 4
        # the Sobel edge covers columns 7 and 8; a width of 3 reaches 4..11, of 4 reaches 3..12
        assert image_edge_mask(image, (4, 4), threshold=0.1, width=3)[0, 0].tolist() == [[0, 1, 1, 0]] * 4
        assert image_edge_mask(image, (4, 4), threshold=0.1, width=4)[0, 0].tolist() == [[1, 1, 1, 1]] * 4
        assert image_edge_mask(image, (4, 4), threshold=2.0).sum() == 0

    def test_gumbel(self) -> None:
        logits = torch.tensor([[[[3.0, -3.0]], [[-3.0, 3.0]]]])  # keep the second cell
        assert gumbel_mask(logits, training=False).tolist() == [[[[0.0, 1.0]]]]
        logits.requires_grad_(True)
        m = gumbel_mask(logits, tau=0.5, training=True)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        m.sum().backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0

    def test_learned_mask_module(self) -> None:
        module = CADMask("learned", 2, channels=4, keep=0.8)
        feats = torch.randn(2, 4, 6, 6)
        assert module.eval()(feats).shape == (2, 1, 3, 3)
        assert module.eval()(feats).sum() == 18  # starts keeping (bias log-odds of 0.8 > 0.5, zero weights)
        with pytest.raises(ArgumentError, match="needs the feature channels"):
            CADMask("learned")
        with pytest.raises(ArgumentError, match="needs the input image"):
            CADMask("edge")(feats)


def resnet50_body(dilate: list[bool]) -> nn.Module:
    return IntermediateLayerGetter(torchvision.models.resnet50(replace_stride_with_dilation=dilate),
                                   {"layer4": "out"}).eval()


class TestSwap:
    @pytest.mark.slow
    def test_all_kept_is_the_dilated_network(self) -> None:
        plain = lively(resnet50_body([False, False, False]))
        os16 = resnet50_body([False, False, True])
        os16.load_state_dict(plain.state_dict())
        cad = polyglean.swap(plain, "cad", input_size=(3, 64, 64), threshold=0.0)  # every pixel is an edge
        assert [n for n, _ in cad.named_modules() if "cad" in n] == ["layer4.0.cad_mask", "layer4.0.cad_pool"]
        cad.load_state_dict(plain.state_dict(), strict=False)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            out, ref = cad(x)["out"], os16(x)["out"]
        assert out.shape == ref.shape == (2, 2048, 4, 4)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
        none = polyglean.swap(plain, "cad", input_size=(3, 64, 64), threshold=1e9)  # no edge: every cell pooled
        with torch.no_grad():
            flat = none(x)["out"]
        assert torch.allclose(flat, flat[..., ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1))

        net = PhaseNet(plain, input_size=(3, 64, 64))
        total = sum(net.segment_flops())
        assert cad_multiply_adds(net, "layer4.0", 0.0) == total / 2
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            cad(torch.randn(1, 3, 64, 64))
        sobel = 2 * 2 * 64 * 64 * 9
        assert cad_multiply_adds(net, "layer4.0", 1.0) == pytest.approx((counter.get_total_flops() - sobel) / 2)

    def test_learned_trains(self) -> None:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(),
                              nn.Conv2d(4, 2, 3, padding=1))
        cad = cad_swap(model, mask="learned", input_size=(3, 16, 16), keep=0.5).train()
        out = cad(torch.randn(2, 3, 16, 16))
        assert out.shape == (2, 2, 8, 8)
        out.square().sum().backward()
        assert cad.get_submodule("2.cad_mask").predict.weight.grad.abs().sum() > 0
        assert cad.get_submodule("4").dilation == (2, 2) and cad.get_submodule("4").padding == (2, 2)
        assert model[4].dilation == (1, 1)  # the input model is not modified

    def test_refusals(self) -> None:
        with pytest.raises(ModelError, match="'avgpool' \\(AdaptiveAvgPool2d\\)"):
            polyglean.swap(torchvision.models.resnet18(), "cad", input_size=(3, 64, 64))
        body = IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "out"})
        with pytest.raises(ModelError, match="site 'layer4.0' lies after"):
            cad_swap(body, site="layer3.0", input_size=(3, 64, 64))
        with pytest.raises(ArgumentError, match="'edge' or 'learned'"):
            cad_swap(body, mask="sobel", input_size=(3, 64, 64))
        with pytest.raises(ArgumentError, match="unknown CAD option"):
            cad_swap(body, input_size=(3, 64, 64), filter_size=3)
        with pytest.raises(ArgumentError, match="unknown site 'layer9'"):
            cad_swap(body, site="layer9", input_size=(3, 64, 64))
