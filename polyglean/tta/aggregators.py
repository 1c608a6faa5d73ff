"""Aggregators of augmented views: Mean, Max, GPS, AugTTA and ClassTTA (a registry), with saved fitted state.

Every aggregator takes the logits of all views of a policy, ``(N, A, K)`` in policy order, and returns one
prediction per image, ``(N, K)`` (log-probabilities or logits; either feeds a softmax). ``budget`` says how many
views it may use: Mean, Max, AugTTA and ClassTTA use the first ``budget`` views of the policy (all by default),
GPS makes ``budget`` greedy picks from all of them (with replacement, so it may evaluate fewer distinct views).
:meth:`TTAAggregator.views` lists the views a prediction needs, which is what it costs.

- ``mean``: log of the mean of the views' softmax probabilities.
- ``max``: per class, the largest log-probability over the views.
- ``gps`` (Molchanov et al., UAI 2020): greedy policy search. On held-out data, repeatedly add the view (with
  replacement) that maximises the *calibrated* log-likelihood of the ensemble ``log mean_t softmax(z_t)`` — the
  log-likelihood after the ensemble's best temperature; the prediction is the log-mean-softmax of the picks (the
  temperature is the selection criterion only, and is kept in the state as ``temperature``).
- ``augtta`` (Shanmugam et al., ICCV 2021): ``z = Σ_a w_a z_a`` with one weight per view, ``w = softmax(θ)``
  (non-negative, summing to one), fitted with cross-entropy.
- ``classtta``: ``z_k = Σ_a W_ak z_ak`` with one weight per view and class, normalised over the views of each
  class (``W = softmax(Θ, dim=views)``), fitted likewise.

Fitting is full-batch L-BFGS on the cached logits of held-out images, on the CPU, from a fixed start (uniform
weights), so it is deterministic. ``l2`` penalises ``θ`` (pulls the weights towards uniform).

Fitted state saves with :func:`save_fitted` to a ``torch.save`` file of tensors and plain values (it loads with
``weights_only=True``) that records the model, the policy and its view names; :func:`load_fitted` refuses a file
made for another model or policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from polyglean.registry import Registry
from polyglean.errors import ArgumentError

__all__ = [
    "TTA_AGGREGATORS",
    "AugTTA",
    "ClassTTA",
    "FitError",
    "GPS",
    "MaxTTA",
    "MeanTTA",
    "TTAAggregator",
    "calibrated_nll",
    "fit_key",
    "load_fitted",
    "save_fitted",
]

FORMAT = "polyglean-tta"
VERSION = 1


class FitError(ArgumentError):
    """Fitted state that is missing, does not fit the data, or was made for another model or policy."""


def _check_logits(logits: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ArgumentError(f"TTA aggregators take logits (N, A, K) of A views, got {shape}")
    return logits.float()


def _check_budget(budget: int | None) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ArgumentError(f"TTA budget must be an int >= 1 (views), got {budget!r}")
    return budget


class TTAAggregator:
    """Combines the views of each image into one prediction.

    Args:
        budget: views used (see the module docstring); None: all views of the policy.

    Shape:
        - logits: ``(N, A, K)``, all views of the policy in order
        - output: ``(N, K)``
    """

    needs_fit: ClassVar[bool] = False
    name: ClassVar[str] = ""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = _check_budget(budget)
        self.num_views: int | None = None

    def views(self, num_views: int) -> list[int]:
        """Indices of the views a prediction needs, for a policy of ``num_views`` views."""
        if self.budget is not None and self.budget > num_views:
            raise ArgumentError(f"TTA budget {self.budget} exceeds the policy's {num_views} views; "
                             f"choose a budget <= {num_views}")
        return list(range(num_views if self.budget is None else self.budget))

    def fit(self, logits: Tensor, labels: Tensor) -> TTAAggregator:
        """Fits to held-out ``logits`` ``(N, A, K)`` and ``labels`` ``(N,)``; a no-op for Mean and Max."""
        self.num_views = _check_logits(logits).shape[1]
        return self

    def combine(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, logits: Tensor) -> Tensor:
        logits = _check_logits(logits)
        if self.needs_fit and not self.fitted:
            raise FitError(f"{self.name} must be fitted (or its state loaded) before use")
        if self.num_views is not None and logits.shape[1] != self.num_views:
            raise ArgumentError(f"{self.name} was fitted on {self.num_views} views, got logits of {logits.shape[1]}")
        return self.combine(logits)

    @property
    def fitted(self) -> bool:
        return not self.needs_fit

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors that :meth:`load_state_dict` restores."""
        return {"name": self.name, "budget": self.budget, "num_views": self.num_views}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise FitError(f"state of {state.get('name')!r} loaded into a {self.name!r} aggregator")
        if state.get("budget") != self.budget:
            raise FitError(f"state fitted with budget {state.get('budget')} loaded into {self.name} with budget "
                           f"{self.budget}")
        self.num_views = state.get("num_views")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"


TTA_AGGREGATORS: Registry[type[TTAAggregator]] = Registry("TTA aggregator")


def _register(name: str) -> Any:
    def add(cls: type[TTAAggregator]) -> type[TTAAggregator]:
        cls.name = name
        TTA_AGGREGATORS.register(name, cls)
        return cls

    return add


def _log_mean_softmax(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """``log Σ_a w_a softmax(z_a)`` (uniform ``w`` by default). Shape: ``(N, A, K) -> (N, K)``."""
    logp = torch.log_softmax(logits, -1)
    if weights is None:
        return torch.logsumexp(logp, 1) - math.log(logits.shape[1])
    return torch.logsumexp(logp + weights.log().reshape(1, -1, 1), 1)


@_register("mean")
class MeanTTA(TTAAggregator):
    """Log of the mean of the views' softmax probabilities."""

    def combine(self, logits: Tensor) -> Tensor:
        return _log_mean_softmax(logits[:, self.views(logits.shape[1])])


@_register("max")
class MaxTTA(TTAAggregator):
    """Per class, the largest log-probability over the views."""

    def combine(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits[:, self.views(logits.shape[1])], -1).amax(1)


def calibrated_nll(log_probs: Tensor, labels: Tensor) -> tuple[float, float]:
    """The NLL of ``log_probs`` after its best temperature, and that temperature.

    Minimises ``mean -log softmax(log_probs / T)[label]`` over ``T``: a log-spaced grid (0.05 … 20), then L-BFGS on
    ``log T`` from the best grid point.

    Shape:
        - log_probs: ``(N, K)``
        - labels: ``(N,)``
    """
    lp = log_probs.double()
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 61, dtype=torch.float64, device=lp.device)
    nll = torch.stack([F.cross_entropy(lp / t, labels) for t in grid])
    log_t = grid[int(nll.argmin())].log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=30, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lp / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        best = F.cross_entropy(lp / log_t.exp(), labels)
        if not torch.isfinite(best) or best > nll.min():  # L-BFGS wandered off; keep the grid point
            return float(nll.min()), float(grid[int(nll.argmin())])
        return float(best), float(log_t.exp())


@_register("gps")
class GPS(TTAAggregator):
    """Greedy policy search (Molchanov et al. 2020): ``budget`` picks with replacement, each maximising the
    calibrated log-likelihood of the log-mean-softmax ensemble on held-out data.

    Attributes:
        selected: indices of the picked views in the order picked (repeats allowed), after :meth:`fit`.
        temperature: the best temperature of the final ensemble on the held-out data.
    """

    needs_fit = True

    def __init__(self, budget: int | None = None) -> None:
        super().__init__(budget)
        self.selected: list[int] = []
        self.temperature: float | None = None

    def views(self, num_views: int) -> list[int]:
        if not self.selected:
            raise FitError("gps must be fitted (or its state loaded) before it knows its views")
        return sorted(set(self.selected))

    @property
    def fitted(self) -> bool:
        return bool(self.selected)

    def fit(self, logits: Tensor, labels: Tensor) -> GPS:
        logits = _check_logits(logits)
        n, a, _ = logits.shape
        steps = a if self.budget is None else self.budget
        probs = torch.softmax(logits.double(), -1)
        total = torch.zeros_like(probs[:, 0])
        self.selected = []
        for t in range(1, steps + 1):
            best: tuple[float, int, float] | None = None
            for view in range(a):
                ens = ((total + probs[:, view]) / t).clamp_min(1e-300).log()
                score, temp = calibrated_nll(ens, labels)
                if best is None or score < best[0] - 1e-12:
                    best = (score, view, temp)
            assert best is not None
            self.selected.append(best[1])
            self.temperature = best[2]
            total += probs[:, best[1]]
        self.num_views = a
        return self

    def combine(self, logits: Tensor) -> Tensor:
        counts = torch.bincount(torch.tensor(self.selected, device=logits.device), minlength=logits.shape[1]).float()
        used = counts > 0
        return _log_mean_softmax(logits[:, used], counts[used] / counts.sum())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "selected": list(self.selected), "temperature": self.temperature}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.selected = [int(v) for v in state["selected"]]
        self.temperature = state.get("temperature")


class _Weighted(TTAAggregator):
    """A softmax-parametrised weighting of the first ``budget`` views, fitted with cross-entropy."""

    needs_fit = True

    def __init__(self, budget: int | None = None, *, l2: float = 0.0, max_iter: int = 200) -> None:
        super().__init__(budget)
        if l2 < 0:
            raise ArgumentError(f"l2 must be >= 0, got {l2}")
        self.l2 = l2
        self.max_iter = max_iter
        self.theta: Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.theta is not None

    def _shape(self, views: int, classes: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _weights(self, theta: Tensor) -> Tensor:
        """``(A, K)`` non-negative weights, each column summing to one over the views."""
        raise NotImplementedError

    @property
    def weights(self) -> Tensor:
        """The fitted weights: ``(A,)`` for AugTTA, ``(A, K)`` for ClassTTA."""
        if self.theta is None:
            raise FitError(f"{self.name} is not fitted")
        w = self._weights(self.theta)
        return w[:, 0] if self.theta.dim() == 1 else w

    def fit(self, logits: Tensor, labels: Tensor) -> _Weighted:
        logits = _check_logits(logits)
        if logits.shape[0] != labels.shape[0]:
            raise ArgumentError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
        self.num_views = logits.shape[1]
        z = logits[:, self.views(logits.shape[1])].double()
        theta = torch.zeros(self._shape(z.shape[1], z.shape[2]), dtype=torch.float64, device=z.device,
                            requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(self._mix(z, theta), labels) + self.l2 * theta.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.theta = theta.detach().float()
        return self

    def _mix(self, z: Tensor, theta: Tensor) -> Tensor:
        return (z * self._weights(theta).to(z.device, z.dtype).unsqueeze(0)).sum(1)

    def combine(self, logits: Tensor) -> Tensor:
        assert self.theta is not None
        return self._mix(logits[:, self.views(logits.shape[1])], self.theta)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "theta": self.theta, "l2": self.l2}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        theta = state["theta"]
        if not isinstance(theta, Tensor):
            raise FitError(f"{self.name} state holds no weights")
        self.theta = theta.float()


@_register("augtta")
class AugTTA(_Weighted):
    """One non-negative weight per view, summing to one: ``z = Σ_a w_a z_a`` (Shanmugam et al. 2021)."""

    def _shape(self, views: int, classes: int) -> tuple[int, ...]:
        return (views,)

    def _weights(self, theta: Tensor) -> Tensor:
        return torch.softmax(theta, 0).unsqueeze(1)


@_register("classtta")
class ClassTTA(_Weighted):
    """One non-negative weight per view and class, each class's weights summing to one over the views:
    ``z_k = Σ_a W_ak z_ak`` (Shanmugam et al. 2021)."""

    def _shape(self, views: int, classes: int) -> tuple[int, ...]:
        return (views, classes)

    def _weights(self, theta: Tensor) -> Tensor:
        return torch.softmax(theta, 0)


def fit_key(name: str, budget: int | None, phase_budget: int = 1) -> str:
    """The key of one fitted aggregator in a saved file: ``"augtta:views=21:phase=4"``."""
    return f"{name}:views={'all' if budget is None else budget}:phase={phase_budget}"


def save_fitted(path: str | Path, fits: Mapping[str, TTAAggregator], *, model: str, policy: str,
                views: Sequence[str], fingerprint: str | None = None) -> None:
    """Writes the state of fitted aggregators (keyed, e.g. by :func:`fit_key`) and what they were fitted for.

    Args:
        path: the file to write (``torch.save``; loads with ``weights_only=True``).
        fits: the fitted aggregators by key.
        model: the model spec (``cifar10-resnet20``, ``timm:NAME``, ...).
        policy: the policy name.
        views: the names of the policy's views, in order.
        fingerprint: SHA-256 of the model's weights (:func:`polyglean.aggregate.model_fingerprint`), checked by
            :func:`load_fitted` when both have one.
    """
    from polyglean.io import write_torch

    unfitted = [k for k, agg in fits.items() if not agg.fitted]
    if unfitted:
        raise FitError(f"cannot save unfitted aggregators: {', '.join(unfitted)}")
    payload = {"format": FORMAT, "version": VERSION, "model": model, "policy": policy, "views": list(views),
               "model_sha256": fingerprint, "fits": {k: agg.state_dict() for k, agg in fits.items()}}
    write_torch(path, payload)


def load_fitted(path: str | Path, *, model: str, policy: str, views: Sequence[str],
                fingerprint: str | None = None) -> dict[str, dict[str, Any]]:
    """The fitted states in ``path``, checked against the model (and its weights' fingerprint, when both the file
    and the caller have one), the policy and its views.

    Raises:
        CheckpointError: no such file, or not a PyTorch file.
        FitError: not a polyglean TTA file, or made for another model, weights, policy or set of views.
    """
    from polyglean.io import load_torch

    path = Path(path)
    payload = load_torch(path, "TTA weights file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FitError(f"{path} is not a polyglean TTA weights file (format {FORMAT!r})")
    for what, want in (("model", model), ("policy", policy)):
        if payload.get(what) != want:
            raise FitError(f"{path} was fitted for {what} {payload.get(what)!r}, not {want!r}; fit again for "
                           f"{want!r} (--tta-fit-data) or pass the matching file")
    recorded = payload.get("model_sha256")
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise FitError(f"{path} was fitted for other weights of {model!r} (sha256 {str(recorded)[:12]}…, these are "
                       f"{fingerprint[:12]}…); fit again for these weights")
    if list(payload.get("views", [])) != list(views):
        raise FitError(f"{path} was fitted on views {payload.get('views')}, but policy {policy!r} now has "
                       f"{list(views)}; fit again")
    return dict(payload["fits"])
