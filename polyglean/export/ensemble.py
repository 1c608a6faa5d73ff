"""``PhaseEnsemble``: a fixed set of phase states run as one plain module, with no search, ready to export.

The states are fixed when the module is made, so its forward is a static graph: the segments of the
:class:`~polyglean.phase.net.PhaseNet` are run as a tree — the prefix that every state shares once, and each later
segment once per distinct group of states that differ there (every phase a Python int, so no data-dependent
control flow) — the final feature maps are aligned by their fixed displacements and aggregated, and the model's
head runs once on the result. That graph traces with ``torch.export``, TorchScript's tracer and the ONNX exporter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyglean.aggregate import AGGREGATORS, align_static, alignment_factor, displacement
from polyglean.errors import ArgumentError, ModelError
from polyglean.phase.net import PhaseNet

__all__ = ["PhaseEnsemble", "State"]

State = tuple[int, ...]
"""A phase state: one flat phase index ``dy * R_w + dx`` per site of the :class:`PhaseNet`."""

_AGGREGATES = ("mean", "entropy")


def _as_state(net: PhaseNet, value: Any) -> State:
    """A state given as flat indices (one per site) or as ``{site: (dy, dx)}``, as a tuple of flat indices."""
    sites = net.sites
    if isinstance(value, Mapping):
        encoded = net.encode_phases(value, 1)
        return tuple(int(v) if v is not None else 0 for v in encoded)
    if isinstance(value, Tensor):
        value = value.tolist()
    try:
        flat = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ArgumentError(f"a state must be {len(sites)} flat phase indices or a dict {{site: (dy, dx)}}, "
                            f"got {value!r}") from None
    if len(flat) != len(sites):
        raise ArgumentError(f"a state needs one phase per site ({len(sites)}: "
                            f"{', '.join(s.name for s in sites)}), got {len(flat)}: {flat}")
    for p, s in zip(flat, sites):
        if not 0 <= p < s.num_phases:
            raise ArgumentError(f"phase index {p} out of range for factor {s.factor} at site '{s.name}' "
                                f"(expected 0 <= p < {s.num_phases})")
    return flat


class PhaseEnsemble(nn.Module):
    """A fixed set of phase states of a model, aggregated: the search's prediction without the search.

    Args:
        net: The :class:`PhaseNet` of a classifier (its weights are shared, not copied).
        states: The states, each as one flat phase index per site or a ``{site: (dy, dx)}`` dict; duplicates are
            an error. The default state (all zeros) is usually among them; with it alone the module is the plain
            model, bit for bit.
        aggregate: ``"mean"`` or ``"entropy"`` (as in :class:`~polyglean.PhaseSearch`).
        align: Align the final feature maps onto the default grid before aggregating them.

    Shape:
        - input: ``(N, C, H, W)``, what the model itself takes (preprocessed)
        - output: ``(N, K)`` logits

    Example:
        >>> import torch
        >>> from polyglean.models import load_model
        >>> model, _ = load_model("cifar10-resnet20", weights="random")  # doctest: +SKIP
        >>> net = PhaseNet(model, (3, 32, 32))  # doctest: +SKIP
        >>> ens = PhaseEnsemble(net, [{}, {"layer2.0": (1, 1)}])  # doctest: +SKIP
        >>> ens(torch.rand(4, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([4, 10])
    """

    def __init__(self, net: PhaseNet, states: Sequence[Any], *, aggregate: str = "mean", align: bool = True) -> None:
        super().__init__()
        if not isinstance(net, PhaseNet):
            raise ArgumentError(f"net must be a PhaseNet, got {type(net).__name__}")
        if aggregate not in _AGGREGATES:
            raise ArgumentError(f"a PhaseEnsemble aggregates with {' or '.join(_AGGREGATES)}, got {aggregate!r}")
        if net.head_segment is None:
            raise ModelError(f"the head of {type(net.model).__name__} cannot be separated from its features, so "
                             "its phase states cannot be aggregated on feature maps")
        if not len(states):
            raise ArgumentError("a PhaseEnsemble needs at least one state")
        self.net = net
        self.states: list[State] = [_as_state(net, s) for s in states]
        if len(set(self.states)) != len(self.states):
            dup = next(s for s in self.states if self.states.count(s) > 1)
            raise ArgumentError(f"state {dup} is given twice; every state counts once in the aggregate")
        self.aggregate = aggregate
        self.align = bool(align)
        self._aggregator = AGGREGATORS.get(aggregate)()
        factors = [s.factor for s in net.sites]
        moved = [i for i in range(len(factors)) if any(st[i] for st in self.states)]
        first = moved[0] if moved else 0
        self.factor = alignment_factor(factors, first)
        self.shifts: list[tuple[int, int]] = [
            tuple(int(v) for v in displacement(torch.tensor([st]), factors, first)[0]) for st in self.states]
        self._plan()

    def _plan(self) -> None:
        """For each segment, the groups of states that share its output, and the group each one comes from."""
        net = self.net
        entry = [net.entry_segment(s.index) for s in net.sites]
        self._stop = net.head_segment
        plan: list[list[tuple[State, State, list[int | None]]]] = []
        keys_before: list[State] = [()] * len(self.states)
        for seg in range(self._stop):
            groups: dict[State, tuple[State, list[int | None]]] = {}
            keys_now: list[State] = []
            for k, st in enumerate(self.states):
                key = tuple(p if entry[i] <= seg else 0 for i, p in enumerate(st))
                keys_now.append(key)
                if key not in groups:
                    phases = [p if (entry[i] <= seg and p) else None for i, p in enumerate(st)]
                    groups[key] = (keys_before[k], phases)
            plan.append([(key, parent, phases) for key, (parent, phases) in groups.items()])
            keys_before = keys_now
        self._plan_steps = plan
        self._final_keys = keys_before

    @property
    def segment_runs(self) -> list[int]:
        """How many times each segment runs per batch (1 for the shared prefix; the head runs once more)."""
        return [len(step) for step in self._plan_steps]

    def state_features(self, x: Tensor) -> list[Tensor]:
        """The final feature map of every state, unaligned, in the order of :attr:`states`.

        Shape:
            - x: ``(N, C, H, W)``
            - output: ``len(states)`` maps of shape ``(N, ...)``
        """
        net = self.net
        x = net.check_input(x)
        values: dict[State, Any] = {(): (x,)}
        for seg, step in enumerate(self._plan_steps):
            values = {key: net.run_from(seg, values[parent], phases, stop=seg + 1)[0]
                      for key, parent, phases in step}
        return [values[key][0] for key in self._final_keys]

    def forward(self, x: Tensor) -> Tensor:
        net = self.net
        features = self.state_features(x)
        if len(features) == 1 and self.shifts[0] == (0, 0):
            return net.head(features[0])
        logits = None
        if self.aggregate == "entropy":
            logits = torch.stack([net.head(f) for f in features], 1)
        if self.align:
            features = [f if d == (0, 0) else align_static(f, d, self.factor, net.feature_dims)
                        for f, d in zip(features, self.shifts)]
        stacked = torch.stack(features, 1)
        if logits is None:
            combined = stacked.mean(1)
        else:
            combined = self._aggregator.combine(stacked, logits, stacked.new_zeros(0))
        return net.head(combined)

    def extra_repr(self) -> str:
        return (f"states={len(self.states)}, aggregate={self.aggregate!r}, align={self.align}, "
                f"segment_runs={self.segment_runs}")
