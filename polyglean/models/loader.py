"""``load_model``: one entry point for presets, torchvision and timm models, with weights and preprocessing.

A spec is one of:

- a preset name (:func:`polyglean.models.list_models`), e.g. ``cifar10-resnet20``: the preset's default weights
  are loaded (found on disk or downloaded) unless ``weights=PATH`` is given;
- ``torchvision:NAME``, any classification model of ``torchvision.models`` (e.g. ``torchvision:resnet18``);
- ``timm:NAME``, any ``timm`` model (e.g. ``timm:resnet50.a1_in1k``).

Torchvision and timm models are randomly initialised unless ``weights=PATH`` or ``pretrained=True`` (their own hub
download) is given.
"""

from __future__ import annotations

import difflib
import urllib.error
from pathlib import Path

from torch import nn

from polyglean.models.checkpoint import STRIP_MODULE, load_checkpoint
from polyglean.models.hub import WeightsUnavailableError
from polyglean.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from polyglean.models.registry import get_preset, list_models

__all__ = ["load_model"]

_NETWORK_ERRORS = (urllib.error.URLError, OSError, ConnectionError, TimeoutError)


def _how_to_name() -> str:
    return (
        "name a model as 'torchvision:NAME' (e.g. torchvision:resnet18), 'timm:NAME' (e.g. timm:resnet50) or one "
        f"of the presets: {', '.join(list_models())}"
    )


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _offline_error(spec: str, exc: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not download pretrained weights for {spec!r} ({type(exc).__name__}: {exc}); are you offline? "
        "Pass a local checkpoint with weights=PATH (CLI: --weights PATH)"
    )


def _torchvision_model(name: str, spec: str, *, pretrained: bool) -> tuple[nn.Module, Preprocess]:
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        raise ValueError(
            f"unknown torchvision classification model {name!r}{_suggest(name, known)}; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    default = tvm.get_model_weights(name).DEFAULT
    try:
        model = tvm.get_model(name, weights=default if pretrained else None)
    except _NETWORK_ERRORS as exc:
        raise _offline_error(spec, exc) from exc
    # Sizes from the weights' own transform (224/256 for most, 299/342 for Inception v3 ...).
    t = default.transforms()
    preprocess = Preprocess.resize_crop(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean) if t.mean else IMAGENET_MEAN,
        std=tuple(t.std) if t.std else IMAGENET_STD,
        interpolation=t.interpolation.value,
    )
    return model, preprocess


def _timm_model(name: str, spec: str, *, pretrained: bool) -> tuple[nn.Module, Preprocess]:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}; see timm.list_models()")
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except _NETWORK_ERRORS as exc:
        raise _offline_error(spec, exc) from exc
    return model, Preprocess.from_timm(model)


def load_model(
    spec: str, weights: str | Path | None = None, *, pretrained: bool = False
) -> tuple[nn.Module, Preprocess]:
    """Build the model named by ``spec``, load its weights, and return it in eval mode with its preprocessing.

    Args:
        spec: a preset name, ``torchvision:NAME`` or ``timm:NAME`` (see the module docstring).
        weights: a checkpoint file (a state dict, or one under ``"state_dict"``/``"model"``; a ``module.`` prefix
            is stripped; presets apply their own key map). Loaded strictly.
        pretrained: for torchvision/timm, download the library's default weights (ignored with ``weights``);
            presets always load weights, so it has no effect on them.

    Returns:
        ``(model, preprocess)``: the model in eval mode on the CPU, and a callable from a PIL image to its input.

    Raises:
        ValueError: unknown spec; the message says how to name a model and suggests close names.
        FileNotFoundError: ``weights`` does not exist.
        CheckpointError: ``weights`` is not a checkpoint or does not match the model.
        WeightsUnavailableError: default or pretrained weights cannot be found or downloaded (offline).

    Example:
        >>> model, pre = load_model("torchvision:resnet18")
        >>> pre.input_size
        (3, 224, 224)
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; {_how_to_name()}")
    source, sep, name = spec.partition(":")
    if sep:
        builders = {"torchvision": _torchvision_model, "timm": _timm_model}
        if source not in builders or not name:
            raise ValueError(f"unknown model spec {spec!r}; {_how_to_name()}")
        model, preprocess = builders[source](name, spec, pretrained=pretrained and weights is None)
        if weights is not None:
            load_checkpoint(model, weights, key_map=STRIP_MODULE)
    elif spec in list_models():
        preset = get_preset(spec)
        model = preset.builder()
        load_checkpoint(model, preset.default_weights() if weights is None else weights, key_map=preset.key_map)
        preprocess = preset.preprocess()
    else:
        raise ValueError(f"unknown model spec {spec!r}; {_how_to_name()}{_suggest(spec, list_models())}")
    return model.eval(), preprocess
