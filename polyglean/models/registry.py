"""The registry of model presets: a name bound to a builder, its default weights and its preprocessing.

Example:
    >>> list_models("cifar10-*")
    ['cifar10-resnet20', 'cifar10-resnet32', 'cifar10-resnet44', 'cifar10-resnet56']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from polyglean.models.checkpoint import STRIP_MODULE, KeyMap
from polyglean.models.preprocess import Preprocess
from polyglean.registry import Registry

__all__ = ["ModelPreset", "get_preset", "list_models", "register_preset", "unregister_preset"]


@dataclass(frozen=True)
class ModelPreset:
    """A named model with known weights and preprocessing.

    Args:
        name: the spec that selects it in :func:`polyglean.models.load_model`.
        builder: makes the randomly initialised model.
        default_weights: returns the local path of the default weights (finding or downloading them); raises
            :class:`polyglean.models.hub.WeightsUnavailableError` when it cannot.
        preprocess: makes the preprocessing for this model.
        input_size: ``(C, H, W)`` the model is trained at.
        num_classes: number of output logits.
        description: one line: architecture, data set, reference accuracy, source of the weights.
        key_map: renames checkpoint keys to the model's keys before strict loading.
        task: ``"classification"`` (logits ``(N, K)``) or ``"segmentation"`` (logits ``(N, K', H, W)`` at the input
            size, ``K' >= num_classes``: a model may add a void channel, which is never scored).
        class_names: names of the ``num_classes`` classes (segmentation presets).
        palette: an RGB colour per class, for drawing label maps.
        ignore_index: the label value of unlabelled (void) pixels in the preset's data set.
    """

    name: str
    builder: Callable[[], nn.Module]
    default_weights: Callable[[], Path]
    preprocess: Callable[[], Preprocess]
    input_size: tuple[int, int, int]
    num_classes: int
    description: str
    key_map: KeyMap = field(default=STRIP_MODULE)
    task: str = "classification"
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    ignore_index: int | None = None


_PRESETS: Registry[ModelPreset] = Registry("model preset")


def register_preset(preset: ModelPreset) -> ModelPreset:
    """Add ``preset`` to the registry.

    Args:
        preset: the preset; its name must be new and must not contain ``":"`` (reserved for ``torchvision:NAME``
            and ``timm:NAME``).

    Returns:
        ``preset``.

    Raises:
        ValueError: the name is taken or contains ``":"``.
    """
    if ":" in preset.name:
        raise ValueError(f"preset name {preset.name!r} must not contain ':' (reserved for 'torchvision:' and 'timm:')")
    _PRESETS.register(preset.name, preset)
    return preset


def unregister_preset(name: str) -> ModelPreset:
    """Remove and return the preset called ``name`` (for tests and plugins replacing a preset).

    Raises:
        KeyError: no such preset.
    """
    return _PRESETS.unregister(name)


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``.

    Raises:
        KeyError: no such preset; the message lists those that exist (also a ``ValueError``).
    """
    return _PRESETS.get(name)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered presets matching ``pattern``, sorted.

    Torchvision and timm models are not listed here; name them as ``torchvision:NAME`` (any name in
    ``torchvision.models.list_models(module=torchvision.models)``) or ``timm:NAME`` (any name in
    ``timm.list_models()``).

    Args:
        pattern: shell-style wildcards (``fnmatch``), e.g. ``"cifar10-*"``.
    """
    return _PRESETS.names(pattern)
