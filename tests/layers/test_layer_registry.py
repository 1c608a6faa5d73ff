"""The layer registry: names, look-up errors, duplicates, factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyglean.layers as layers
from polyglean.layers import LAYERS, create_layer, get_layer, list_layers, register_layer


def test_known_names():
    assert set(LAYERS) == {"softpool", "adapool", "blurpool", "pasa", "aps", "cad"}
    assert get_layer("softpool") is layers.SoftPool2d
    assert get_layer("adapool") is layers.AdaPool2d
    assert get_layer("blurpool") is layers.BlurPool2d
    assert get_layer("pasa") is layers.PASA2d
    assert get_layer("aps") is layers.APS2d
    assert list_layers("*pool") == ["adapool", "blurpool", "softpool"]


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown layer 'blur'; choose one of: adapool, aps, blurpool"):
        get_layer("blur")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="'softpool' is already registered to SoftPool2d"):
        register_layer("softpool")(nn.Identity)
    assert LAYERS["softpool"] is layers.SoftPool2d


def test_register_and_create():
    name = "_test_identity_pool"
    try:
        register_layer(name)(nn.Identity)
        assert get_layer(name) is nn.Identity
        with pytest.raises(TypeError, match="only nn.Module subclasses"):
            register_layer("_test_not_a_module")(int)
    finally:
        if name in LAYERS:
            LAYERS.unregister(name)
    assert name not in LAYERS


def test_create_layer_accepts_name_or_class():
    pool = create_layer("blurpool", filter_size=5)
    assert isinstance(pool, layers.BlurPool2d) and pool.filter_size == 5
    assert isinstance(create_layer(layers.APS2d, 2), layers.APS2d)
    x = torch.randn(1, 4, 8, 8)
    for name, kwargs in [("softpool", {"kernel_size": 2}), ("adapool", {"kernel_size": 2}), ("blurpool", {}),
                         ("pasa", {"in_channels": 4}), ("aps", {})]:
        assert create_layer(name, **kwargs)(x).shape == (1, 4, 4, 4)


def test_public_api_exported():
    for name in layers.__all__:
        assert hasattr(layers, name), name


def test_swap_and_site_rules_are_registries() -> None:
    from polyglean.registry import Registry, UnknownNameError

    assert isinstance(layers.SWAP_RULES, Registry) and isinstance(layers.SITE_RULES, Registry)
    assert list(layers.SWAP_RULES) == ["adapool", "aps", "blurpool", "pasa", "softpool"]
    assert list(layers.SITE_RULES) == ["aps"]
    with pytest.raises(ValueError, match="a swap rule for layer 'blurpool' is already registered"):
        layers.register_swap_rule("blurpool")(lambda ctx: None)
    with pytest.raises(ValueError, match="a site rule for layer 'aps' is already registered"):
        layers.register_site_rule("aps")(lambda ctx: {})
    with pytest.raises(UnknownNameError, match="unknown swap rule 'blur'; choose one of: adapool, aps, blurpool"):
        layers.SWAP_RULES.get("blur")


def test_register_layer_with_rules_is_atomic() -> None:
    """A duplicate name is refused before anything is registered."""
    with pytest.raises(ValueError, match="'pasa' is already registered"):
        register_layer("pasa", swap_rule=lambda ctx: None)(nn.Identity)
    assert layers.SWAP_RULES["pasa"] is not None and LAYERS["pasa"] is layers.PASA2d
