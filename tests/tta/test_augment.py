"""Augmentations and policies: deterministic, shape-preserving, against hand slicing; names and the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polyglean.tta import (
    POLICIES,
    Brightness,
    Compose,
    HFlip,
    Identity,
    PadCrop,
    Pixels,
    ResizedCrop,
    Rotate,
    Scale,
    build_policy,
    compose,
)

CIFAR = Pixels((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SIZES = [(3, 32, 32), (3, 72, 72)]  # pad-and-shift crops, resized crops


def _batch(size: tuple[int, int, int], n: int = 2) -> torch.Tensor:
    unit = torch.rand(n, *size, generator=torch.Generator().manual_seed(1))
    return CIFAR.from_unit(unit)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("policy", POLICIES.names())
def test_every_policy_deterministic_and_shape_preserving(policy: str, size: tuple[int, int, int]) -> None:
    x = _batch(size)
    augs = build_policy(policy, size, CIFAR)
    assert augs[0].name == "identity"
    assert len({a.name for a in augs}) == len(augs)
    for aug in augs:
        y = aug(x)
        assert y.shape == x.shape, aug.name
        assert y.equal(aug(x.clone())), aug.name
        assert torch.isfinite(y).all(), aug.name
    rebuilt = build_policy(policy, size, CIFAR)
    assert [a.name for a in rebuilt] == [a.name for a in augs]
    assert all(a(x).equal(b(x)) for a, b in zip(augs, rebuilt))


def test_policy_sizes() -> None:
    counts = {p: len(build_policy(p, (3, 32, 32), CIFAR)) for p in POLICIES.names()}
    assert counts == {"identity": 1, "flip": 2, "five-crop": 5, "ten-crop": 10, "random-crops": 8, "scales": 4,
                      "flip-scales": 8, "expanded": 21}


def test_views_differ_from_the_input() -> None:
    x = _batch((3, 32, 32))
    for aug in build_policy("expanded", (3, 32, 32), CIFAR)[1:]:
        assert not aug(x).equal(x), aug.name


def test_flip_flip_is_identity() -> None:
    x = _batch((3, 32, 32))
    assert compose(HFlip(), HFlip())(x).equal(x)
    assert HFlip()(x).equal(x[..., torch.arange(31, -1, -1)])


def test_non_contiguous_input() -> None:
    x = _batch((3, 32, 32)).transpose(-1, -2)
    assert not x.is_contiguous()
    for aug in build_policy("expanded", (3, 32, 32), CIFAR):
        assert torch.allclose(aug(x), aug(x.contiguous()), atol=1e-5), aug.name


@pytest.mark.parametrize("top, left", [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4), (3, 6)])
def test_padcrop_against_hand_slicing(top: int, left: int) -> None:
    x = _batch((3, 32, 32))
    black = CIFAR.fill(0.0, x).flatten()  # zero pixels in the padded border, per channel
    padded = torch.stack([F.pad(x[:, c], (4, 4, 4, 4), value=float(black[c])) for c in range(3)], 1)
    want = padded[..., top:top + 32, left:left + 32]
    assert PadCrop(top, left, pad=4, pixels=CIFAR)(x).equal(want)
    # the content moves by (4 - top, 4 - left)
    dy, dx = 4 - top, 4 - left
    got = PadCrop(top, left, pad=4, pixels=CIFAR)(x)
    src = x[..., max(0, -dy):32 - max(0, dy), max(0, -dx):32 - max(0, dx)]
    assert got[..., max(0, dy):32 - max(0, -dy), max(0, dx):32 - max(0, -dx)].equal(src)


def test_padcrop_centre_is_identity_and_border_is_black() -> None:
    x = _batch((3, 32, 32))
    assert PadCrop(4, 4, pad=4, pixels=CIFAR)(x).equal(x)
    corner = PadCrop(0, 0, pad=4, pixels=CIFAR)(x)
    assert torch.allclose(CIFAR.to_unit(corner)[..., :4, :], torch.zeros(()), atol=1e-6)


def test_resized_crop_against_hand_slicing() -> None:
    x = _batch((3, 64, 64))
    assert ResizedCrop(0.875, 1, 1).window(224, 224) == (28, 28, 196, 196)
    assert ResizedCrop(0.875, 0.5, 0.5).window(224, 224) == (14, 14, 196, 196)
    want = F.interpolate(x[..., 32:64, 0:32], size=(64, 64), mode="bilinear", align_corners=False)
    assert ResizedCrop(0.5, 1, 0)(x).equal(want)
    assert ResizedCrop(1.0)(x).equal(x)


def test_scale() -> None:
    x = _batch((3, 40, 40))
    assert Scale(1.0, pixels=CIFAR)(x).equal(x)
    assert Scale(1.25, pixels=CIFAR)(x).equal(ResizedCrop(0.8)(x))
    out = Scale(0.5, pixels=CIFAR)(x)
    assert torch.allclose(CIFAR.to_unit(out)[..., :10, :], torch.zeros(()), atol=1e-6)  # border filled black
    small = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False, antialias=True)
    assert out[..., 10:30, 10:30].equal(small)


def test_pixel_ops_work_on_the_unit_image() -> None:
    x = _batch((3, 32, 32))
    assert torch.allclose(Brightness(pixels=CIFAR, factor=1.0)(x), x, atol=1e-5)
    got = CIFAR.to_unit(Brightness(pixels=CIFAR, factor=1.5)(x))
    assert torch.allclose(got, (CIFAR.to_unit(x) * 1.5).clamp(0, 1), atol=1e-5)
    assert torch.allclose(Rotate(pixels=CIFAR, degrees=0.0)(x), x, atol=1e-5)


def test_compose_order_and_names() -> None:
    x = _batch((3, 32, 32))
    aug = compose(HFlip(), PadCrop(0, 8, pad=4, pixels=CIFAR))
    assert isinstance(aug, Compose) and aug.name == "hflip+padcrop(0,8;4)"
    assert aug(x).equal(PadCrop(0, 8, pad=4, pixels=CIFAR)(x.flip(-1)))
    assert not aug(x).equal(HFlip()(PadCrop(0, 8, pad=4, pixels=CIFAR)(x)))  # order matters
    assert compose(Identity(), HFlip()).name == "hflip"
    assert compose(aug, Identity(), Scale(1.2)).name == "hflip+padcrop(0,8;4)+scale(1.2)"
    assert compose().name == "identity"


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"batch \(N, C, H, W\)"):
        HFlip()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="out of range for pad 4"):
        PadCrop(9, 0, pad=4)
    with pytest.raises(ValueError, match="size must be in"):
        ResizedCrop(1.5)
    with pytest.raises(ValueError, match="3-channel"):
        Brightness(pixels=CIFAR, factor=1.2)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(TypeError):
        Compose((HFlip(), "flip"))  # type: ignore[arg-type]


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown TTA policy 'tencrop'.*expanded.*ten-crop"):
        build_policy("tencrop", (3, 32, 32))


def test_random_crops_are_seeded() -> None:
    a = [v.name for v in build_policy("random-crops", (3, 32, 32), seed=0)]
    assert a == [v.name for v in build_policy("random-crops", (3, 32, 32), seed=0)]
    assert a != [v.name for v in build_policy("random-crops", (3, 32, 32), seed=1)]
    big = [v.name for v in build_policy("random-crops", (3, 224, 224), seed=0)]
    assert all(n.startswith("crop(0.875@") for n in big[1:])


def test_crops_follow_the_input_size() -> None:
    assert [v.name for v in build_policy("five-crop", (3, 32, 32))][1] == "padcrop(0,0;4)"
    assert [v.name for v in build_policy("five-crop", (3, 224, 224))][1] == "crop(0.875@0,0)"
