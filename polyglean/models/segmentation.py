"""Semantic segmentation models for CamVid: ESPNet and CGNet, re-implemented from their papers.

- **ESPNet** (Mehta et al., ECCV 2018): efficient spatial pyramids of dilated convolutions; the full encoder-decoder
  ``ESPNet(classes, p, q)``. The architecture follows the paper and the layer names of the authors' MIT-licensed
  release (github sacmehta/ESPNet) so that its CamVid checkpoint loads strictly. That checkpoint's decoder conv takes
  ``19 + classes`` channels (the level-1 concat of its 16 features and the 3-channel image projection).
- **CGNet** (Wu et al., IEEE TIP 2021): context guided blocks (local, surrounding and global context); ``M3N21``.
  Architecture from the paper, layer names of the MIT-licensed release (github wutianyiRosun/CGNet).

Both return per-pixel logits ``(N, classes, H, W)`` at the input resolution (ESPNet by transposed convolutions,
CGNet by bilinear upsampling of its 1/8 output).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms as T

from polyglean.models.hub import WeightsUnavailableError, default_search_dirs, find_weights
from polyglean.models.preprocess import Preprocess
from polyglean.models.registry import ModelPreset, register_preset

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CGNet", "ESPNet", "cgnet_camvid", "cgnet_camvid_preprocess",
           "espnet_camvid", "espnet_camvid_preprocess"]


# ------------------------------------------------------------------------------------------------ shared blocks
class _Conv(nn.Module):
    """A bias-free convolution with 'same' padding (``dilation * (k - 1) / 2``)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2 * dilation, dilation=dilation,
                              groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _BNPReLU(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c, eps=1e-3)
        self.act = nn.PReLU(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(x))


class _ConvBNPReLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)
        self.act = nn.PReLU(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _InputProjection(nn.Module):
    """The image average-pooled ``times`` times by 3x3 windows of stride 2."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList([nn.AvgPool2d(3, stride=2, padding=1) for _ in range(times)])

    def forward(self, x: Tensor) -> Tensor:
        for pool in self.pool:
            x = pool(x)
        return x


# ----------------------------------------------------------------------------------------------------- ESPNet
class _ESP(nn.Module):
    """The ESP module: reduce (1x1, or 3x3 stride 2 when downsampling), then five parallel dilated 3x3 convs
    (rates 1, 2, 4, 8, 16) merged hierarchically (each adds the previous sum) and concatenated."""

    def __init__(self, c_in: int, c_out: int, *, down: bool = False, residual: bool = True) -> None:
        super().__init__()
        n = c_out // 5
        n1 = c_out - 4 * n
        self.down = down
        self.residual = residual and not down and c_in == c_out
        self.c1 = _Conv(c_in, n, 3, 2) if down else _Conv(c_in, n, 1)
        self.d1 = _Conv(n, n1, 3, 1, 1)
        self.d2 = _Conv(n, n, 3, 1, 2)
        self.d4 = _Conv(n, n, 3, 1, 4)
        self.d8 = _Conv(n, n, 3, 1, 8)
        self.d16 = _Conv(n, n, 3, 1, 16)
        if down:
            self.bn = nn.BatchNorm2d(c_out, eps=1e-3)
            self.act = nn.PReLU(c_out)
        else:
            self.bn = _BNPReLU(c_out)

    def forward(self, x: Tensor) -> Tensor:
        r = self.c1(x)
        a2 = self.d2(r)
        a4 = a2 + self.d4(r)
        a8 = a4 + self.d8(r)
        a16 = a8 + self.d16(r)
        out = torch.cat([self.d1(r), a2, a4, a8, a16], 1)
        if self.down:
            return self.act(self.bn(out))
        if self.residual:
            out = x + out
        return self.bn(out)


class _ESPNetEncoder(nn.Module):
    def __init__(self, classes: int, p: int, q: int) -> None:
        super().__init__()
        self.level1 = _ConvBNPReLU(3, 16, 3, 2)
        self.sample1 = _InputProjection(1)
        self.sample2 = _InputProjection(2)
        self.b1 = _BNPReLU(16 + 3)
        self.level2_0 = _ESP(16 + 3, 64, down=True)
        self.level2 = nn.ModuleList([_ESP(64, 64) for _ in range(p)])
        self.b2 = _BNPReLU(128 + 3)
        self.level3_0 = _ESP(128 + 3, 128, down=True)
        self.level3 = nn.ModuleList([_ESP(128, 128) for _ in range(q)])
        self.b3 = _BNPReLU(256)
        self.classifier = _Conv(256, classes, 1)


class ESPNet(nn.Module):
    """ESPNet (Mehta et al., ECCV 2018), the encoder-decoder variant.

    Args:
        classes: Output channels (CamVid: 12, the 11 classes and void).
        p: ESP modules at level 2.
        q: ESP modules at level 3.

    Shape:
        - input: ``(N, 3, H, W)`` with ``H, W`` divisible by 8
        - output: ``(N, classes, H, W)``
    """

    def __init__(self, classes: int = 12, p: int = 2, q: int = 8) -> None:
        super().__init__()
        self.encoder = _ESPNetEncoder(classes, p, q)
        self.level3_C = _Conv(128 + 3, classes, 1)
        self.br = nn.BatchNorm2d(classes, eps=1e-3)
        self.conv = _ConvBNPReLU(19 + classes, classes, 3, 1)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False))
        self.combine_l2_l3 = nn.Sequential(_BNPReLU(2 * classes), _ESP(2 * classes, classes, residual=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False), _BNPReLU(classes))
        self.classifier = nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder's outputs at 1/2, 1/4 and 1/8 of the input (the level-1, -2 and -3 concatenations)."""
        e = self.encoder
        out0 = e.b1(torch.cat([e.level1(x), e.sample1(x)], 1))
        out1_0 = e.level2_0(out0)
        out1 = out1_0
        for layer in e.level2:
            out1 = layer(out1)
        out1_cat = e.b2(torch.cat([out1, out1_0, e.sample2(x)], 1))
        out2_0 = e.level3_0(out1_cat)
        out2 = out2_0
        for layer in e.level3:
            out2 = layer(out2)
        return out0, out1_cat, e.b3(torch.cat([out2_0, out2], 1))

    def forward(self, x: Tensor) -> Tensor:
        e = self.encoder
        out0, out1_cat, out2_cat = self.encode(x)
        up3 = self.up_l3(self.br(e.classifier(out2_cat)))
        up2 = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(out1_cat), up3], 1)))
        return self.classifier(self.conv(torch.cat([up2, out0], 1)))


# ------------------------------------------------------------------------------------------------------ CGNet
class _GlobalContext(nn.Module):
    """``f_glo``: channel re-weighting by a 2-layer MLP of the global average (squeeze-and-excitation)."""

    def __init__(self, c: int, reduction: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // reduction), nn.ReLU(inplace=True), nn.Linear(c // reduction, c),
                                nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc(x.mean((2, 3)))
        return x * w[:, :, None, None]


class _ContextGuided(nn.Module):
    """The context guided block: ``f_loc`` (depthwise 3x3) and ``f_sur`` (depthwise dilated 3x3) joined, then
    ``f_glo``. The down-sampling variant starts with a 3x3 stride-2 conv and reduces the joint features by 1x1."""

    def __init__(self, c_in: int, c_out: int, dilation: int, reduction: int, *, down: bool = False) -> None:
        super().__init__()
        self.down = down
        n = c_out if down else c_out // 2
        self.conv1x1 = _ConvBNPReLU(c_in, n, 3, 2) if down else _ConvBNPReLU(c_in, n, 1, 1)
        self.F_loc = _Conv(n, n, 3, groups=n)
        self.F_sur = _Conv(n, n, 3, dilation=dilation, groups=n)
        if down:
            self.bn = nn.BatchNorm2d(2 * n, eps=1e-3)
            self.act = nn.PReLU(2 * n)
            self.reduce = _Conv(2 * n, c_out, 1)
        else:
            self.bn_prelu = _BNPReLU(c_out)
        self.F_glo = _GlobalContext(c_out, reduction)

    def forward(self, x: Tensor) -> Tensor:
        r = self.conv1x1(x)
        joint = torch.cat([self.F_loc(r), self.F_sur(r)], 1)
        if self.down:
            return self.F_glo(self.reduce(self.act(self.bn(joint))))
        return x + self.F_glo(self.bn_prelu(joint))


class CGNet(nn.Module):
    """CGNet (Wu et al., IEEE TIP 2021), ``Context_Guided_Network(classes, M, N)`` without dropout.

    Args:
        classes: Output channels (CamVid: 11; void is not predicted).
        M: Context guided blocks at stage 2.
        N: Context guided blocks at stage 3.

    Shape:
        - input: ``(N, 3, H, W)``
        - output: ``(N, classes, H, W)`` (bilinear upsampling of the 1/8 logits)
    """

    def __init__(self, classes: int = 11, M: int = 3, N: int = 21) -> None:  # noqa: N803 (the paper's names)
        super().__init__()
        self.level1_0 = _ConvBNPReLU(3, 32, 3, 2)
        self.level1_1 = _ConvBNPReLU(32, 32, 3, 1)
        self.level1_2 = _ConvBNPReLU(32, 32, 3, 1)
        self.sample1 = _InputProjection(1)
        self.sample2 = _InputProjection(2)
        self.b1 = _BNPReLU(32 + 3)
        self.level2_0 = _ContextGuided(32 + 3, 64, 2, 8, down=True)
        self.level2 = nn.ModuleList([_ContextGuided(64, 64, 2, 8) for _ in range(M - 1)])
        self.bn_prelu_2 = _BNPReLU(128 + 3)
        self.level3_0 = _ContextGuided(128 + 3, 128, 4, 16, down=True)
        self.level3 = nn.ModuleList([_ContextGuided(128, 128, 4, 16) for _ in range(N - 1)])
        self.bn_prelu_3 = _BNPReLU(256)
        self.classifier = nn.Sequential(_Conv(256, classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        out0 = self.level1_2(self.level1_1(self.level1_0(x)))
        out0_cat = self.b1(torch.cat([out0, self.sample1(x)], 1))
        out1_0 = self.level2_0(out0_cat)
        out1 = out1_0
        for layer in self.level2:
            out1 = layer(out1)
        out1_cat = self.bn_prelu_2(torch.cat([out1, out1_0, self.sample2(x)], 1))
        out2_0 = self.level3_0(out1_cat)
        out2 = out2_0
        for layer in self.level3:
            out2 = layer(out2)
        out2_cat = self.bn_prelu_3(torch.cat([out2_0, out2], 1))
        return F.interpolate(self.classifier(out2_cat), size=x.shape[-2:], mode="bilinear", align_corners=False)


def espnet_camvid() -> ESPNet:
    """``ESPNet(classes=12, p=2, q=8)``, the CamVid configuration (randomly initialised)."""
    return ESPNet(12, 2, 8)


def cgnet_camvid() -> CGNet:
    """``CGNet(classes=11, M=3, N=21)``, the CamVid configuration (randomly initialised)."""
    return CGNet(11, 3, 21)


# ------------------------------------------------------------------------------------------------ presets
CAMVID_CLASSES: tuple[str, ...] = ("sky", "building", "pole", "road", "pavement", "tree", "sign-symbol", "fence",
                                   "car", "pedestrian", "bicyclist")
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
CAMVID_SIZE: tuple[int, int, int] = (3, 360, 480)


def _whole_image(mean255: tuple[float, float, float], std255: tuple[float, float, float], *, bgr: bool,
                 description: str) -> Preprocess:
    """No resize: ``x = (v·255 − mean) / std`` per channel (in BGR order when ``bgr``), as ``mean/255``, ``std/255``
    in units of the [0, 1] image."""
    mean = tuple(m / 255 for m in mean255)
    std = tuple(s / 255 for s in std255)
    steps: list[Callable[[Any], Any]] = [T.ToTensor()]
    if bgr:
        steps.append(_ToBGR())
    steps.append(T.Normalize(mean=list(mean), std=list(std)))
    return Preprocess(transform=T.Compose(steps), input_size=CAMVID_SIZE, mean=mean, std=std,
                      description=description)


class _ToBGR:
    def __call__(self, x: Tensor) -> Tensor:
        return x.flip(0)

    def __repr__(self) -> str:
        return "ToBGR()"


def espnet_camvid_preprocess() -> Preprocess:
    """ESPNet's CamVid input: BGR, ``(img − mean) / std / 255`` with img in 0..255, mean (110.33, 108.41, 105.03),
    std (72.13, 72.69, 69.90) in BGR order, no resize (360x480)."""
    return _whole_image((110.33, 108.41, 105.03), (72.13 * 255, 72.69 * 255, 69.90 * 255), bgr=True,
                        description="no resize, BGR, (img - (110.33, 108.41, 105.03)) / (72.13, 72.69, 69.90) / 255")


def cgnet_camvid_preprocess() -> Preprocess:
    """CGNet's CamVid input: RGB in 0..255 minus (105.56, 103.30, 99.56), no scaling, no resize (the release
    computed that mean in BGR order and subtracts it from the RGB image; the weights learned that)."""
    return _whole_image((105.56, 103.30, 99.56), (1.0, 1.0, 1.0), bgr=False,
                        description="no resize, RGB 0..255 minus (105.56, 103.30, 99.56)")


def _find(folder: str, filename: str) -> Path:
    found = find_weights(filename, default_search_dirs(folder))
    if found is None:
        raise WeightsUnavailableError(
            f"weights {filename} not found (looked in {', '.join(str(d) for d in default_search_dirs(folder))}); "
            "they are not downloadable: pass weights=PATH (CLI: --weights PATH)")
    return found


def _register() -> None:
    common: dict[str, Any] = dict(input_size=CAMVID_SIZE, num_classes=len(CAMVID_CLASSES), task="segmentation",
                                  class_names=CAMVID_CLASSES, palette=CAMVID_PALETTE, ignore_index=11)
    register_preset(ModelPreset(
        name="camvid-espnet", builder=espnet_camvid,
        default_weights=partial(_find, "espnet-camvid", "espnet_p_2_q_8_camvid.pth"),
        preprocess=espnet_camvid_preprocess,
        description=("ESPNet p=2 q=8 (Mehta et al. 2018) on CamVid, 11 classes + a void channel; 67.5 mIoU on the "
                     "101 val images (standard confusion-matrix mIoU); weights: sacmehta/ESPNet (MIT)"),
        **common))
    register_preset(ModelPreset(
        name="camvid-cgnet", builder=cgnet_camvid,
        default_weights=partial(_find, "cgnet-camvid", "model_800.pth"),
        preprocess=cgnet_camvid_preprocess,
        description=("CGNet M3N21 (Wu et al. 2021) on CamVid, 11 classes; trained on train+val, so its val score "
                     "only checks the preprocessing; weights: wutianyiRosun/CGNet (MIT)"),
        **common))


_register()
