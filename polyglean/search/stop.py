"""Adaptive budgets: rules that stop an image's search early (a registry), and calibrating them to a target cost.

A rule is asked twice: once on the plain prediction (``at_root``: images that are confident enough stop at B = 1,
and get the plain prediction bit for bit), and, if ``watches_aggregate``, after every expansion with the image's
current aggregated prediction (``after_step``). Images that stop leave the batch: no later segment runs for them,
so the FLOPs and time they would have cost are really saved.

Rules are written ``NAME:VALUE`` and combined with ``+`` (an image stops when any rule says so):

- ``confidence:T`` — stop at B = 1 when the plain prediction's max softmax is at least T.
- ``entropy:T`` — stop at B = 1 when the plain prediction's normalised entropy is at most T.
- ``stable:K`` — stop when the aggregated prediction's class has not changed, and its max softmax has moved by
  less than 0.01, over the last K expansions.

Example:
    >>> rule = parse_stop("confidence:0.9+stable:2")
    >>> [type(r).__name__ for r in rule.rules]
    ['ConfidenceStop', 'StableStop']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polyglean.aggregate.aggregators import normalized_entropy
from polyglean.errors import ArgumentError
from polyglean.registry import Registry

__all__ = ["STOP_RULES", "AnyStop", "ConfidenceStop", "EntropyStop", "StableStop", "StopRule", "calibrate_stop",
           "calibrate_threshold",
           "parse_stop"]


class StopRule:
    """Decides per image when its search stops.

    ``at_root(logits)`` gets the plain predictions ``(N, K)`` and returns ``(N,)`` booleans (stop now);
    ``after_step(image, logits)`` gets one image's aggregated prediction ``(K,)`` after an expansion and returns
    whether it stops. ``reset(n)`` is called at the start of every search of ``n`` images.
    """

    watches_aggregate: bool = False

    def reset(self, n: int) -> None:
        """Forgets the previous batch."""

    def at_root(self, logits: Tensor) -> Tensor:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)

    def after_step(self, image: int, logits: Tensor) -> bool:
        return False


STOP_RULES: Registry[type[StopRule]] = Registry("stop rule")


def _number(name: str, value: str | float, low: float, high: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(f"stop rule {name!r} needs a number, got {value!r}") from None
    if not low <= v <= high:
        raise ArgumentError(f"stop rule {name!r}: {v} is out of range [{low}, {high}]")
    return v


@STOP_RULES.register("confidence")
class ConfidenceStop(StopRule):
    """Stop at B = 1 when the plain prediction's max softmax is ``>= threshold``."""

    def __init__(self, threshold: float | str) -> None:
        self.threshold = _number("confidence", threshold, 0.0, 1.0)

    @staticmethod
    def confidence(logits: Tensor) -> Tensor:
        """The score the threshold applies to (max softmax; higher = more confident)."""
        return torch.softmax(logits.float(), -1).amax(-1)

    def at_root(self, logits: Tensor) -> Tensor:
        return self.confidence(logits) >= self.threshold


@STOP_RULES.register("entropy")
class EntropyStop(StopRule):
    """Stop at B = 1 when the plain prediction's normalised entropy is ``<= threshold``."""

    def __init__(self, threshold: float | str) -> None:
        self.threshold = _number("entropy", threshold, 0.0, 1.0)

    @staticmethod
    def confidence(logits: Tensor) -> Tensor:
        """``1 - H/log K`` (higher = more confident), so that calibration treats both rules alike."""
        return 1.0 - normalized_entropy(logits)

    def at_root(self, logits: Tensor) -> Tensor:
        return normalized_entropy(logits) <= self.threshold


@STOP_RULES.register("stable")
class StableStop(StopRule):
    """Stop when the aggregated class is unchanged and its max softmax moved by < ``tolerance`` for ``k`` steps."""

    watches_aggregate = True

    def __init__(self, k: int | str, tolerance: float = 0.01) -> None:
        k_value = _number("stable", k, 1, 10_000)
        if k_value != int(k_value):
            raise ArgumentError(f"stop rule 'stable' needs a whole number of expansions, got {k!r}")
        self.k = int(k_value)
        self.tolerance = tolerance
        self._last: dict[int, tuple[int, float, int]] = {}

    def reset(self, n: int) -> None:
        self._last = {}

    def at_root(self, logits: Tensor) -> Tensor:
        p = torch.softmax(logits.float(), -1)
        conf, cls = p.max(-1)
        self._last = {i: (int(c), float(v), 0) for i, (c, v) in enumerate(zip(cls.tolist(), conf.tolist()))}
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)

    def after_step(self, image: int, logits: Tensor) -> bool:
        conf, cls = torch.softmax(logits.float(), -1).max(-1)
        c, v = int(cls), float(conf)
        last_c, last_v, runs = self._last.get(image, (-1, 0.0, 0))
        runs = runs + 1 if (c == last_c and abs(v - last_v) < self.tolerance) else 0
        self._last[image] = (c, v, runs)
        return runs >= self.k


class AnyStop(StopRule):
    """Several rules: an image stops when any of them says so."""

    def __init__(self, rules: Sequence[StopRule]) -> None:
        self.rules = list(rules)
        self.watches_aggregate = any(r.watches_aggregate for r in self.rules)

    def reset(self, n: int) -> None:
        for r in self.rules:
            r.reset(n)

    def at_root(self, logits: Tensor) -> Tensor:
        out = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for r in self.rules:
            out |= r.at_root(logits)
        return out

    def after_step(self, image: int, logits: Tensor) -> bool:
        return any([r.after_step(image, logits) for r in self.rules])  # every rule sees every step


def parse_stop(text: str | StopRule | None) -> StopRule | None:
    """``"confidence:0.9"``, ``"stable:2"``, ``"confidence:0.9+stable:2"``, a :class:`StopRule`, or None."""
    if text is None or isinstance(text, StopRule):
        return text
    rules = []
    for part in str(text).split("+"):
        name, sep, value = part.strip().partition(":")
        if not sep or not value.strip():
            raise ArgumentError(f"a stop rule is NAME:VALUE (e.g. confidence:0.9, entropy:0.2, stable:2), "
                                f"got {part!r}; rules: {', '.join(STOP_RULES.names())}")
        rules.append(STOP_RULES.get(name.strip())(value.strip()))
    return rules[0] if len(rules) == 1 else AnyStop(rules)


def calibrate_threshold(confidence: Tensor, full_cost: Tensor, target: float, plain_cost: float = 1.0) -> float:
    """The confidence threshold at which the mean cost per image is closest to ``target``.

    An image whose confidence is ``>= t`` stops at B = 1 and costs ``plain_cost``; the others cost their full
    search, ``full_cost`` (forward equivalents, measured per image on the fit data).

    Args:
        confidence: ``(N,)`` per-image confidence of the plain prediction (higher = stops sooner).
        full_cost: ``(N,)`` per-image cost of the search at the full budget, in forward equivalents.
        target: The wanted mean cost, between ``plain_cost`` and the mean full cost.

    Raises:
        ArgumentError: a target outside what the rule can reach.
    """
    n = confidence.numel()
    if n == 0 or full_cost.shape != confidence.shape:
        raise ArgumentError("calibration needs one confidence and one cost per fit image")
    lo, hi = plain_cost, float(full_cost.mean())
    if not lo <= target <= hi:
        raise ArgumentError(f"--target-cost {target} is outside what the rule can reach on the fit data: "
                            f"{lo:.2f} (every image stops at B=1) to {hi:.2f} (none stops)")
    order = torch.argsort(confidence.double(), descending=True)
    conf = confidence.double()[order]
    saved = torch.cumsum(full_cost.double()[order] - plain_cost, 0)
    # stopping the first j images (the most confident) costs mean(full) - saved[j-1] / n
    costs = torch.cat([torch.tensor([hi], dtype=torch.float64, device=saved.device), hi - saved / n])
    j = int(torch.argmin((costs - target).abs()))
    if j == 0:
        return float(conf[0]) + 1e-6  # nobody stops
    # threshold between the j-th and (j+1)-th most confident image
    return float(conf[j - 1]) if j == n else float((conf[j - 1] + conf[j]) / 2)


def calibrate_stop(search: object, batches: object, target: float, rule: str = "confidence") -> tuple[StopRule, dict]:
    """Calibrates a confidence-type rule on held-out images so that its mean cost is ``target`` forward equivalents.

    Runs ``search`` (without a stop rule) on every batch of ``batches`` to its budget, measures per image the cost
    of the full search and the plain prediction's confidence, and picks the threshold (:func:`calibrate_threshold`).

    Args:
        search: A :class:`~polyglean.search.PhaseSearch` without a stop rule.
        batches: Iterable of input batches ``(N, C, H, W)`` (labels, if any, are ignored).
        target: The wanted mean cost per image, in forward equivalents.
        rule: ``confidence`` or ``entropy``.

    Returns:
        The rule, and ``{"threshold", "target", "achieved", "images"}`` (achieved: the mean cost on the fit data).
    """
    if rule not in ("confidence", "entropy"):
        raise ArgumentError(f"only the confidence and entropy rules have a threshold to calibrate, got {rule!r}")
    if getattr(search, "stop", None) is not None:
        raise ArgumentError("calibrate with a search that has no stop rule of its own")
    kind = STOP_RULES.get(rule)
    budget = search.budget
    confs, costs = [], []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        result = search.run(x, budgets=[1, budget] if budget > 1 else [1])
        per_forward = result.forward_flops / x.shape[0]
        confs.append(kind.confidence(result.logits[1]).cpu())
        costs.append((result.image_flops_by_budget[budget] / per_forward).float())
    if not confs:
        raise ArgumentError("no fit images to calibrate on")
    conf, cost = torch.cat(confs), torch.cat(costs)
    t = calibrate_threshold(conf, cost, target)
    stops = conf >= t
    achieved = float(torch.where(stops, torch.ones_like(cost), cost).mean())
    threshold = t if rule == "confidence" else 1.0 - t
    return kind(min(max(threshold, 0.0), 1.0)), {"rule": rule, "threshold": threshold, "target": target,
                                                  "achieved": achieved, "images": int(conf.numel()),
                                                  "stopped_at_1": float(stops.float().mean())}
