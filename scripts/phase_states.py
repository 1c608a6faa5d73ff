"""Every phase state of a search space, one at a time and in groups: where does the gain of the search come from?

Runs the exhaustive search (all states, random order) on a labelled folder and reports the top-1 of each single
state, and of the mean of aligned features over named groups of states: the phases of one site with the others at
0, all states, and the B best states chosen with hindsight (an upper bound no criterion reaches).

    python scripts/phase_states.py --model cifar10-resnet20 --data ../shared/data/cifar10-jpeg/test \
        --json runs/states-r20.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from polyglean.data import ImageDataset, limit_dataset, parse_subset, subset_dataset
from polyglean.models import load_model
from polyglean.phase.net import PhaseNet
from polyglean.search import PhaseSearch, SearchResult
from polyglean.io import write_json as write_json_atomic
from polyglean.provenance import machine


def subset(result: SearchResult, index: torch.Tensor) -> SearchResult:
    """The candidates ``index`` (N, b) of every image, as a result whose first ``b`` candidates are those."""
    def take(t: torch.Tensor) -> torch.Tensor:
        idx = index.reshape(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        return t.gather(1, idx)

    return SearchResult({}, take(result.states), take(result.scores[..., None])[..., 0], take(result.shift),
                        take(result.candidate_logits), 0, 0.0, 0.0, features=take(result.features))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--weights")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--subset", help="START:STOP of a fixed shuffled order of the images (as polyglean eval --subset)")
    p.add_argument("--search-space", nargs="+")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--json")
    args = p.parse_args(argv)

    model, preprocess = load_model(args.model, args.weights)
    net = PhaseNet(model, input_size=preprocess.input_size)
    probe = PhaseSearch(net, budget=1, search_space=args.search_space)
    total = probe.num_states
    search = PhaseSearch(net, budget=total, criterion="random", aggregate="mean", align=True,
                         search_space=args.search_space)
    space = search.search_space
    dataset = ImageDataset(args.data, preprocess)
    if args.subset:
        dataset = subset_dataset(dataset, *parse_subset(args.subset))
    dataset = limit_dataset(dataset, args.limit, spread=True)
    states: list[tuple[int, ...]] = [tuple(s) for s in itertools.product(*[range(x.num_phases) for x in space])]
    per_state_correct = torch.zeros(len(states))
    groups: dict[str, list[tuple[int, ...]]] = {"default only": [states[0]], "all states": states}
    for k, site in enumerate(space):
        groups[f"phases of {site.name} (others 0)"] = [s for s in states if all(v == 0 for j, v in enumerate(s)
                                                                                 if j != k)]
    group_correct = dict.fromkeys(groups, 0)
    oracle_b = [2, 4, 8]
    oracle_correct = dict.fromkeys(oracle_b, 0)
    n = 0
    tick = time.perf_counter()
    for x, y in tqdm(DataLoader(dataset, batch_size=args.batch_size), desc="all states", unit="batch"):
        r = search.run(x)
        flat = r.states[..., [s.index for s in space]]  # (N, S, M)
        key = torch.tensor(states)
        pos = (flat[:, :, None, :] == key[None, None]).all(-1).float().argmax(1)  # (N, len(states)): where each is
        correct = r.candidate_logits.argmax(-1) == y[:, None]  # (N, S)
        per_state_correct += correct.gather(1, pos).sum(0).float()
        for name, members in groups.items():
            idx = pos[:, [states.index(m) for m in members]]
            out = search.combine(subset(r, idx), len(members), "mean", True)
            group_correct[name] += int((out.argmax(-1) == y).sum())
        # hindsight: the b states with the highest probability of the true class, always with the default
        p_true = r.candidate_logits.softmax(-1).gather(2, y[:, None, None].expand(-1, r.states.shape[1], 1))[..., 0]
        p_true[:, 0] = float("inf")
        for b in oracle_b:
            idx = p_true.topk(b, dim=1).indices
            out = search.combine(subset(r, idx), b, "mean", True)
            oracle_correct[b] += int((out.argmax(-1) == y).sum())
        n += len(y)
    rows = [{"state": dict(zip([s.name for s in space], st)), "top1": 100 * float(c) / n}
            for st, c in zip(states, per_state_correct)]
    payload = {
        "model": args.model, "data": args.data, "subset": args.subset, "n_images": n, "search_space": [s.name for s in space],
        "states": rows,
        "groups": {k: {"size": len(groups[k]), "top1": 100 * v / n} for k, v in group_correct.items()},
        "hindsight_best": {str(b): 100 * v / n for b, v in oracle_correct.items()},
        "seconds": time.perf_counter() - tick, "machine": machine(),
    }
    print(f"{args.model} on {args.data}: {n} images")
    for r_ in sorted(rows, key=lambda r_: -r_["top1"]):
        print(f"  state {r_['state']}: top-1 {r_['top1']:.2f}")
    for k, v in payload["groups"].items():
        print(f"  mean of {k} ({v['size']} states, aligned): top-1 {v['top1']:.2f}")
    for b, v in payload["hindsight_best"].items():
        print(f"  hindsight best {b} states (upper bound): top-1 {v:.2f}")
    if args.json:
        write_json_atomic(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
