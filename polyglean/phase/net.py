"""PhaseNet: a model run at any phase of any subsampling site, per image, with computation shared before a site.

The traced graph is cut just before the first op of every site into segments. Segment ``k`` takes the values live
at its cut (every activation computed before the cut and used after it) and returns those live at the next cut, so
states that differ only from site ``k`` on can share everything computed before it: run the prefix once, repeat
its live values, run the rest with per-image phases.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.phase.functional import check_phase
from polyglean.sites import Discovery, PhaseOp, Site, discover
from polyglean.sites.ops import PhaseValue

__all__ = ["Phases", "PhaseNet", "Segment", "check_eval_mode"]

Phases = (
    Mapping[str | int, tuple[int, int]]
    | Sequence[Mapping[str | int, tuple[int, int]]]
    | Tensor
    | None
)
"""What ``PhaseNet`` accepts as phases: ``{site: (dy, dx)}`` for the whole batch, a list of such dicts (one per
image), or a LongTensor of flat indices ``dy * R_w + dx``, shape ``(N, L)`` for ``L`` sites."""


@dataclass(frozen=True)
class Segment:
    """The part of the graph between two cuts.

    Attributes:
        start: Position (in graph order) of its first node.
        sites: Indices of the sites whose first op lies in this segment.
        live_in: Names of the values it takes (live at its start).
    """

    start: int
    sites: tuple[int, ...]
    live_in: tuple[str, ...]


def check_eval_mode(model: nn.Module) -> None:
    """Refuses a model with any module in training mode.

    In training mode BatchNorm normalises with each batch's statistics and updates its running statistics, and
    dropout is random: every forward of a search would change the user's model, and an image's prediction would
    depend on the other images of its batch. PhaseNet never switches the mode itself (the model is the user's).

    Raises:
        ModelError: naming a module in training mode, with the fix.
    """
    training = [name for name, m in model.named_modules() if m.training]
    if training:
        first = f"'{training[0]}'" if training[0] else "the model itself"
        raise ModelError(
            f"{type(model).__name__} is in training mode ({len(training)} modules, e.g. {first}); polyglean "
            "runs models in eval mode only (in training mode BatchNorm would update its running statistics with "
            "every search step and an image's prediction would depend on its batch). Hint: call model.eval() "
            "first."
        )


_MODE_DEPENDENT = {"batch_norm", "instance_norm", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                   "feature_alpha_dropout", "native_dropout", "native_batch_norm"}


def _mode_matters(name: str, node: fx.Node) -> bool:
    """Whether a traced call of a mode-dependent function would behave differently in training: a dropout with a
    probability of zero never drops; any batch or instance norm with running statistics would."""
    if "dropout" in name:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return not (isinstance(p, (int, float)) and p == 0)
    if name == "instance_norm":
        use_input_stats = node.kwargs.get("use_input_stats", node.args[5] if len(node.args) > 5 else True)
        return use_input_stats is not True
    return True


def _fetch(root: nn.Module, fallback: nn.Module, target: str) -> Any:
    for obj in (root, fallback):
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(f"attribute '{target}' not found in the model")


class PhaseNet(nn.Module):
    """Runs a trained model with any phase at any of its subsampling sites, exactly.

    The sites are found by rule when the ``PhaseNet`` is made (see :func:`polyglean.sites.discover`); the model's
    weights are shared, not copied. ``net(x)`` equals ``model(x)`` bit for bit.

    Args:
        model: Any image model in eval mode; a model with a module in training mode is refused
            (:func:`check_eval_mode`), and so is every forward after one was put back in training mode.
        input_size: ``(C, H, W)`` of one input image, for discovery.
        leaf_modules: Module names or types not to trace into.
        example: An example batch (any size) for discovery instead of random data.

    Example:
        >>> import torchvision  # doctest: +SKIP
        >>> net = PhaseNet(torchvision.models.resnet18().eval(), input_size=(3, 224, 224))  # doctest: +SKIP
        >>> [s.name for s in net.sites]  # doctest: +SKIP
        ['conv1', 'maxpool', 'layer2.0', 'layer3.0', 'layer4.0']
        >>> y = net(x, phases={"layer2.0": (1, 0)})  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        *,
        leaf_modules: Iterable[str | type[nn.Module]] = (),
        example: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if len(input_size) != 3:
            raise ArgumentError(f"input_size must be (C, H, W), got {tuple(input_size)}")
        check_eval_mode(model)
        self.model = model
        self.input_size = tuple(int(v) for v in input_size)
        found = discover(model, self.input_size, leaf_modules, example)
        self._found = found
        self._sites = found.sites
        self._by_name = {s.name: s for s in found.sites}
        self._op_names = {name: s for s in found.sites for name in s.ops}
        rh, rw = self.max_reduction
        if self.input_size[1] < rh or self.input_size[2] < rw:
            raise ArgumentError(
                f"input size {self.input_size[1]}x{self.input_size[2]} is smaller than the model's largest path "
                f"reduction {rh}x{rw}; use an input of at least {rh}x{rw}"
            )
        self._plan()
        self._build()
        self._flops: list[int] | None = None

    # ----------------------------------------------------------------------------------------------- structure
    @property
    def sites(self) -> list[Site]:
        """The subsampling sites, input to output."""
        return list(self._sites)

    @property
    def discovery(self) -> Discovery:
        """What discovery found: the traced graph, the sites, and the runnable op of every subsampling node."""
        return self._found

    @property
    def segments(self) -> list[Segment]:
        """The segments the graph is cut into (one before the first site, then one per reusable cut)."""
        return list(self._segments)

    @property
    def total_factor(self) -> tuple[int, int]:
        """The model's total reduction ``(R_h, R_w)``: the product of the factors of the sites on the main path."""
        return self._found.total_factor

    @property
    def max_reduction(self) -> tuple[int, int]:
        """The largest reduction of any path through the model: inputs must be at least this large."""
        return self._found.max_reduction

    @property
    def main_sites(self) -> list[Site]:
        """The sites on the main path (see :attr:`Site.main_path`), input to output."""
        return [s for s in self._sites if s.main_path]

    def displacement(self, states: Tensor, first: int) -> Tensor:
        """Displacement ``(Δy, Δx)`` of phase states, in pixels of the input grid of site ``first``.

        Each main-path site ``l >= first`` at phase ``(dy, dx)`` moves the grid of everything after it by ``dy``
        rows of its own input, which is ``r_in(l) / r_in(first)`` rows of the input of ``first`` (``r_in``: the
        dataflow reduction at a site's input). On a chain of sites this is ``Σ_l d_l · Π_{first <= l' < l} R_l'``.
        Sites off the main path move nothing as a whole and count zero.

        Shape:
            - states: ``(..., L)`` flat phase indices
            - output: ``(..., 2)``
        """
        base = self._input_reduction(self._sites[first])
        dy = torch.zeros(states.shape[:-1], dtype=torch.long, device=states.device)
        dx = torch.zeros_like(dy)
        for site in self._sites[first:]:
            if not site.main_path:
                continue
            r_in = self._input_reduction(site)
            scale = (max(1, round(r_in[0] / base[0])), max(1, round(r_in[1] / base[1])))
            dy = dy + (states[..., site.index] // site.factor[1]) * scale[0]
            dx = dx + (states[..., site.index] % site.factor[1]) * scale[1]
        return torch.stack([dy, dx], -1)

    def alignment_factor(self, first: int) -> tuple[int, int]:
        """``T``: the reduction from the input of site ``first`` to the final feature map (the main path's end)."""
        base = self._input_reduction(self._sites[first])
        total = self.total_factor
        return (max(1, round(total[0] / base[0])), max(1, round(total[1] / base[1])))

    @staticmethod
    def _input_reduction(site: Site) -> tuple[int, int]:
        return (max(1, site.reduction[0] // site.factor[0]), max(1, site.reduction[1] // site.factor[1]))

    @property
    def head_segment(self) -> int | None:
        """Index of the segment that maps the final feature map to the output (``None`` if not separable)."""
        return self._head_segment

    @property
    def feature_dims(self) -> tuple[int, int]:
        """Spatial dimensions of the final feature map: ``(-2, -1)`` (NCHW) or ``(1, 2)`` (channels-last)."""
        return self._feature_dims

    def head(self, features: Tensor) -> Any:
        """Runs the head (everything after the final feature map) on ``features``.

        Raises:
            ValueError: the model's head cannot be separated from its features.
        """
        if self._head_segment is None:
            raise ArgumentError(
                f"the head of {type(self.model).__name__} cannot be separated from its features (no single final "
                "feature map feeds it); aggregate over logits instead"
            )
        return self._programs[self._head_segment](features, [None] * len(self._sites))

    def site(self, key: str | int | Site) -> Site:
        """A site by name, index, or the name of one of its ops.

        Raises:
            ValueError: for an unknown name or an index out of range, listing the sites.
        """
        if isinstance(key, Site):
            key = key.name
        if isinstance(key, int) and not isinstance(key, bool):
            if not -len(self._sites) <= key < len(self._sites):
                raise ArgumentError(f"site index {key} out of range for {len(self._sites)} sites ({self._listing()})")
            return self._sites[key]
        if isinstance(key, str):
            if key in self._by_name:
                return self._by_name[key]
            if key in self._op_names:
                return self._op_names[key]
        raise ArgumentError(f"unknown site {key!r}; {self._listing()}")

    def entry_segment(self, site: str | int | Site) -> int:
        """Index of the segment a state differing from ``site`` on must be run from."""
        return self._entry[self.site(site).index]

    def _listing(self) -> str:
        if not self._sites:
            return f"{type(self.model).__name__} has no subsampling sites"
        return "sites are: " + ", ".join(f"{s.index}:{s.name}" for s in self._sites)

    # -------------------------------------------------------------------------------------------------- planning
    def _plan(self) -> None:
        gm = self._found.graph_module
        info = self._found.info
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ArgumentError(
                f"{type(self.model).__name__}.forward takes {len(inputs)} inputs ({[n.name for n in inputs]}); "
                "PhaseNet needs a model whose forward takes one image batch"
            )
        batch = self._found.batch  # the size of the batch discovery recorded the graph on
        depends: dict[fx.Node, bool] = {}
        for n in nodes:
            depends[n] = n.op == "placeholder" or any(depends[a] for a in n.all_input_nodes)

        def live(cut: int) -> list[fx.Node]:
            return [n for n in nodes[:cut] if depends[n] and any(pos[u] >= cut for u in n.users)]

        def reusable(values: list[fx.Node]) -> bool:
            shapes = [info[n].shape if n in info else None for n in values]
            return all(info[n].is_tensor and s is not None and len(s) > 0 and s[0] == batch
                       for n, s in zip(values, shapes))

        first = [min(pos[n] for n, (_, idx) in self._found.ops.items() if idx == s.index) for s in self._sites]
        cuts = [pos[inputs[0]] + 1]
        for c in sorted(set(first)):
            if c > cuts[-1] and reusable(live(c)):
                cuts.append(c)
        self._head_segment: int | None = None
        self._feature_dims: tuple[int, int] = (-2, -1)
        feature = self._feature_node(nodes, pos, info, batch, cuts[-1])
        if feature is not None and live(pos[feature] + 1) == [feature]:
            cuts.append(pos[feature] + 1)
            self._head_segment = len(cuts) - 1
        self._nodes, self._pos, self._depends = nodes, pos, depends
        self._cuts = cuts
        self._live = [live(c) for c in cuts]
        self._entry = [max(i for i, c in enumerate(cuts) if c <= f) for f in first]
        self._segments = [
            Segment(c, tuple(s.index for s in self._sites if self._entry[s.index] == i),
                    tuple(n.name for n in self._live[i]))
            for i, c in enumerate(cuts)
        ]

    def _feature_node(self, nodes: list[fx.Node], pos: dict[fx.Node, int], info: dict, batch: int,
                      after: int) -> fx.Node | None:
        """The final spatial feature map: the last batch tensor with a spatial extent (the head's input)."""
        final = self._sites[-1].out_size if self._sites else None
        for n in reversed(nodes):
            if pos[n] < after:
                return None
            i = info.get(n)
            if i is None or not i.is_tensor or len(i.shape) != 4 or i.shape[0] != batch:
                continue
            if final is not None and tuple(i.shape[1:3]) == tuple(final) and tuple(i.shape[2:]) != tuple(final):
                self._feature_dims = (1, 2)  # channels-last (N, H, W, C)
                return n
            if i.shape[-1] * i.shape[-2] > 1:
                return n
        return None

    def _build(self) -> None:
        """Generates one GraphModule per segment, referencing the model's own modules and parameters."""
        gm = self._found.graph_module
        ops = self._found.ops
        op_key = {n: f"_pg_op{k}" for k, n in enumerate(ops)}
        self._ops: list[PhaseOp] = [op for op, _ in ops.values()]
        modules: list[fx.GraphModule] = []
        bounds = self._cuts + [len(self._nodes)]
        for i in range(len(self._cuts)):
            start, stop = bounds[i], bounds[i + 1]
            last = i == len(self._cuts) - 1
            graph = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            for j, n in enumerate(self._live[i]):
                env[n] = graph.placeholder(f"in{j}_{n.name}")
            phases = graph.placeholder("phases")
            site_phase: dict[int, fx.Node] = {}
            wanted = self._needed(start, stop)
            root: dict[str, Any] = {}
            for n in self._nodes:
                if n not in wanted:
                    continue
                if n.op == "output":
                    graph.output(fx.map_arg(n.args[0], lambda a: env[a]))
                    continue
                if n in ops:
                    _, site = ops[n]
                    if site not in site_phase:
                        site_phase[site] = graph.call_function(operator.getitem, (phases, site))
                    key = op_key[n]
                    root[key] = ops[n][0]
                    args = fx.map_arg(n.args, lambda a: env[a])
                    kwargs = fx.map_arg(n.kwargs, lambda a: env[a])
                    env[n] = graph.call_module(key, args, {**kwargs, "phase": site_phase[site]})
                    continue
                if n.op == "call_module":
                    root[n.target] = _fetch(self.model, gm, n.target)
                elif n.op == "get_attr":
                    root[n.target] = _fetch(self.model, gm, n.target)
                env[n] = graph.node_copy(n, lambda a: env[a])
            if not last:
                graph.output(tuple(env[n] for n in self._live[i + 1]))
            modules.append(fx.GraphModule(root, graph, f"Segment{i}"))
        self._programs = modules

    def _needed(self, start: int, stop: int) -> set[fx.Node]:
        """Nodes of ``[start, stop)`` plus the input-independent nodes before ``start`` they use."""
        wanted = set(self._nodes[start:stop])
        stack = [a for n in list(wanted) for a in n.all_input_nodes]
        while stack:
            a = stack.pop()
            if a in wanted or self._pos[a] >= start or self._depends[a]:
                continue
            wanted.add(a)
            stack.extend(a.all_input_nodes)
        return wanted

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> PhaseNet:
        super()._apply(fn, *args, **kwargs)
        self._found.graph_module._apply(fn, *args, **kwargs)  # tensor constants made by tracing
        self._build()
        return self

    # ------------------------------------------------------------------------------------------------- running
    def check_input(self, x: Any) -> Tensor:
        """Validates an input batch and returns it.

        Raises:
            TypeError: not a tensor.
            ModelError: the model is in training mode.
            ValueError: not ``(N, C, H, W)``, wrong channel count, or smaller than the largest path reduction.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a tensor (N, C, H, W), got {type(x).__name__}")
        check_eval_mode(self.model)
        if x.dim() != 4:
            raise ArgumentError(f"input must be a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_size[0]:
            raise ArgumentError(
                f"input has {x.shape[1]} channels but the model was inspected with {self.input_size[0]} "
                f"(input_size={self.input_size})"
            )
        rh, rw = self.max_reduction
        if x.shape[-2] < rh or x.shape[-1] < rw:
            raise ArgumentError(
                f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the model's largest path reduction {rh}x{rw}"
            )
        return x

    def encode_phases(self, phases: Phases, batch: int, device: torch.device | None = None) -> list[PhaseValue]:
        """Turns any accepted phase description into one entry per site: ``None``, a flat int, or ``(N,)``.

        Per-image phases given as dicts become a tensor on ``device`` (that of the input; default the CPU).

        Raises:
            ValueError: unknown site, phase out of range, or a batch size that does not match.
        """
        out: list[PhaseValue] = [None] * len(self._sites)
        if phases is None:
            return out
        if isinstance(phases, Tensor):
            return self._encode_tensor(phases, batch)
        if isinstance(phases, Mapping):
            for key, value in phases.items():
                site = self.site(key)
                if isinstance(value, Tensor):
                    out[site.index] = self._encode_tensor_column(value, site, batch)
                    continue
                phase = self._pair(value, site)
                check_phase(phase, site.factor, f"site '{site.name}'")
                flat = phase[0] * site.factor[1] + phase[1]
                out[site.index] = flat or None
            return out
        if isinstance(phases, Sequence) and not isinstance(phases, (str, bytes)):
            if len(phases) != batch:
                raise ArgumentError(f"got phases for {len(phases)} images but the batch has {batch}")
            table = torch.zeros(batch, len(self._sites), dtype=torch.long, device=device)
            for i, per_image in enumerate(phases):
                if not isinstance(per_image, Mapping):
                    raise TypeError(f"per-image phases must be dicts {{site: (dy, dx)}}, got {type(per_image)}")
                for key, value in per_image.items():
                    site = self.site(key)
                    phase = self._pair(value, site)
                    check_phase(phase, site.factor, f"site '{site.name}' (image {i})")
                    table[i, site.index] = phase[0] * site.factor[1] + phase[1]
            return self._encode_tensor(table, batch)
        raise TypeError(f"phases must be a dict, a list of dicts or a tensor, got {type(phases).__name__}")

    @staticmethod
    def _pair(value: Any, site: Site) -> tuple[int, int]:
        try:
            dy, dx = value
            return (int(dy), int(dx))
        except (TypeError, ValueError):
            raise ArgumentError(f"phase for site '{site.name}' must be a pair (dy, dx), got {value!r}") from None

    def _encode_tensor(self, table: Tensor, batch: int) -> list[PhaseValue]:
        if table.dim() == 3 and table.shape[-1] == 2:
            widths = torch.tensor([s.factor[1] for s in self._sites], device=table.device)
            table = table[..., 0] * widths + table[..., 1]
        if table.dim() != 2 or table.shape != (batch, len(self._sites)):
            raise ArgumentError(
                f"a phase tensor must have shape (N, L) = ({batch}, {len(self._sites)}) of flat indices, "
                f"got {tuple(table.shape)}"
            )
        return [self._encode_tensor_column(table[:, s.index], s, batch) for s in self._sites]

    @staticmethod
    def _encode_tensor_column(column: Tensor, site: Site, batch: int) -> PhaseValue:
        if column.dim() == 2 and column.shape[-1] == 2:
            column = column[:, 0] * site.factor[1] + column[:, 1]
        if column.shape != (batch,) or column.dtype.is_floating_point:
            raise ArgumentError(f"phases of site '{site.name}' must be an integer tensor of shape ({batch},)")
        lo, hi = int(column.min()), int(column.max())
        if lo < 0 or hi >= site.num_phases:
            bad = lo if lo < 0 else hi
            raise ArgumentError(
                f"phase index {bad} out of range for factor {site.factor} at site '{site.name}' "
                f"(expected 0 <= p < {site.num_phases})"
            )
        return None if hi == 0 else column.long()

    def forward(self, x: Tensor, phases: Phases = None) -> Any:
        """Runs the model with ``phases`` (sites not named keep phase ``(0, 0)``)."""
        x = self.check_input(x)
        out, _ = self.run_from(0, (x,), self.encode_phases(phases, x.shape[0], x.device))
        return out

    def train_forward(self, x: Tensor, phases: Phases = None) -> Any:
        """Runs the model with ``phases`` in whatever mode its modules are in: for training with phase states.

        The graph was traced in eval mode, but its segments call the model's own modules, so a BatchNorm module in
        training mode normalises with the batch's statistics (the whole batch, whatever phase each image runs at)
        and updates its running statistics, and a dropout module drops, exactly as in ordinary training; gradients
        flow through the phase ops to the model's parameters. What tracing fixed at eval-mode values is refused
        (:meth:`check_trainable`). With every phase at ``(0, 0)`` this is the model's own forward, bit for bit.

        Raises:
            ModelError: the traced graph holds a mode-dependent functional call (see :meth:`check_trainable`).
        """
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ArgumentError(f"input must be a 4-D batch (N, C, H, W), got {getattr(x, 'shape', type(x))}")
        if self.model.training:
            self.check_trainable()
        out, _ = self.run_from(0, (x,), self.encode_phases(phases, x.shape[0], x.device))
        return out

    def check_trainable(self) -> None:
        """Refuses a graph in which tracing fixed a mode-dependent functional call to its eval-mode behaviour.

        A module (``nn.BatchNorm2d``, ``nn.Dropout``) is called as itself and follows the mode it is in; but a
        ``forward`` that calls ``F.batch_norm(..., training=self.training)`` or ``F.dropout(..., training=...)``
        was traced with the eval-mode value, so in training it would silently keep normalising with the running
        statistics or never drop.

        Raises:
            ModelError: naming the first such call.
        """
        if getattr(self, "_trainable_checked", False):
            return
        for n in self._found.graph_module.graph.nodes:
            if n.op != "call_function":
                continue
            name = getattr(n.target, "__name__", str(n.target))
            if name in _MODE_DEPENDENT and _mode_matters(name, n):
                raise ModelError(
                    f"{type(self.model).__name__} calls {name}() in its forward (node '{n.name}'), traced in eval "
                    "mode: in training it would keep its eval-mode behaviour, so phase-state training would not be "
                    "ordinary training. Hint: make that layer a module (nn.BatchNorm2d, nn.Dropout), or list it in "
                    "leaf_modules so it is called as itself"
                )
        called = {n.target for n in self._found.graph_module.graph.nodes if n.op == "call_module"}
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and name not in called:
                raise ModelError(
                    f"{type(self.model).__name__} holds dropout module '{name}' (p={m.p}) that its forward does not "
                    "call as a module (its probability is read instead, e.g. by scaled_dot_product_attention), so the "
                    "eval-mode trace fixed it to no dropout; phase-state training would silently drop nothing there. "
                    f"Hint: set model.{name}.p = 0 to train without it, or call it as a module"
                )
        self._trainable_checked = True

    def run_to(self, x: Tensor, segment: int, phases: list[PhaseValue]) -> tuple[Tensor, ...]:
        """Runs segments ``0 .. segment - 1``; returns the values live at the start of ``segment``."""
        values, _ = self.run_from(0, (x,), phases, stop=segment)
        return values

    def run_from(self, segment: int, values: tuple[Tensor, ...], phases: list[PhaseValue], *,
                 stop: int | None = None, keep: Iterable[int] = ()) -> tuple[Any, dict[int, tuple[Tensor, ...]]]:
        """Runs segments ``segment .. stop - 1`` from the values live at the start of ``segment``.

        Args:
            segment: Index of the first segment to run.
            values: The values live at its start (from :meth:`run_to`, or kept from an earlier run).
            phases: One entry per site, as from :meth:`encode_phases` (batch size of ``values``).
            stop: Segment to stop before (default: run to the model output).
            keep: Segments whose start values to return as well (for later reuse).

        Returns:
            The model output (or the values live at ``stop``), and ``{segment: values}`` for ``keep``.
        """
        keep = set(keep)
        kept: dict[int, tuple[Tensor, ...]] = {}
        out: Any = values
        for i in range(segment, len(self._programs) if stop is None else stop):
            if i in keep:
                kept[i] = out
            out = self._programs[i](*out, phases)
        return out, kept

    def all_phases(self, x: Tensor, site: str | int | Site, phases: Phases = None) -> Tensor:
        """The output for every phase of one site, computing everything before the site once.

        Args:
            x: Input batch.
            site: The site whose ``R_h * R_w`` phases to run.
            phases: Phases of the other sites (the entry for ``site`` itself is ignored).

        Returns:
            Outputs stacked per image and phase (flat index ``dy * R_w + dx``).

        Shape:
            - x: ``(N, C, H, W)``
            - output: ``(N, R_h * R_w, *out)`` where ``out`` is the shape of one image's model output.
        """
        x = self.check_input(x)
        s = self.site(site)
        n, count = x.shape[0], s.num_phases
        encoded = self.encode_phases(phases, n, x.device)
        segment = self._entry[s.index]
        values = self.run_to(x, segment, encoded)
        values = tuple(v.repeat_interleave(count, 0) for v in values)
        repeated = [p.repeat_interleave(count, 0) if isinstance(p, Tensor) else p for p in encoded]
        repeated[s.index] = torch.arange(count, device=x.device).repeat(n)
        out, _ = self.run_from(segment, values, repeated)
        if not isinstance(out, Tensor):
            raise TypeError(f"all_phases needs a model that returns a tensor, got {type(out).__name__}")
        return out.reshape(n, count, *out.shape[1:])

    def stitch(self, x: Tensor, sites: Any, *, chunk: int | None = None) -> Any:
        """The output at every phase combination of ``sites``, interleaved: see :func:`polyglean.phase.stitch.stitch`."""
        from polyglean.phase.stitch import stitch

        return stitch(self, x, sites, chunk=chunk)

    # ---------------------------------------------------------------------------------------------------- cost
    def segment_flops(self) -> list[int]:
        """FLOPs of each segment for one image of ``input_size`` (``torch.utils.flop_counter``)."""
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            dtype = param.dtype if param is not None else torch.float32
            values: tuple[Any, ...] = (torch.zeros(1, *self.input_size, device=device, dtype=dtype),)
            phases: list[PhaseValue] = [None] * len(self._sites)
            flops = []
            with torch.no_grad():
                for module in self._programs:
                    counter = FlopCounterMode(display=False)
                    with counter:
                        values = module(*values, phases)
                    flops.append(int(counter.get_total_flops()))
            self._flops = flops
        return list(self._flops)

    def flops_from(self, site: str | int | Site) -> float:
        """Share of one forward's FLOPs spent from ``site``'s entry on: the cost of one state that differs there."""
        flops = self.segment_flops()
        total = sum(flops)
        return sum(flops[self.entry_segment(site):]) / total if total else 0.0

    def extra_repr(self) -> str:
        sites = ", ".join(f"{s.name}{s.factor}" for s in self._sites) or "none"
        return f"input_size={self.input_size}, sites=[{sites}]"
