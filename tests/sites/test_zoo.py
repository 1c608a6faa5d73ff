"""The timm zoo: one model per family (timm module), random weights, the four checks of the core tests and the
reference executor (``tests/zoo.py``). A dozen representative families run in the default test command; the whole
sweep is ``slow`` (``scripts/zoo_sweep.py`` runs the same checks and writes the README's table).
"""

from __future__ import annotations

import pytest

from tests.zoo import candidates, check_model, families

# Representative and fast: plain CNNs, inverted residuals, NAS, CSP, multi-branch, ConvNeXt, hybrid and attention
# models with spatial reduction.
FAST = {
    "resnet": "resnet18",
    "resnetv2": "resnetv2_18",
    "mobilenetv3": "mobilenetv3_small_050",
    "efficientnet": "tinynet_a",
    "rexnet": "rexnet_100",
    "cspnet": "cs3darknet_s",
    "ghostnet": "ghostnet_050",
    "convnext": "convnext_atto",
    "mobilevit": "mobilevit_xxs",
    "efficientvit_mit": "efficientvit_b0",
    "pvt_v2": "pvt_v2_b0",
    "hrnet": "hrnet_w18_small",
}

# Too large for a CPU test (45-50 s each on an idle core at 96 or 112 px: 300M and 400M parameters); the sweep
# checks them.
LARGE = {"deepseek_vit", "mobilenetv5"}


@pytest.mark.parametrize("family", list(FAST))
def test_representative_family(family: str) -> None:
    result = check_model(family, FAST[family])
    assert result.status == "works", f"{family} ({result.model}): {result.status}: {result.reason}"
    assert result.sites >= 1 and result.main_sites >= 1


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("family", families())
def test_every_family(family: str) -> None:
    """Each family works, is refused with a clear polyglean error, or has no strided op (never another exception,
    nor a failed check)."""
    if family in LARGE:
        pytest.skip(f"the smallest {family} model is too large for a CPU test")
    result = None
    for name in candidates(family):
        result = check_model(family, name)
        if result.status != "unbuildable":
            break
    if result is None or result.status == "unbuildable":
        pytest.skip(f"no model of {family} builds offline with random weights")
    assert result.status in ("works", "refused", "no sites"), f"{family} ({result.model}): {result.reason}"
