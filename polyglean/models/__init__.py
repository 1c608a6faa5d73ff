"""Models: presets (CIFAR-10 ResNets, ImageNet EfficientNet-Lite0), torchvision and timm models, weights, preprocessing.

Name a model as a preset (``list_models()``), ``torchvision:NAME`` or ``timm:NAME``:

>>> model, preprocess = load_model("cifar10-resnet20")  # doctest: +SKIP
>>> logits = model(preprocess(image).unsqueeze(0))  # doctest: +SKIP
"""

from __future__ import annotations

from polyglean.models import presets as _presets  # noqa: F401  (registers the built-in presets)
from polyglean.models import segmentation as _segmentation  # noqa: F401  (registers camvid-espnet, camvid-cgnet)
from polyglean.models.checkpoint import (
    STRIP_MODULE,
    CheckpointError,
    KeyMap,
    load_checkpoint,
    load_state_dict_file,
    load_state_dict_strict,
)
from polyglean.models.cifar_resnet import (
    CifarResNet,
    ShortcutA,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    shortcut_a,
)
from polyglean.models.efficientnet_lite import efficientnet_key_map, efficientnet_lite0
from polyglean.models.hub import WeightsUnavailableError
from polyglean.models.loader import load_model
from polyglean.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from polyglean.models.registry import ModelPreset, get_preset, list_models, register_preset, unregister_preset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STRIP_MODULE",
    "CheckpointError",
    "CifarResNet",
    "KeyMap",
    "ModelPreset",
    "Preprocess",
    "ShortcutA",
    "WeightsUnavailableError",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "efficientnet_key_map",
    "efficientnet_lite0",
    "get_preset",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_state_dict_file",
    "load_state_dict_strict",
    "register_preset",
    "shortcut_a",
    "unregister_preset",
]
