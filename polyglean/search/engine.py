"""Greedy best-first phase search with shared prefixes, batched over images, and aggregation of its candidates.

Per image, the candidates start as the default state. A node is a state whose first ``d`` searched sites are fixed
(the rest at phase 0). The best-scored node with ``d < M`` is expanded: its ``R² - 1`` children that differ at
searched site ``d`` are evaluated (a forward from that site on, reusing the node's cached activations) and become
candidates; the node itself now counts as fixed up to ``d + 1``. The search stops at ``budget`` candidates.

All images advance in lock step; the children of every image are run as one batch that enters the network at the
segment of the site where they differ (rows that start later join the batch there), so each segment runs once per
step. Because a search with a larger budget makes exactly the same steps first, one search to the largest budget
gives every smaller budget too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from polyglean.aggregate import AGGREGATORS, Aggregator
from polyglean.errors import ModelError
from polyglean.aggregate import align as align_features
from polyglean.errors import ArgumentError
from polyglean.phase.net import PhaseNet
from polyglean.search.criteria import CRITERIA, Criterion
from polyglean.search.stop import StopRule, parse_stop
from polyglean.sites import Site

__all__ = ["PhaseSearch", "SearchResult", "default_search_space"]


@dataclass
class SearchResult:
    """What one search over a batch produced.

    Attributes:
        logits: ``{budget: (N, K)}`` aggregated predictions per requested budget.
        states: ``(N, B, L)`` flat phase indices of every candidate, in the order they were added.
        scores: ``(N, B)`` the criterion's scores of the candidates.
        shift: ``(N, B, 2)`` their displacements ``(Δy, Δx)``.
        candidate_logits: ``(N, B, K)`` each candidate's own prediction.
        states_evaluated: new states evaluated (all images; the default state is not counted).
        flops: FLOPs executed, search and aggregation.
        forward_flops: FLOPs of one plain forward of the batch.
    """

    logits: dict[int, Tensor]
    states: Tensor
    scores: Tensor
    shift: Tensor
    candidate_logits: Tensor
    states_evaluated: int
    flops: float
    forward_flops: float
    flops_by_budget: dict[int, float] = field(default_factory=dict)
    seconds_by_budget: dict[int, float] = field(default_factory=dict)
    features: Tensor | None = None  # (N, B, ...) final feature maps, unaligned (feature aggregation only)
    counts: Tensor | None = None  # (N,) candidates each image got, when a stop rule ended some searches early
    image_flops_by_budget: dict[int, Tensor] = field(default_factory=dict)  # (N,) FLOPs of each image's search

    def budget_used(self, budget: int) -> Tensor:
        """``(N,)`` candidates aggregated per image at ``budget`` (fewer where a stop rule ended the search)."""
        full = torch.full((self.states.shape[0],), budget, dtype=torch.long, device="cpu")
        return full if self.counts is None else torch.minimum(full, self.counts.cpu())

    @property
    def forward_equivalents(self) -> float:
        """FLOPs executed over those of one plain forward."""
        return self.flops / self.forward_flops if self.forward_flops else float("nan")

    def forward_equivalents_at(self, budget: int) -> float:
        """What a search stopping at ``budget`` costs, in plain forwards (FLOPs)."""
        return self.flops_by_budget[budget] / self.forward_flops


@dataclass
class _Candidate:
    state: tuple[int, ...]
    depth: int
    score: float
    logits: Tensor
    cache: dict[int, tuple[Tensor, ...]]
    features: Tensor | None = None
    cost: float = 0.0  # FLOPs spent evaluating this candidate
    aligned: Tensor | None = None  # features on the default grid, kept for a criterion that reads features


def _resolve(registry: Any, value: Any, base: type) -> Any:
    if isinstance(value, str):
        kind = registry.get(value)
        if getattr(kind, "requires_training", False):
            raise ArgumentError(
                f"the {value!r} {registry.kind} is a trained module: pass it as an object, e.g. "
                "polyglean.load_aggregator(PATH) (train one with `polyglean train-aggregator`)")
        return kind()
    if isinstance(value, base):
        return value
    raise TypeError(f"expected a name ({', '.join(registry.names())}) or a {base.__name__}, got {value!r}")


def default_search_space(net: PhaseNet) -> list[Site]:
    """The sites searched by default: every site on the main path but the first and the last, or all of them when
    that leaves none (see :class:`PhaseSearch`).

    Raises:
        ModelError: no site lies on the main path (the branches subsample in parallel).
    """
    main = net.main_sites
    if not main:
        raise ModelError(
            f"no subsampling site of {type(net.model).__name__} lies on its main path (its branches subsample in "
            f"parallel: {', '.join(f'{s.name} {s.factor}' for s in net.sites)}), so there is no default search "
            "space nor a common grid to align; name the sites to search (search_space=...) and "
            "aggregate_on='logits'")
    return main[1:-1] if len(main) > 2 else main


class PhaseSearch:
    """The paper's test-time method: search phase states greedily per image and aggregate them.

    Args:
        net: The :class:`PhaseNet` of a classifier.
        budget: Number of distinct states aggregated, ``B >= 1``; ``B = 1`` is the plain model, bit for bit.
        criterion: Search order: ``entropy``, ``random``, ``delta``, ``learned`` (needs a learned aggregator),
            or a :class:`Criterion`.
        aggregate: ``mean`` or ``entropy``, or an :class:`Aggregator` object such as a trained
            :class:`~polyglean.aggregate.learned.AttentionAggregator` (:func:`~polyglean.load_aggregator`).
        align: Align the candidates' final feature maps onto the default grid before aggregating them.
        search_space: Sites to search (names or indices). Default: every site on the main path (``Site.main_path``)
            but the first and the last, or all of them when that leaves none; sites off the main path (attention's
            spatial reduction, auxiliary branches) are searched only when named.
        phase_stride: Search a sub-grid of phases: at a site whose factor exceeds ``phase_stride`` along a
            dimension, only phases that are multiples of it there (a 16x16 ViT patch embedding with 4: 16 of its
            256 phases); sites with smaller factors keep all theirs. Default 1: every phase.
        aggregate_on: ``"features"`` (final feature maps, then the head) or ``"logits"``.
        seed: Seed of the random criterion.
        stop: An adaptive budget: a :class:`~polyglean.search.stop.StopRule` or its text (``confidence:0.9``,
            ``entropy:0.2``, ``stable:2``, joined with ``+``). Images it stops leave the batch; an image stopped
            at B = 1 gets the plain prediction bit for bit.

    Example:
        >>> search = PhaseSearch(PhaseNet(model, (3, 224, 224)), budget=15)  # doctest: +SKIP
        >>> logits = search(x)  # doctest: +SKIP
    """

    def __init__(
        self,
        net: PhaseNet,
        budget: int = 15,
        criterion: str | Criterion = "entropy",
        aggregate: str | Aggregator = "entropy",
        align: bool = True,
        search_space: Sequence[str | int] | None = None,
        aggregate_on: str = "features",
        seed: int = 0,
        phase_stride: int = 1,
        stop: str | StopRule | None = None,
    ) -> None:
        if not isinstance(net, PhaseNet):
            raise TypeError(f"net must be a PhaseNet, got {type(net).__name__}")
        if not net.sites:
            raise ArgumentError(f"{type(net.model).__name__} has no subsampling sites: there are no phases to search")
        self.net = net
        self.criterion = _resolve(CRITERIA, criterion, Criterion)
        self.aggregator = _resolve(AGGREGATORS, aggregate, Aggregator)
        if aggregate_on not in ("features", "logits"):
            raise ArgumentError(f"aggregate_on must be 'features' or 'logits', got {aggregate_on!r}")
        if aggregate_on == "features" and net.head_segment is None:
            if search_space is None:
                self._space(None)  # a model with no site on its main path: that refusal comes first, naming them
            net.head(torch.empty(0))  # raises the explanatory error
        self.aggregate_on = aggregate_on
        self.align = bool(align) and aggregate_on == "features"
        self.seed = seed
        if isinstance(phase_stride, bool) or not isinstance(phase_stride, int) or phase_stride < 1:
            raise ArgumentError(f"phase_stride must be an int >= 1, got {phase_stride!r}")
        self.phase_stride = phase_stride
        self.stop = parse_stop(stop)
        if self.stop is not None and self.stop.watches_aggregate and aggregate_on != "features":
            raise ArgumentError("a stop rule that watches the aggregated prediction needs aggregate_on='features'")
        self.search_space = self._space(search_space)
        self._phases = {s.index: self._sub_grid(s) for s in self.search_space}
        if getattr(self.criterion, "needs_features", False):
            if aggregate_on != "features":
                raise ArgumentError(f"criterion {type(self.criterion).__name__} reads feature maps; it needs "
                                 "aggregate_on='features'")
            if getattr(self.criterion, "module", False) is None:
                if not hasattr(self.aggregator, "attend"):
                    raise ArgumentError("criterion 'learned' ranks candidates by the attention of the learned "
                                     "aggregator: use it with a learned aggregator (aggregate=load_aggregator(...))")
                self.criterion.module = self.aggregator
        self.num_states = math.prod(len(self._phases[s.index]) for s in self.search_space)
        self.budget = self._check_budget(budget)

    def _space(self, search_space: Sequence[str | int] | None) -> list[Site]:
        if search_space is None:
            chosen = default_search_space(self.net)
        else:
            if isinstance(search_space, (str, int)):
                search_space = [search_space]
            chosen = [self.net.site(k) for k in search_space]
            if not chosen:
                raise ArgumentError("the search space is empty; name at least one site")
        chosen = sorted({s.index: s for s in chosen}.values(), key=lambda s: s.index)
        return chosen

    def _sub_grid(self, site: Site) -> list[int]:
        """Flat indices of the phases searched at ``site`` (the sub-grid of ``phase_stride``), default first."""
        step = [self.phase_stride if r > self.phase_stride else 1 for r in site.factor]
        return [dy * site.factor[1] + dx for dy in range(0, site.factor[0], step[0])
                for dx in range(0, site.factor[1], step[1])]

    def _check_budget(self, budget: int) -> int:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"budget must be an int, got {budget!r}")
        if not 1 <= budget <= self.num_states:
            raise ArgumentError(
                f"budget {budget} out of range: the search space {[s.name for s in self.search_space]} has "
                f"{self.num_states} states, so 1 <= budget <= {self.num_states}"
            )
        return budget

    def __call__(self, x: Tensor) -> Tensor:
        """Aggregated logits ``(N, K)`` at ``self.budget``."""
        return self.run(x).logits[self.budget]

    # ------------------------------------------------------------------------------------------------ the search
    @torch.no_grad()
    def run(self, x: Tensor, budgets: Iterable[int] | None = None) -> SearchResult:
        """Searches every image of ``x`` up to the largest budget and aggregates at each budget.

        Args:
            x: Input batch ``(N, C, H, W)``.
            budgets: Budgets to aggregate at (default: ``self.budget``); each ``<= self.budget``... or up to the
                number of states; the search runs to the largest.
        """
        net = self.net
        x = net.check_input(x)
        started = time.perf_counter()
        wanted = sorted({self._check_budget(b) for b in (budgets or [self.budget])})
        top = wanted[-1]
        n = x.shape[0]
        if n == 0:
            raise ArgumentError("the batch is empty (0 images): there is nothing to search")
        sites = net.sites
        space = [s.index for s in self.search_space]
        entry = [net.entry_segment(k) for k in space]
        seg_flops = net.segment_flops()
        stop = net.head_segment if self.aggregate_on == "features" else None
        # The random criterion draws on the CPU whatever the device, so it picks the same states everywhere.
        generator = torch.Generator().manual_seed(self.seed)
        flops = 0.0

        # The default state, kept at the entry of every searched site.
        none: list[Any] = [None] * len(sites)
        out, kept = net.run_from(0, (x,), none, stop=stop, keep=set(entry))
        flops += n * sum(seg_flops[: stop if stop is not None else len(seg_flops)])
        root_logits, root_features = self._finish(out)
        if root_features is not None:
            flops += n * seg_flops[net.head_segment]
        zero = tuple([0] * len(sites))
        root_shift = torch.zeros(n, 2, dtype=torch.long, device=x.device)
        root_scores = self.criterion.score(root_logits, root_shift, generator)
        root_scores = root_scores.tolist()
        cands: list[list[_Candidate]] = [
            [_Candidate(zero, 0, root_scores[i], root_logits[i],
                        {seg: tuple(v[i:i + 1] for v in vals) for seg, vals in kept.items()},
                        None if root_features is None else root_features[i:i + 1])]
            for i in range(n)
        ]
        evaluated = 0
        seconds: dict[int, float] = {}
        halted = [False] * n
        if self.stop is not None:
            self.stop.reset(n)
            halted = self.stop.at_root(root_logits).tolist()
        while True:
            going = [len(pool) for pool, h in zip(cands, halted) if not h]
            fewest = min(going) if going else top
            for b in wanted:
                if b not in seconds and fewest >= b:
                    seconds[b] = time.perf_counter() - started
            requests = self._select(cands, top, space, entry, halted)
            if not requests:
                break
            new = self._evaluate(requests, entry, stop, seg_flops)
            flops += new["flops"]
            evaluated += len(new["rows"])
            shift = self._displacement(torch.tensor([r[1] for r in new["rows"]], device=x.device))
            scores = self.criterion.score(new["logits"], shift, generator).tolist()  # one device sync per step
            for row, (image, state, depth, cache) in enumerate(new["rows"]):
                cands[image].append(_Candidate(state, depth, scores[row], new["logits"][row], cache,
                                               None if new["features"] is None else new["features"][row:row + 1],
                                               new["costs"][row]))
            if self.criterion.rescore:
                self._rescore(cands, space[0], generator)
            if self.stop is not None and self.stop.watches_aggregate:
                self._watch(cands, sorted({r[0] for r in requests}), halted, space[0])
        for b in wanted:  # budgets no image still searching reached (every search stopped early)
            seconds.setdefault(b, time.perf_counter() - started)
        result = self._aggregate(cands, wanted, space[0], flops, evaluated, n, root_logits, seconds)
        return result

    def _displacement(self, states: Tensor) -> Tensor:
        """``(..., 2)`` displacements of flat phase states ``(..., L)`` (a dense search measures them in input
        pixels)."""
        return self.net.displacement(states, self.search_space[0].index)

    def _finish(self, out: Any) -> tuple[Tensor, Tensor | None]:
        """Logits (and the final feature maps) from a run that stopped before the head or ran to the output."""
        if self.aggregate_on == "features":
            features = out[0]
            return self._as_logits(self.net.head(features)), features
        return self._as_logits(out), None

    @staticmethod
    def _as_logits(out: Any) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ArgumentError(f"the search needs a classifier returning logits (N, K); the model returned {shape}")
        return out

    def _select(self, cands: list[list[_Candidate]], top: int, space: list[int], entry: list[int],
                halted: list[bool]) -> list[tuple[int, _Candidate, int, list[tuple[int, ...]]]]:
        """For each image still short of ``top`` candidates and not stopped: the node to expand and its children."""
        requests = []
        m = len(space)
        for image, pool in enumerate(cands):
            if len(pool) >= top or halted[image]:
                for c in pool if halted[image] else ():
                    c.cache.clear()  # a stopped image needs no activations any more
                continue
            open_nodes = [c for c in pool if c.depth < m]
            if not open_nodes:
                continue
            node = min(open_nodes, key=lambda c: c.score)  # ties: the earliest candidate
            k = node.depth
            site = self.net.sites[space[k]]
            count = min(len(self._phases[site.index]) - 1, top - len(pool))
            children = []
            for p in self._phases[site.index][1:count + 1]:
                state = list(node.state)
                state[space[k]] = p
                children.append(tuple(state))
            requests.append((image, node, k, children))
            node.depth = k + 1
            needed = {entry[j] for j in range(node.depth, m)}
            for seg in [s for s in node.cache if s not in needed and s != entry[k]]:
                del node.cache[seg]
        return requests

    def _evaluate(self, requests: list, entry: list[int], stop: int | None, seg_flops: list[int]) -> dict[str, Any]:
        """Runs all children of one step as a wavefront over the segments; returns their logits and caches."""
        net = self.net
        m = len(entry)
        rows: list[tuple[int, tuple[int, ...], int, dict[int, tuple[Tensor, ...]]]] = []
        starts: list[int] = []
        inputs: list[tuple[Tensor, ...]] = []
        for image, node, k, children in requests:
            start = entry[k]
            later = {entry[j] for j in range(k + 1, m)}
            for state in children:
                cache = {start: node.cache[start]} if start in later else {}
                rows.append((image, state, k + 1, cache))
                starts.append(start)
                inputs.append(node.cache[start])
        for image, node, k, _ in requests:  # the expanded node no longer needs its cache at this site
            if entry[k] not in {entry[j] for j in range(node.depth, m)}:
                node.cache.pop(entry[k], None)
        order = sorted(range(len(rows)), key=lambda r: starts[r])
        rows = [rows[r] for r in order]
        starts = [starts[r] for r in order]
        inputs = [inputs[r] for r in order]
        states = torch.tensor([r[1] for r in rows], device=inputs[0][0].device)
        needed = [{entry[j] for j in range(r[2], m)} for r in rows]
        last = stop if stop is not None else len(net.segments)
        flops = 0.0
        batch: tuple[Tensor, ...] | None = None
        joined = 0
        out: Any = None
        for seg in range(starts[0], last):
            fresh = [r for r in range(joined, len(rows)) if starts[r] == seg]
            if fresh:
                parts = [inputs[r] for r in fresh]
                new_vals = tuple(torch.cat([p[t] for p in parts]) for t in range(len(parts[0])))
                batch = new_vals if batch is None else tuple(torch.cat([a, b]) for a, b in zip(batch, new_vals))
                joined += len(fresh)
            phases = net.encode_phases(states[:joined], joined)
            out, _ = net.run_from(seg, batch, phases, stop=seg + 1)
            flops += joined * seg_flops[seg]
            if seg + 1 < last:
                batch = out
                for r in range(joined):
                    if seg + 1 in needed[r]:
                        rows[r][3][seg + 1] = tuple(v[r:r + 1] for v in out)
        assert joined == len(rows)
        logits, features = self._finish(out)
        head = seg_flops[net.head_segment] if features is not None else 0
        flops += len(rows) * head
        costs = [float(sum(seg_flops[start:last]) + head) for start in starts]
        return {"rows": rows, "logits": logits, "features": features, "flops": flops, "costs": costs}

    def _rescore(self, cands: list[list[_Candidate]], first: int, generator: torch.Generator) -> None:
        with_features = getattr(self.criterion, "needs_features", False)
        for pool in cands:
            logits = torch.stack([c.logits for c in pool])
            shift = self._displacement(torch.tensor([c.state for c in pool], device=logits.device))
            if with_features:
                for c, d in zip(pool, shift):
                    if c.aligned is None:
                        c.aligned = c.features
                        if self.align and bool(d.any()):
                            c.aligned = align_features(c.features, d[None], self.net.alignment_factor(first),
                                                       self.net.feature_dims)
                scores = self.criterion.score(logits, shift, generator,
                                              features=torch.cat([c.aligned for c in pool]))
            else:
                scores = self.criterion.score(logits, shift, generator)
            for c, s in zip(pool, scores.tolist()):
                c.score = s

    def _watch(self, cands: list[list[_Candidate]], images: list[int], halted: list[bool], first: int) -> None:
        """Asks the stop rule about each image that just grew, with its current aggregated prediction."""
        factor = self.net.alignment_factor(first)
        for image in images:
            pool = cands[image]
            shift = self._displacement(torch.tensor([c.state for c in pool], device=pool[0].logits.device))
            feats = torch.cat([c.features for c in pool])
            if self.align:
                feats = align_features(feats, shift, factor, self.net.feature_dims)
            logits = torch.stack([c.logits for c in pool])
            combined = self.aggregator.combine(feats[None], logits[None], shift[None])
            if self.stop.after_step(image, self._as_logits(self.net.head(combined))[0]):
                halted[image] = True

    # -------------------------------------------------------------------------------------------- aggregation
    def _aggregate(self, cands: list[list[_Candidate]], wanted: list[int], first: int, flops: float,
                   evaluated: int, n: int, root_logits: Tensor, seconds: dict[int, float]) -> SearchResult:
        """Aggregates at each budget; ``seconds[b]`` is when every image had ``b`` candidates (plus aggregation)."""
        net = self.net
        counts = [len(pool) for pool in cands]
        width = max(counts)
        if min(counts) < width:  # a stop rule ended some searches early: pad with copies of the default state
            cands = [pool + [pool[0]] * (width - len(pool)) for pool in cands]
        logits = torch.stack([torch.stack([c.logits for c in pool]) for pool in cands])
        states = torch.tensor([[c.state for c in pool] for pool in cands], device=logits.device)
        shift = self._displacement(states)
        scores = torch.tensor([[c.score for c in pool] for pool in cands], device=logits.device)
        seg_flops = net.segment_flops()
        forward = float(n * sum(seg_flops))
        feats = None
        if self.aggregate_on == "features":
            feats = torch.cat([torch.cat([c.features for c in pool]) for pool in cands])
            feats = feats.reshape(n, -1, *feats.shape[1:])
        result = SearchResult({}, states, scores, shift, logits, evaluated, flops, forward, {}, seconds, feats)
        if min(counts) < width:
            result.counts = torch.tensor(counts, device="cpu")
        head = seg_flops[net.head_segment] if feats is not None else 0
        for b in wanted:
            tick = time.perf_counter()
            result.logits[b] = self.combine(result, b) if b > 1 else root_logits
            # What a search stopping at b costs per image: the default forward (with the head run on the default
            # features), its first b - 1 children, and the head once more on the aggregate; an image that stopped
            # earlier costs only what it ran.
            used = result.budget_used(b).tolist()
            per_image = torch.tensor([float(sum(seg_flops)) if u == 1 else
                                      float(sum(seg_flops)) + 2 * head + sum(c.cost for c in pool[1:u])
                                      for pool, u in zip(cands, used)], dtype=torch.float64, device="cpu")
            result.image_flops_by_budget[b] = per_image
            result.flops_by_budget[b] = float(per_image.sum())
            result.flops += sum(head for u in used if u > 1)
            seconds[b] += time.perf_counter() - tick
        return result

    @torch.no_grad()
    def combine(self, result: SearchResult, budget: int, aggregate: str | Aggregator | None = None,
                align: bool | None = None) -> Tensor:
        """Aggregates the first ``budget`` candidates of ``result`` (another aggregator or alignment may be given,
        so that one search serves several aggregation variants)."""
        aggregator = self.aggregator if aggregate is None else _resolve(AGGREGATORS, aggregate, Aggregator)
        do_align = self.align if align is None else bool(align)
        if budget == 1:
            return result.candidate_logits[:, 0]
        if result.counts is not None and bool((result.counts < budget).any()):
            return self._combine_by_count(result, budget, aggregator, do_align)
        logits, shift = result.candidate_logits[:, :budget], result.shift[:, :budget]
        if result.features is None:
            return aggregator.combine(logits, logits, shift)
        feats = result.features[:, :budget]
        if do_align:
            first = self.search_space[0].index
            factor = self.net.alignment_factor(first)
            flat = align_features(feats.flatten(0, 1), shift.reshape(-1, 2), factor, self.net.feature_dims)
            feats = flat.reshape(feats.shape)
        return self._as_logits(self.net.head(aggregator.combine(feats, logits, shift)))


    def _combine_by_count(self, result: SearchResult, budget: int, aggregator: Aggregator, align: bool) -> Tensor:
        """:meth:`combine` where a stop rule left images with fewer candidates: each group aggregates its own."""
        used = result.budget_used(budget)
        out = None
        for u in sorted(set(used.tolist())):
            idx = (used == u).nonzero().flatten()
            part = SearchResult({}, result.states[idx], result.scores[idx], result.shift[idx],
                                result.candidate_logits[idx], 0, 0.0, 0.0,
                                features=None if result.features is None else result.features[idx])
            z = self.combine(part, u, aggregator, align)
            if out is None:
                out = z.new_empty(used.shape[0], *z.shape[1:])
            out[idx.to(out.device)] = z
        assert out is not None
        return out
