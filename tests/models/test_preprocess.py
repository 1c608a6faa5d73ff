"""Preprocess: sizes, normalisation, modes, repr."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from polyglean.models import Preprocess
from polyglean.models.presets import cifar_preprocess, lite0_preprocess


def test_resize_crop_shape_and_repr() -> None:
    pre = Preprocess.resize_crop(resize=256, crop=224)
    x = pre(Image.new("RGB", (500, 300)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert pre.input_size == (3, 224, 224)
    assert repr(pre).startswith("Preprocess(resize 256 bilinear, centre-crop 224, mean=(0.485, 0.456, 0.406)")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    x = Preprocess.resize_crop(resize=None, crop=8)(Image.new(mode, (8, 8)))
    assert x.shape == (3, 8, 8)


def test_cifar_is_identity_resize_then_normalise() -> None:
    img = Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12)
    raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(cifar_preprocess()(img), (raw - mean) / std)


def test_lite0_normalisation() -> None:
    img = Image.new("RGB", (224, 224), (0, 127, 255))
    x = lite0_preprocess()(img)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 100, 100], torch.tensor([-127 / 128, 0.0, 1.0]), atol=1e-6, rtol=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        Preprocess.resize_crop(resize=8, crop=8, interpolation="cubic")
    with pytest.raises(ValueError, match="resize or crop"):
        Preprocess.resize_crop(resize=None, crop=None)
    with pytest.raises(TypeError, match="PIL image"):
        Preprocess.resize_crop(resize=8, crop=8)(torch.zeros(3, 8, 8))  # type: ignore[arg-type]
