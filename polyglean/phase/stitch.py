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
  Stitch a model truncated before it (its backbone's final feature map) instead, or build the à trous network
  (:func:`polyglean.phase.atrous.atrous`), which takes such an op over the finer map (a different network).
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
    "receptive_halo",
    "plan",
    "stitch",
    "stitch_masked",
    "stitch_strides",
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
    """``template``'s structure with its leaves replaced, in :func:`_leaves` order."""
    it = iter(leaves)

    def build(v: Any) -> Any:
        if isinstance(v, dict):
            return type(v)((k, build(x)) for k, x in v.items())
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


def _check_merges(net: PhaseNet, deps: dict[fx.Node, frozenset[int]]) -> None:
    """Refuses maps that meet (add, concat) on different grids: one branch past a stitched site, one not."""
    info = net.discovery.info
    for n in net.discovery.graph_module.graph.nodes:
        if n.op == "output":  # outputs are stitched leaf by leaf
            continue
        maps = [a for a in n.all_input_nodes
                if a in info and info[a].is_tensor and info[a].shape is not None and len(info[a].shape) == 4
                and info[a].shape[-1] * info[a].shape[-2] > 1]
        if len({deps[a] for a in maps}) > 1:
            names = {a.name: sorted(net.sites[i].name for i in deps[a]) for a in maps}
            raise ArgumentError(
                f"maps meeting at node '{n.name}' come through different stitched sites ({names}): they would lie "
                "on different grids. Stitch the sites of every branch that meets there, or only later sites"
            )


def _below(net: PhaseNet) -> dict[int, frozenset[int]]:
    """For every site (by index), the sites upstream of any of its ops in the dataflow."""
    upstream = _graph_deps(net, {s.index for s in net.sites})
    below: dict[int, frozenset[int]] = {s.index: frozenset() for s in net.sites}
    for n, (_, idx) in net.discovery.ops.items():
        below[idx] = below[idx] | (upstream[n] - {idx})
    return below


def plan(net: PhaseNet, sites: Sequence[str | int | Site] | str | int | Site, *, for_atrous: bool = False) -> StitchPlan:
    """Checks that ``sites`` can be stitched and works out how.

    Args:
        net: The model.
        sites: Site names, indices or :class:`Site` records (one, or a sequence).
        for_atrous: Skip the checks that only interleaving needs (an op after the sites that sees the whole map;
            maps meeting from different sites), for the à trous rewrite (:func:`polyglean.phase.atrous.atrous`),
            which takes global ops over the finer map and checks the rewritten model's shapes itself.

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
    below = _below(net)
    for a in chosen:
        for s in all_sites:
            if a in below[s.index] and s.index not in chosen and s.num_phases > 1:
                raise ArgumentError(
                    f"site '{s.name}' lies after the stitched site '{all_sites[a].name}' and keeps its stride "
                    f"{s.factor}: the stitched output would sample the finer grid unevenly. Stitch it as well "
                    f"(sites={[all_sites[i].name for i in sorted(chosen + [s.index])]})"
                )
    chosen.sort(key=lambda i: (len(below[i]), i))  # dataflow order: the first stitched site is upstream
    picked = tuple(all_sites[i] for i in chosen)
    deps = _graph_deps(net, set(chosen))
    if not for_atrous:
        _check_local(net, deps, picked[0])
        _check_merges(net, deps)
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


# ------------------------------------------------------------------------------------------ content-adaptive
_KERNEL_FUNCTIONS = {F.conv1d, F.conv2d, F.conv_transpose2d, F.max_pool2d, F.avg_pool2d, F.lp_pool2d,
                     torch.conv2d, torch.max_pool2d}


def receptive_halo(net: PhaseNet, p: StitchPlan) -> tuple[int, int]:
    """How far (in pixels of the first stitched stage's entry map) an output cell's receptive field reaches.

    An upper bound: the reach of every spatial op after the entry, each times the reduction before it, summed (as
    if all lay on one path).

    Raises:
        ArgumentError: a spatial op whose reach cannot be read (a functional conv or pool, an opaque module that is
            not part of torch.nn); pass ``halo=`` to :func:`stitch_masked` instead.
    """
    gm = net.discovery.graph_module
    ops = net.discovery.ops
    start = net.segments[p.stages[0][0]].start
    chosen = {s.index for s in p.sites}
    deps = _graph_deps(net, chosen)
    factors = {s.index: s.factor for s in p.sites}
    reach = [0, 0]
    for pos, n in enumerate(gm.graph.nodes):
        if pos < start:
            continue
        module: Any = None
        if n.op == "call_module":
            module = gm.get_submodule(str(n.target))
        elif n.op == "call_function":
            try:
                kernel_fn = n.target in _KERNEL_FUNCTIONS
            except TypeError:
                kernel_fn = False
            if n.target in (F.conv2d, torch.conv2d) and n not in ops:
                module = _FunctionalConv(n, net.discovery.info)
            elif kernel_fn and n not in ops:
                raise ArgumentError(
                    f"cannot read the receptive field of '{n.name}' ({getattr(n.target, '__name__', n.target)}); "
                    "pass halo=(h, w) in entry-map pixels"
                )
        if n in ops:
            op = ops[n][0]
            module = getattr(op, "module", module)
            if module is None:
                raise ArgumentError(f"cannot read the receptive field of site op '{op.name}'; pass halo=(h, w)")
        if module is None:
            continue
        kernel = getattr(module, "kernel_size", None)
        if kernel is None:
            pointwise = isinstance(module, nn.modules.batchnorm._BatchNorm)  # e.g. timm's BatchNormAct2d
            if not pointwise and not type(module).__module__.startswith("torch.nn"):
                raise ArgumentError(
                    f"cannot read the receptive field of layer '{n.target}' ({type(module).__name__}); "
                    "pass halo=(h, w) in entry-map pixels"
                )
            continue
        (kh, kw), (dh, dw) = _pair(kernel), _pair(getattr(module, "dilation", 1))
        ey, ex = (kh - 1) * dh, (kw - 1) * dw
        pad = getattr(module, "padding", 0)
        ph, pw = (ey, ex) if isinstance(pad, str) else _pair(pad)  # "same"/"valid": the whole extent, to be safe
        upstream = deps[n] - ({ops[n][1]} if n in ops else set())
        sy = math.prod(factors[i][0] for i in upstream)
        sx = math.prod(factors[i][1] for i in upstream)
        reach[0] += max(ph, ey - ph) * sy
        reach[1] += max(pw, ex - pw) * sx
    return (reach[0], reach[1])


class _FunctionalConv:
    """Kernel, dilation and padding of a functional ``conv2d`` node, read from its recorded weight shape."""

    def __init__(self, n: fx.Node, info: dict[fx.Node, Any]) -> None:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, n.args)) | dict(n.kwargs)
        weight = bound.get("weight")
        shape = info[weight].shape if isinstance(weight, fx.Node) and weight in info else None
        if shape is None or len(shape) != 4:
            raise ArgumentError(f"cannot read the kernel of '{n.name}' (conv2d); pass halo=(h, w) in entry-map pixels")
        self.kernel_size = tuple(shape[-2:])
        self.padding = bound.get("padding", 0)
        self.dilation = bound.get("dilation", 1)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def edge_mask(plain: Tensor, factor: tuple[int, int], width: int) -> Tensor:
    """Class boundaries of a coarse prediction, on the finer grid, dilated by ``width`` fine cells.

    Args:
        plain: Class scores of the plain model.
        factor: ``(R_h, R_w)``: how much finer the stitched grid is.
        width: Trimap width: cells within this many (Chebyshev distance) of a boundary are in the mask.

    Shape:
        - plain: ``(N, K, h, w)``
        - output: ``(N, R_h h, R_w w)``, bool.
    """
    if plain.dim() != 4:
        raise ArgumentError(f"edge_mask needs class scores (N, K, h, w), got shape {tuple(plain.shape)}")
    if width < 0:
        raise ArgumentError(f"trimap width must be >= 0, got {width}")
    labels = plain.argmax(1).repeat_interleave(factor[0], 1).repeat_interleave(factor[1], 2)
    edge = torch.zeros_like(labels, dtype=torch.bool)
    dy = labels[:, 1:, :] != labels[:, :-1, :]
    dx = labels[:, :, 1:] != labels[:, :, :-1]
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    if width > 0:
        edge = F.max_pool2d(edge[:, None].to(plain.dtype), 2 * width + 1, 1, width)[:, 0] > 0
    return edge


def uncertain_mask(plain: Tensor, factor: tuple[int, int], threshold: float) -> Tensor:
    """Cells whose plain prediction has a top softmax probability below ``threshold``, on the finer grid.

    Shape:
        - plain: ``(N, K, h, w)``
        - output: ``(N, R_h h, R_w w)``, bool.
    """
    if plain.dim() != 4:
        raise ArgumentError(f"uncertain_mask needs class scores (N, K, h, w), got shape {tuple(plain.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ArgumentError(f"confidence threshold must be in [0, 1], got {threshold}")
    low = plain.softmax(1).amax(1) < threshold
    return low.repeat_interleave(factor[0], 1).repeat_interleave(factor[1], 2)


@dataclass
class MaskedStitch:
    """What :func:`stitch_masked` returns.

    Attributes:
        output: The model's output structure; each stitched leaf is the full stitching inside ``mask`` and the
            plain output repeated ``R_h x R_w`` (nearest) outside it.
        mask: Where the extra phases were used, ``(N, R_h h, R_w w)`` bool.
        tiles: Number of tiles computed.
        computed: Share of the entry map's area that the tiles' crops (halos included) ran on, summed over tiles
            (1.0 = as much as one full stitching; can exceed 1 when many halos overlap).
        halo: The halo used, in entry-map pixels.
        tile: The tile size used, in cells of the finer grid.
    """

    output: Any
    mask: Tensor
    tiles: int
    computed: float
    halo: tuple[int, int]
    tile: tuple[int, int]


def stitch_masked(net: PhaseNet, x: Tensor, sites: Sequence[str | int | Site] | str | int | Site,
                  mask: Tensor | Callable[[Any], Tensor], *, tile: int | tuple[int, int] | str = "auto",
                  halo: tuple[int, int] | int | None = None, chunk: int | None = None) -> MaskedStitch:
    """Stitching computed only where ``mask`` says: the cost falls with the mask's area.

    The plain model runs once (sharing everything before the first stitched site). The finer grid is cut into
    tiles; every tile that holds a masked cell runs all phase states on a crop of the entry map that covers the
    tile plus ``halo`` (the receptive field it needs, rounded out to the stride), so inside the mask the result
    equals :func:`stitch`. Outside it the plain output is kept, repeated (nearest) to the finer grid.

    Args:
        net: The model.
        x: Input batch.
        sites: The sites to stitch (as for :func:`stitch`).
        mask: A bool tensor on the finer grid, or a function of the plain output that returns one (e.g.
            ``lambda out: edge_mask(out, factor, 2)``; see :func:`edge_mask`, :func:`uncertain_mask`).
        tile: Tile size in cells of the finer grid, or ``"auto"``: of the sizes ``max(R) · 2^k`` (up to the whole
            map, i.e. one crop per image), the one whose crops cover the least area for this mask.
        halo: Receptive-field reach in entry-map pixels (default: :func:`receptive_halo`, an upper bound).
        chunk: Most states run at once within one group of tiles.

    Shape:
        - x: ``(N, C, H, W)``
        - mask: ``(N, R_h h, R_w w)`` for a coarse output of ``(h, w)``.

    Raises:
        ArgumentError: bad sites, tile, halo or mask; an entry that is not one map of the site's input size; an
            output leaf that depends on only some of the stitched sites.
    """
    _check_chunk(chunk)
    x = net.check_input(x)
    p = plan(net, sites)
    if tile != "auto":
        ty, tx = _pair(tile)
        if ty < 1 or tx < 1:
            raise ArgumentError(f"tile must be positive or 'auto', got {tile!r}")
    all_ids = tuple(s.index for s in p.sites)
    if any(leaf and leaf != all_ids for leaf in p.leaves):
        raise ArgumentError("masked stitching needs every stitched output leaf to depend on all stitched sites")
    reach = _pair(halo) if halo is not None else receptive_halo(net, p)
    if reach[0] < 0 or reach[1] < 0:
        raise ArgumentError(f"halo must be >= 0, got {halo!r}")
    ry, rx = p.factor
    first = p.stages[0][0]
    n_img = x.shape[0]
    values = tuple(net.run_to(x, first, [None] * len(net.sites)))
    if not values or any(not isinstance(v, Tensor) or v.dim() != 4 or v.shape[-2:] != values[0].shape[-2:]
                         for v in values):
        raise ArgumentError(
            f"masked stitching crops the maps live at site '{p.sites[0].name}''s entry, but they are not maps of "
            f"one size ({[tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in values]})"
        )
    he, we = values[0].shape[-2:]
    plain, _ = net.run_from(first, values, [None] * len(net.sites))
    m = mask(plain) if callable(mask) else mask
    leaves = _leaves(plain)
    spatial = [k for k, leaf in enumerate(p.leaves) if leaf]
    if not spatial:
        raise ArgumentError("no output leaf depends on the stitched sites")
    h, w = leaves[spatial[0]].shape[-2:]
    if not isinstance(m, Tensor) or m.shape != (n_img, h * ry, w * rx):
        got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ArgumentError(f"mask must be a bool tensor of shape {(n_img, h * ry, w * rx)}, got {got}")
    m = m.to(device=x.device, dtype=torch.bool)
    if abs(h * ry - he) >= ry or abs(w * rx - we) >= rx:
        raise ArgumentError(
            f"masked stitching needs the entry map of site '{p.sites[0].name}' ({he}x{we}) at the finer grid's "
            f"scale ({h * ry}x{w * rx}); a site between them keeps its stride"
        )
    out_leaves: list[Any] = []
    for k, leaf in enumerate(leaves):
        if k in spatial:
            out_leaves.append(leaf.repeat_interleave(ry, -2).repeat_interleave(rx, -1))
        else:
            out_leaves.append(leaf)
    fine_h, fine_w = h * ry, w * rx
    if tile == "auto":
        candidates = []
        t = max(ry, rx)
        while True:
            candidates.append((min(t - t % ry, fine_h), min(t - t % rx, fine_w)))
            if t >= max(fine_h, fine_w):
                break
            t *= 2
        # least crop area; among equals the larger tile (fewer, bigger batches)
        tile_hw = min(candidates, key=lambda c: (_tiles(m, c, reach, (ry, rx), (he, we))[1], -c[0] * c[1]))
    else:
        tile_hw = (ty, tx)
    groups, area, count = _tiles(m, tile_hw, reach, (ry, rx), (he, we))
    for (ch, cw), members in groups.items():
        crops = tuple(
            torch.stack([v[n, :, ly:ly + ch, lx:lx + cw] for n, _, _, _, _, ly, lx in members]) for v in values
        )
        writer = _Writer(net, p, len(members))
        _run(net, p, crops, torch.arange(len(members), device=x.device), chunk, writer.write)
        stitched = _leaves(writer.result())
        for g, (n, y0, y1, x0, x1, ly, lx) in enumerate(members):
            sel = m[n, y0:y1, x0:x1]
            for k in spatial:
                src = stitched[k][g, ..., y0 - ly:y1 - ly, x0 - lx:x1 - lx]
                dst = out_leaves[k][n, ..., y0:y1, x0:x1]
                dst.copy_(torch.where(sel, src, dst))
    return MaskedStitch(_rebuild(plain, out_leaves), m, count, area / float(n_img * he * we), reach, tile_hw)


def _tiles(m: Tensor, tile: tuple[int, int], reach: tuple[int, int], factor: tuple[int, int],
           entry: tuple[int, int]) -> tuple[dict[tuple[int, int], list[tuple[int, ...]]], int, int]:
    """The tiles holding a masked cell, with their entry-map crops (aligned to the stride), grouped by crop size;
    the crops' summed area; their count."""
    (ty, tx), (ry, rx), (he, we) = tile, factor, entry
    n_img, fine_h, fine_w = m.shape
    gh, gw = -(-fine_h // ty), -(-fine_w // tx)
    padded = F.pad(m.float(), (0, gw * tx - fine_w, 0, gh * ty - fine_h))
    active = padded.reshape(n_img, gh, ty, gw, tx).amax((2, 4)) > 0
    groups: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    area = 0
    for n, iy, ix in active.nonzero().tolist():
        y0, x0 = iy * ty, ix * tx
        y1, x1 = min(fine_h, y0 + ty), min(fine_w, x0 + tx)
        ly = max(0, (y0 - reach[0]) // ry * ry)
        lx = max(0, (x0 - reach[1]) // rx * rx)
        hy = min(he, -(-(y1 + reach[0]) // ry) * ry)
        hx = min(we, -(-(x1 + reach[1]) // rx) * rx)
        groups.setdefault((hy - ly, hx - lx), []).append((n, y0, y1, x0, x1, ly, lx))
        area += (hy - ly) * (hx - lx)
    return groups, area, int(active.sum())


def stitch_strides(net: PhaseNet) -> list[tuple[int, int] | None]:
    """Per site, the output stride that stitching from it (it and every later site) gives; ``None`` where the
    model cannot be stitched from there (a global op after it)."""
    strides: list[tuple[int, int] | None] = []
    below = _below(net)
    for s in net.sites:
        try:
            plan(net, [s] + [t for t in net.sites if s.index in below[t.index]])
        except (ArgumentError, ModelError):
            strides.append(None)
            continue
        # every later site is stitched too: the finer map keeps the stride of the site's input (a side branch that
        # subsamples the image beside the main path, as CGNet's and ESPNet's image projections do, does not count)
        strides.append((s.reduction[0] // s.factor[0], s.reduction[1] // s.factor[1]))
    return strides
