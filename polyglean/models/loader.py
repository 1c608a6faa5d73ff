"""``load_model``: one entry point for presets, torchvision and timm models, with weights and preprocessing.

A spec is one of:

- a preset name (:func:`polyglean.models.list_models`), e.g. ``cifar10-resnet20``: the preset's default weights
  are loaded (found on disk or downloaded) unless ``weights=PATH`` is given;
- ``torchvision:NAME``, any classification model of ``torchvision.models`` (e.g. ``torchvision:resnet18``);
- ``timm:NAME``, any ``timm`` model (e.g. ``timm:resnet50.a1_in1k``).

Torchvision and timm models have no weights of their own here: give ``weights=PATH``, ``pretrained=True`` (their own
hub download) or, to run random weights on purpose, ``random_weights=SEED`` (seeded, and logged as a warning).
Without one of them :func:`load_model` refuses, so random weights are never evaluated by accident.
"""

from __future__ import annotations

import difflib
import logging
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.models.checkpoint import STRIP_MODULE, load_checkpoint
from polyglean.models.hub import WeightsUnavailableError
from polyglean.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from polyglean.models.registry import get_preset, list_models

__all__ = ["build_architecture", "has_default_weights", "load_model"]

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def _check_name(source: str, name: str) -> None:
    """Refuses a torchvision or timm model name that the library does not know, suggesting close ones."""
    if source == "torchvision":
        import torchvision.models as tvm

        known = tvm.list_models(module=tvm)
        if name not in known:
            raise ModelError(
                f"unknown torchvision classification model {name!r}{_suggest(name, known)}; "
                "see torchvision.models.list_models(module=torchvision.models)"
            )
    else:
        import timm

        if not timm.is_model(name):
            raise ModelError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}; "
                             "see timm.list_models()")


def _torchvision_model(name: str, spec: str, *, pretrained: bool) -> tuple[nn.Module, Preprocess]:
    import torchvision.models as tvm

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

    try:
        model = timm.create_model(name, pretrained=pretrained)
    except _NETWORK_ERRORS as exc:
        raise _offline_error(spec, exc) from exc
    return model, Preprocess.from_timm(model)


def has_default_weights(spec: str) -> bool:
    """Whether ``spec`` names a preset, which brings its own weights (torchvision and timm models do not)."""
    return isinstance(spec, str) and ":" not in spec and spec in list_models()


def _seeded(build: Callable[[], T], seed: int | None) -> T:
    """``build()`` with torch's random generator seeded, leaving the caller's generator state untouched; with
    ``seed=None`` plainly ``build()`` (its initialisation is overwritten by the weights loaded next)."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _check_sources(spec: str, weights: str | Path | None, pretrained: bool, random_weights: int | None) -> None:
    given = [name for name, on in (("weights", weights is not None), ("pretrained", pretrained),
                                   ("random_weights", random_weights is not None)) if on]
    if random_weights is not None and (isinstance(random_weights, bool) or not isinstance(random_weights, int)):
        raise ArgumentError(f"random_weights must be an integer seed, got {random_weights!r}")
    if len(given) > 1 and not (given == ["weights", "pretrained"] and has_default_weights(spec)):
        raise ArgumentError(
            f"{spec}: give one source of weights, not {' and '.join(given)} (CLI: --weights PATH, --pretrained or "
            "--random-weights SEED)"
        )
    if not given and not has_default_weights(spec):
        raise ArgumentError(
            f"{spec} has no weights here: pass weights=PATH (CLI: --weights PATH), pretrained=True (--pretrained, "
            "downloads the library's weights) or, to run random weights on purpose, random_weights=SEED "
            "(--random-weights SEED)"
        )


def build_architecture(spec: str) -> tuple[nn.Module, Preprocess]:
    """The model named by ``spec`` with its initialisation only (seeded with 0), for a caller that loads a full
    checkpoint into it next (e.g. a fine-tuned one). Never evaluate it as it is: use :func:`load_model`.

    Raises:
        ModelError: unknown spec.
    """
    if not isinstance(spec, str) or not spec:
        raise ModelError(f"model spec must be a non-empty string, got {spec!r}; {_how_to_name()}")
    source, sep, name = spec.partition(":")
    if sep:
        if source not in ("torchvision", "timm") or not name:
            raise ModelError(f"unknown model spec {spec!r}; {_how_to_name()}")
        _check_name(source, name)
        build = _torchvision_model if source == "torchvision" else _timm_model
        model, preprocess = _seeded(lambda: build(name, spec, pretrained=False), 0)
    elif spec in list_models():
        preset = get_preset(spec)
        model, preprocess = _seeded(preset.builder, 0), preset.preprocess()
    else:
        raise ModelError(f"unknown model spec {spec!r}; {_how_to_name()}{_suggest(spec, list_models())}")
    return model.eval(), preprocess


def load_model(
    spec: str, weights: str | Path | None = None, *, pretrained: bool = False, random_weights: int | None = None
) -> tuple[nn.Module, Preprocess]:
    """Build the model named by ``spec``, load its weights, and return it in eval mode with its preprocessing.

    Args:
        spec: a preset name, ``torchvision:NAME`` or ``timm:NAME`` (see the module docstring).
        weights: a checkpoint file (a state dict, or one under ``"state_dict"``/``"model"``; a ``module.`` prefix
            is stripped; presets apply their own key map). Loaded strictly.
        pretrained: for torchvision/timm, download the library's default weights. Presets always load their own
            weights, so it changes nothing for them.
        random_weights: a seed: initialise the model randomly from it (and load no weights) on purpose. Logged as
            a warning, since such a model's predictions mean nothing.

    Torchvision and timm models need exactly one of ``weights``, ``pretrained`` and ``random_weights``; a preset
    takes at most one of ``weights`` and ``random_weights``.

    Returns:
        ``(model, preprocess)``: the model in eval mode on the CPU, and a callable from a PIL image to its input.

    Raises:
        ModelError: unknown spec; the message says how to name a model and suggests close names.
        ArgumentError: no weights for a torchvision/timm model, or more than one source of weights.
        CheckpointError: ``weights`` does not exist, is not a checkpoint or does not match the model; a preset's
            weights file does not match the hash in its name.
        WeightsUnavailableError: default or pretrained weights cannot be found or downloaded (offline).

    Example:
        >>> model, pre = load_model("torchvision:resnet18", random_weights=0)
        >>> pre.input_size
        (3, 224, 224)
    """
    if not isinstance(spec, str) or not spec:
        raise ModelError(f"model spec must be a non-empty string, got {spec!r}; {_how_to_name()}")
    source, sep, name = spec.partition(":")
    if sep:
        builders = {"torchvision": _torchvision_model, "timm": _timm_model}
        if source not in builders or not name:
            raise ModelError(f"unknown model spec {spec!r}; {_how_to_name()}")
        _check_name(source, name)
        _check_sources(spec, weights, pretrained, random_weights)
        model, preprocess = _seeded(lambda: builders[source](name, spec, pretrained=pretrained), random_weights)
        if weights is not None:
            load_checkpoint(model, weights, key_map=STRIP_MODULE)
    elif spec in list_models():
        _check_sources(spec, weights, pretrained, random_weights)
        preset = get_preset(spec)
        model = _seeded(preset.builder, random_weights)
        if random_weights is None:
            load_checkpoint(model, preset.default_weights() if weights is None else weights, key_map=preset.key_map)
        preprocess = preset.preprocess()
    else:
        raise ModelError(f"unknown model spec {spec!r}; {_how_to_name()}{_suggest(spec, list_models())}")
    if random_weights is not None:
        log.warning("%s has random weights (seed %d), as asked: its predictions mean nothing", spec, random_weights)
    return model.eval(), preprocess
