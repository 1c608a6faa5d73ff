"""The zoo check: one timm model through the four checks of the core tests plus the reference executor.

Used by ``tests/sites/test_zoo.py`` and by ``scripts/zoo_sweep.py`` (which writes the README's table).
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from polyglean import PhaseNet, PhaseSearch
from polyglean.errors import PolygleanError
from tests.reference import reference_forward

# Words that mark the small variants of a family, tried first (then the shortest names).
_SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mini", "lite0", "b0", "_s", "18", "0_5",
          "050", "075", "100", "s0", "t0", "l0", "w18")


@dataclass
class ZooResult:
    """What the check found for one model."""

    family: str
    model: str
    # "works", "refused" (a clear polyglean error), "no sites" (no strided op: nothing to glean), "error" (anything
    # else), "unbuildable"; the sweep adds "timeout"
    status: str
    reason: str = ""
    input_size: list[int] = field(default_factory=list)
    sites: int = 0
    main_sites: int = 0
    factors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def families() -> list[str]:
    """timm's model modules (one family each) that register at least one model."""
    import timm

    return [m for m in timm.list_modules() if timm.list_models(module=m)]


def candidates(family: str, limit: int = 3) -> list[str]:
    """Models of ``family``, small variants first."""
    import timm

    names = timm.list_models(module=family)

    def key(name: str) -> tuple[int, int, str]:
        small = next((i for i, w in enumerate(_SMALL) if w in name), len(_SMALL))
        return (small, len(name), name)

    return sorted(names, key=key)[:limit]


def lively(model: nn.Module) -> nn.Module:
    """Random weights under which a random network's output depends visibly on its input.

    Convolutions and linear layers: variance-preserving (Kaiming normal, fan in, gain 1). Batch norms: the identity
    affine map (weight 1, bias 0) and random statistics (mean ``N(0, 0.1^2)``, variance ``U(0.5, 1)``). The
    affine reset matters: timm initialises some batch norms for training, not for a signal to pass (RepVGG's draw
    weights ``N(0.1, 0.1^2)`` and biases ``N(0, 0.1^2)``, which shrink the signal about fivefold per block under
    constant biases until the logits no longer depend on the input; TResNet zeroes the last norm of each block,
    which silences its residual branch, so that a phase inside the branch alone would change nothing).
    """
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.dim() >= 2:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear", generator=g)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.5)
    return model.eval()


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return re.sub(r"\s+", " ", text)[:300]


def check(net: PhaseNet, model: nn.Module, x: torch.Tensor) -> None:
    """The four checks; raises AssertionError naming the one that fails.

    The phase is compared with the reference executor at a tolerance of 1e-3 of the output in float32. Past it, in
    float64, where the two must agree to 1e-9 of the output, or, for models that amplify rounding, to within ten
    times the model's rounding floor at the site (the difference that a one-epsilon random perturbation of the
    site's output makes at the output, run through the reference executor) and still within 1e-3 of the output.
    """
    sites = net.sites
    assert sites, "no subsampling sites found"
    with torch.no_grad():
        default = model(x)
        out = net(x)
    assert isinstance(out, torch.Tensor), f"the model returns {type(out).__name__}"
    assert torch.equal(out, default), "net(x) differs from model(x)"
    main = [s for s in sites if s.main_path] or sites
    site = main[len(main) // 2]
    phase = (min(1, site.factor[0] - 1), min(1, site.factor[1] - 1))
    with torch.no_grad():
        moved = net(x, phases={site.name: phase})
    scale = default.abs().max().item() or 1.0
    assert (moved - default).abs().max().item() > 1e-5 * scale, f"phase {phase} at '{site.name}' changes nothing"
    ref = reference_forward(net, x, {site.index: phase})
    err = (moved - ref).abs().max().item()
    if err > 1e-3 * scale:
        # Random deep networks can amplify float32 rounding (the stride-1 reference sums in another order) far
        # beyond any tolerance; float64 tells rounding from a wrong phase.
        model64 = copy.deepcopy(model).double()
        net64 = PhaseNet(model64, net.input_size)
        with torch.no_grad():
            moved64 = net64(x.double(), phases={site.name: phase})
        ref64 = reference_forward(net64, x.double(), {site.index: phase})
        err64 = (moved64 - ref64).abs().max().item()
        scale64 = ref64.abs().max().item() or 1.0
        if err64 <= 1e-9 * scale64:
            return
        # StarNet's element-wise products blow random activations up block by block, and with them the rounding
        # differences of the stride-1 reference: what does a rounding-level difference at the site become?
        eps = torch.finfo(torch.float64).eps
        floor64 = (reference_forward(net64, x.double(), {site.index: phase}, noise=eps) - ref64).abs().max().item()
        assert err64 <= 10 * floor64 and err64 <= 1e-3 * scale64, (
            f"phase at '{site.name}' differs from the reference executor by {err:.3g} (float64: {err64:.3g} of "
            f"{scale64:.3g}; rounding floor at the site {floor64:.3g})")


def check_model(family: str, name: str, small: int | None = 96) -> ZooResult:
    """Builds ``name`` with random weights and checks it, at a ``small`` input if the model accepts one, else at
    the smallest multiple of 112 from ``small`` on (a multiple of ViTs' patch sizes 14 and 16), else at its default
    size; then the default search space must exist (``PhaseSearch`` refuses models with no site on the main
    path)."""
    import timm

    start = time.perf_counter()
    result = ZooResult(family, name, "unbuildable")
    try:
        model = lively(timm.create_model(name, pretrained=False))
    except Exception as err:  # noqa: BLE001 - a model timm cannot build offline is reported, not checked
        result.reason = _first_line(err)
        return result
    default_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    sizes = [default_size]
    if small is not None:
        patches = math.lcm(14, 16) * -(-small // math.lcm(14, 16))
        sizes = [(default_size[0], s, s) for s in sorted({small, patches}) if s < default_size[1]] + sizes
    torch.manual_seed(0)
    for k, size in enumerate(sizes):
        result.input_size = list(size)
        try:
            x = torch.randn(1, *size)
            with torch.no_grad():
                model(x)  # does the model take this size at all?
        except Exception as err:  # noqa: BLE001 - the model's own refusal of a size: try the default
            if k + 1 < len(sizes):
                continue
            result.status, result.reason = "error", "model(x): " + _first_line(err)
            break
        try:
            net = PhaseNet(model, size)
            result.sites = len(net.sites)
            result.main_sites = len(net.main_sites)
            result.factors = [f"{s.factor[0]}x{s.factor[1]}" + ("" if s.main_path else "*") for s in net.sites]
            if not net.sites:
                result.status = "no sites"
                result.reason = ("no strided convolution, pooling or slicing (patches cut by a reshape are not one): "
                                 "nothing to glean")
                break
            check(net, model, torch.randn(2, *size))
            PhaseSearch(net, budget=1, aggregate_on="logits")  # the default search space, as `eval` uses it
            result.status, result.reason = "works", ""
        except PolygleanError as err:
            result.status, result.reason = "refused", _first_line(err)
        except AssertionError as err:
            result.status, result.reason = "error", "check: " + str(err)
        except Exception as err:  # noqa: BLE001 - a bug to report with the model's name
            result.status, result.reason = "error", _first_line(err)
        break
    result.seconds = round(time.perf_counter() - start, 1)
    return result
