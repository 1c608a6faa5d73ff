"""Shift-and-stitch: a trained model at a finer output stride, exactly, by interleaving the phases of its sites.

Every phase of a site is a different coarse sampling of the same finer map. For a site of factor ``(R_h, R_w)``
the model's output at phase ``(dy, dx)``, coarse cell ``(i, j)``, is the output of the network with that site's
stride removed and every later spatial op dilated by ``(R_h, R_w)`` (the *à trous* network) at fine cell
``(i R_h + dy, j R_w + dx)``. Interleaving the outputs of all phases gives that network's output (FCN's
shift-and-stitch). For several sites the fine index composes site after site: a state with phases ``d_1 .. d_m``
(input to output) lands at ``i · Π R_l + Σ_l d_l Π_{l' < l} R_l'``, the displacement of the state.

The work shares everything before a site: the part of the model before the first stitched site runs once per
image, each stitched site's phases branch from there (a tree: the states that differ only at a later site share the
part before it), and ``chunk`` bounds how many states run at once, each chunk written into the preallocated output.

Rules (checked before any work):

- The stitched sites must be a *suffix* of the model's sites: a later site that keeps its stride would sample the
  fine grid unevenly.
- Every op after the first stitched site must be local: a global pooling, a normalisation over the whole map
  (GroupNorm, InstanceNorm), a resize to a fixed size, a flatten — anything whose output's spatial size is not its
  input's — sees a different map at the coarse grid than the à trous network would, and is refused, by name.
  Stitch a model truncated before it (its backbone's final feature map) instead.
- Sizes: the stitched map has every phase's every cell, ``(R_h h, R_w w)`` for a coarse output of ``(h, w)``.
  It equals the à trous network's output exactly when each stitched site's stride-1 map is a multiple of its
  factor (e.g. an input size divisible by the model's total reduction). Otherwise the à trous map is smaller and
  its last rows/columns are phase cells past its border: they, and cells whose receptive field reaches them, were
  computed from the site's pad-value extension rather than the à trous network's zero padding. Every cell always
  equals the corresponding cell of ``net(x, phases=...)``.

Content-adaptive stitching (:func:`stitch_masked`) computes the extra phases only where a mask says, on tiles that
cover the mask plus the receptive-field halo they need, so its cost falls with the mask's area.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.sites import Site

if TYPE_CHECKING:
    from polyglean.phase.net import PhaseNet

__all__ = [
    "StitchPlan",
    "MaskedStitch",
    "edge_mask",
    "halo",
    "plan",
    "stitch",
    "stitch_masked",
    "uncertain_mask",
]

_GLOBAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Flatten,
)
_GLOBAL_FUNCTIONS = {
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
    F.group_norm, F.instance_norm, F.interpolate, torch.flatten,
}


# ------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class StitchPlan:
    """What stitching a set of sites of one :class:`PhaseNet` does.

    Attributes:
        sites: The stitched sites, input to output.
        stages: The sites grouped by the segment their phases branch from: ``(segment, site indices)``, in order.
        factor: Product of the stitched sites' factors ``(R_h, R_w)``: how much finer the stitched output is.
        leaves: For each leaf of the model's output (flattened: a tensor, or the values of a dict/list/tuple in
            order), the indices of the stitched sites it depends on (an empty tuple: the leaf is not stitched).
    """

    sites: tuple[Site, ...]
    stages: tuple[tuple[int, tuple[int, ...]], ...]
    factor: tuple[int, int]
    leaves: tuple[tuple[int, ...], ...]

    @property
    def num_states(self) -> int:
        """Number of phase combinations: ``Π R_h R_w`` over the stitched sites."""
        return math.prod(s.num_phases for s in self.sites)


def _graph_deps(net: PhaseNet, chosen: set[int]) -> dict[fx.Node, frozenset[int]]:
    """For every node of the traced model, the stitched sites (by index) whose ops it depends on."""
    ops = net.discovery.ops
    deps: dict[fx.Node, frozenset[int]] = {}
    for n in net.discovery.graph_module.graph.nodes:
        d = frozenset().union(*(deps[a] for a in n.all_input_nodes)) if n.all_input_nodes else frozenset()
        if n in ops and ops[n][1] in chosen:
            d = d | {ops[n][1]}
        deps[n] = d
    return deps


def _leaves(value: Any) -> list[Any]:
    """The leaves of a model output (or of an fx output node's argument) in a fixed order."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _rebuild(template: Any, leaves: Iterable[Any]) -> Any:
    it = iter(leaves)

    def build(v: Any) -> Any:
        if isinstance(v, dict):
            return type(v)((k, build(x)) for k, x in v.items()) if type(v) is not dict else {k: build(x)
                                                                                             for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            items = [build(x) for x in v]
            return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
        return next(it)

    return build(template)


def _describe(net: PhaseNet, n: fx.Node) -> str:
    if n.op == "call_module":
        module = net.discovery.graph_module.get_submodule(str(n.target))
        return f"layer '{n.target}' ({type(module).__name__})"
    name = getattr(n.target, "__name__", str(n.target))
    return f"'{name}' at node '{n.name}'"


def _check_local(net: PhaseNet, deps: dict[fx.Node, frozenset[int]], first: Site) -> None:
    """Refuses an op after the stitched sites that sees the whole map at once or fixes its size."""
    gm = net.discovery.graph_module
    info = net.discovery.info
    ops = net.discovery.ops
    for n in gm.graph.nodes:
        if not deps[n] or n in ops or n.op in ("output", "placeholder"):
            continue
        bad = False
        if n.op == "call_module":
            bad = isinstance(gm.get_submodule(str(n.target)), _GLOBAL_MODULES)
        elif n.op == "call_function":
            try:
                bad = n.target in _GLOBAL_FUNCTIONS
            except TypeError:
                bad = False
        i = info.get(n)
        why = "sees the whole map at once"
        if not bad and i is not None and i.is_tensor and i.input_shape is not None and len(i.input_shape) == 4:
            src = next((a for a in n.all_input_nodes if info.get(a) is not None and info[a].is_tensor), None)
            if src is not None and deps[src] and i.shape is not None and (
                    len(i.shape) != 4 or tuple(i.shape[-2:]) != tuple(i.input_shape[-2:])):
                bad, why = True, f"changes the map's size {tuple(i.input_shape)} -> {tuple(i.shape)}"
        if bad:
            raise ModelError(
                f"cannot stitch from site '{first.name}': {_describe(net, n)} after it {why}, so the phases' "
                "outputs do not interleave into the finer-stride network. Hint: stitch a model truncated before "
                "it (e.g. its backbone up to the final feature map), or stitch only sites after it."
            )


def plan(net: PhaseNet, sites: Sequence[str | int | Site] | str | int | Site) -> StitchPlan:
    """Checks that ``sites`` can be stitched and works out how.

    Args:
        net: The model.
        sites: Site names, indices or :class:`Site` records (one, or a sequence).

    Raises:
        ArgumentError: no site, an unknown site, or a set that is not a suffix of the model's strided sites.
        ModelError: an op after the first stitched site that sees the whole map at once (named).
    """
    if isinstance(sites, (str, int, Site)):
        sites = [sites]
    if not sites:
        raise ArgumentError(f"stitching needs at least one site; {_site_listing(net)}")
    try:
        chosen = sorted({net.site(s).index for s in sites})
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    all_sites = net.sites
    for s in all_sites[chosen[0]:]:
        if s.index not in chosen and s.num_phases > 1:
            raise ArgumentError(
                f"site '{s.name}' lies after the stitched site '{all_sites[chosen[0]].name}' and keeps its stride "
                f"{s.factor}: the stitched output would sample the finer grid unevenly. Stitch it as well "
                f"(sites={[all_sites[i].name for i in sorted(chosen + [s.index])]})"
            )
    picked = tuple(all_sites[i] for i in chosen)
    deps = _graph_deps(net, set(chosen))
    _check_local(net, deps, picked[0])
    stages: list[tuple[int, list[int]]] = []
    for s in picked:
        seg = net.entry_segment(s)
        if stages and stages[-1][0] == seg:
            stages[-1][1].append(s.index)
        else:
            stages.append((seg, [s.index]))
    out_node = next(n for n in reversed(net.discovery.graph_module.graph.nodes) if n.op == "output")
    leaves = tuple(
        tuple(sorted(deps[leaf])) if isinstance(leaf, fx.Node) else ()
        for leaf in _leaves(out_node.args[0])
    )
    factor = (math.prod(s.factor[0] for s in picked), math.prod(s.factor[1] for s in picked))
    return StitchPlan(picked, tuple((seg, tuple(ix)) for seg, ix in stages), factor, leaves)


def _site_listing(net: PhaseNet) -> str:
    return "sites are: " + (", ".join(s.name for s in net.sites) or "none")


# -------------------------------------------------------------------------------------------------- running
class _Writer:
    """Interleaves chunks of state outputs into preallocated finer maps, one per output leaf."""

    def __init__(self, net: PhaseNet, p: StitchPlan, batch: int) -> None:
        self.net, self.plan, self.batch = net, p, batch
        self.by_index = {s.index: s for s in p.sites}
        self.template: Any = None
        self.out: list[Tensor | None] = []

    def _offsets(self, codes: Tensor, leaf_sites: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """Rows to keep (phase 0 at the stitched sites the leaf does not depend on) and their fine offsets."""
        keep = torch.ones(codes.shape[0], dtype=torch.bool, device=codes.device)
        oy = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        ox = torch.zeros_like(oy)
        sy = sx = 1
        for col, s in enumerate(self.plan.sites):
            flat = codes[:, col]
            if s.index not in leaf_sites:
                keep &= flat == 0
                continue
            oy += (flat // s.factor[1]) * sy
            ox += (flat % s.factor[1]) * sx
            sy, sx = sy * s.factor[0], sx * s.factor[1]
        return keep, oy, ox, sy, sx

    def write(self, out: Any, images: Tensor, codes: Tensor) -> None:
        leaves = _leaves(out)
        if self.template is None:
            self.template = out
            self.out = [None] * len(leaves)
        if len(leaves) != len(self.plan.leaves):
            raise ModelError(f"the model's output has {len(leaves)} leaves, its graph {len(self.plan.leaves)}")
        for k, (leaf, leaf_sites) in enumerate(zip(leaves, self.plan.leaves)):
            if not isinstance(leaf, Tensor):
                if leaf_sites:
                    raise ModelError(f"output leaf {k} depends on a stitched site but is a {type(leaf).__name__}")
                self.out[k] = leaf
                continue
            keep, oy, ox, ry, rx = self._offsets(codes, leaf_sites)
            if not bool(keep.any()):
                continue
            rows = keep.nonzero().squeeze(1)
            values = leaf.index_select(0, rows)
            n, oy, ox = images[rows], oy[rows], ox[rows]
            if not leaf_sites:  # not stitched: the default state's value, as it is
                if self.out[k] is None:
                    self.out[k] = leaf.new_empty((self.batch, *leaf.shape[1:]))
                self.out[k][n] = values
                continue
            if leaf.dim() < 3:
                raise ModelError(f"output leaf {k} of shape {tuple(leaf.shape)} has no spatial map to stitch")
            h, w = leaf.shape[-2:]
            if self.out[k] is None:
                self.out[k] = leaf.new_empty((self.batch, *leaf.shape[1:-2], h * ry, w * rx))
            target = self.out[k]
            grid = target.view(self.batch, -1, h, ry, w, rx).permute(0, 3, 5, 1, 2, 4)
            grid[n, oy, ox] = values.reshape(values.shape[0], -1, h, w)

    def result(self) -> Any:
        return _rebuild(self.template, self.out)


def _combos(net: PhaseNet, site_ids: Sequence[int], device: torch.device) -> Tensor:
    """All phase combinations of some sites, ``(count, len(site_ids))`` flat indices, last site fastest."""
    ranges = [range(net.sites[i].num_phases) for i in site_ids]
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.long, device=device).reshape(-1, len(ranges))


def _phase_list(net: PhaseNet, p: StitchPlan, codes: Tensor, upto: int) -> list[Any]:
    """PhaseNet's per-site phase entries for rows whose stitched-site phases are ``codes[:, :upto]``."""
    phases: list[Any] = [None] * len(net.sites)
    for col, s in enumerate(p.sites[:upto]):
        phases[s.index] = codes[:, col]
    return phases


def _run(net: PhaseNet, p: StitchPlan, values: tuple[Tensor, ...], images: Tensor, chunk: int | None,
         sink: Callable[[Any, Tensor, Tensor], None]) -> None:
    """Runs every state from the first stage's entry values, depth first, at most ``chunk`` states at a time."""
    device = images.device

    def descend(stage: int, vals: tuple[Tensor, ...], imgs: Tensor, codes: Tensor) -> None:
        seg, site_ids = p.stages[stage]
        combos = _combos(net, site_ids, device)
        count = combos.shape[0]
        rows = imgs.shape[0] * count
        done = codes.shape[1]
        step = rows if chunk is None else max(1, chunk)
        stop = p.stages[stage + 1][0] if stage + 1 < len(p.stages) else None
        for lo in range(0, rows, step):
            idx = torch.arange(lo, min(rows, lo + step), device=device)
            parent, combo = idx // count, idx % count
            v = tuple(t.index_select(0, parent) for t in vals)
            c = torch.cat([codes.index_select(0, parent), combos.index_select(0, combo)], dim=1)
            out, _ = net.run_from(seg, v, _phase_list(net, p, c, done + len(site_ids)), stop=stop)
            if stop is None:
                sink(out, imgs.index_select(0, parent), c)
            else:
                descend(stage + 1, tuple(out), imgs.index_select(0, parent), c)

    descend(0, values, images, torch.zeros(images.shape[0], 0, dtype=torch.long, device=device))


def _check_chunk(chunk: int | None) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ArgumentError(f"chunk must be a positive number of states run at once, got {chunk!r}")


def stitch(net: PhaseNet, x: Tensor, sites: Sequence[str | int | Site] | str | int | Site, *,
           chunk: int | None = None) -> Any:
    """The model's output at every phase combination of ``sites``, interleaved to the finer grid.

    Equals the output of the network with those sites' strides removed and every later op dilated (see the module
    docstring for the rules and the size rule). The part before the first stitched site runs once.

    Args:
        net: The model.
        x: Input batch.
        sites: The sites to stitch (names, indices or records); a suffix of the model's strided sites.
        chunk: Most phase states run at once (default: all of a stage's states in one batch). Each chunk's outputs
            are written into the preallocated result, so memory stays bounded by ``chunk``.

    Returns:
        The model's output structure (tensor, dict, list or tuple) with every leaf that depends on a stitched site
        interleaved; a leaf that depends on only some of them is interleaved over those; one that depends on none
        is returned as the model computes it.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, ..., R_h h, R_w w)`` for an output leaf of ``(N, ..., h, w)``, ``(R_h, R_w)`` the product
          of the stitched sites' factors (:attr:`StitchPlan.factor`).

    Raises:
        ArgumentError: unknown sites, a set that is not a suffix, a bad ``chunk``.
        ModelError: an op after the first stitched site that sees the whole map (named).

    Example:
        >>> import torchvision  # doctest: +SKIP
        >>> from torchvision.models._utils import IntermediateLayerGetter  # doctest: +SKIP
        >>> body = IntermediateLayerGetter(torchvision.models.resnet50(), {"layer4": "out"}).eval()  # doctest: +SKIP
        >>> net = PhaseNet(body, input_size=(3, 64, 64))  # doctest: +SKIP
        >>> net.stitch(torch.randn(1, 3, 64, 64), sites=["layer3.0", "layer4.0"])["out"].shape  # doctest: +SKIP
        torch.Size([1, 2048, 8, 8])
    """
    _check_chunk(chunk)
    x = net.check_input(x)
    p = plan(net, sites)
    first = p.stages[0][0]
    values = net.run_to(x, first, [None] * len(net.sites))
    images = torch.arange(x.shape[0], device=x.device)
    writer = _Writer(net, p, x.shape[0])
    _run(net, p, tuple(values), images, chunk, writer.write)
    return writer.result()
