"""Phases as a training-time augmentation, measured: fine-tune CIFAR-10 ResNet-20 with ``--phase-augment P`` and
compare the arms on lossless CIFAR-10.

Every arm fine-tunes the pretrained ResNet-20 with the same schedule (``polyglean train``'s defaults: SGD with
Nesterov momentum, lr 0.01 on a cosine, batch 128, weight decay 5e-4, crop + flip), on the same images; the arms
differ only in ``--phase-augment`` (or ``--downsample blurpool``) and the seed. Each checkpoint is then measured:

- plain top-1 / NLL / ECE on the whole test set, and the paired change against the control of the same seed;
- shift consistency (two random shifts per image, seed 0) on the whole test set;
- the phase search (entropy criterion; mean and entropy aggregation, aligned) at B = 4 / 10 / 15 against the arm's
  own plain model, on ``--search-subset`` of the test set;
- every phase state's own top-1 on that subset (do the states become equal?).

Stages, each resumable (a finished checkpoint or result is kept):

    python scripts/phase_training.py train --arm p0:s0 --arm p1:s0 ...      # fine-tune
    python scripts/phase_training.py evaluate --arm p0:s0 ...                # measure
    python scripts/phase_training.py table --json docs/results/cifar10-phase-training.json \
        --markdown docs/results/cifar10-phase-training.md                   # the README table

An arm is ``NAME:sSEED`` with NAME ``p0``, ``p0.25``, ``p0.5``, ``p1`` (the phase-augment probability),
``blurpool`` (P = 0 with BlurPool swapped in) or ``pretrained`` (the published weights, evaluated only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from polyglean.data import open_dataset
from polyglean.experiments.classification import ClassificationConfig, evaluate_classification
from polyglean.experiments.common import Outcomes, compare, metrics_row
from polyglean.experiments.shift import shift_consistency
from polyglean.io import write_json, write_torch
from polyglean.models import load_model
from polyglean.phase.net import PhaseNet
from polyglean.provenance import machine
from polyglean.search import PhaseSearch
from polyglean.training.finetune import FinetuneCallbacks, FinetuneSettings, finetune, load_finetuned

DATA = Path(os.environ.get("POLYGLEAN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def parse_arm(text: str) -> dict[str, Any]:
    name, _, seed = text.partition(":s")
    if not seed.isdigit():
        raise SystemExit(f"arm {text!r}: expected NAME:sSEED, e.g. p0.5:s0")
    if name == "pretrained":  # the published weights, not fine-tuned: evaluated only
        return {"name": text, "p": 0.0, "downsample": None, "seed": int(seed), "pretrained": True}
    if name == "blurpool":
        return {"name": text, "p": 0.0, "downsample": "blurpool", "seed": int(seed)}
    if not name.startswith("p"):
        raise SystemExit(f"arm {text!r}: NAME is p<probability> or blurpool")
    return {"name": text, "p": float(name[1:]), "downsample": None, "seed": int(seed)}


def settings_of(arm: dict[str, Any], args: argparse.Namespace) -> FinetuneSettings:
    return FinetuneSettings(model="cifar10-resnet20", data=str(args.train_data), epochs=args.epochs,
                            downsample=arm["downsample"], limit=args.limit, seed=arm["seed"],
                            batch_size=args.batch_size, lr=args.lr, phase_augment=arm["p"])


def train(args: argparse.Namespace) -> None:
    for text in args.arm:
        arm = parse_arm(text)
        if arm.get("pretrained"):
            continue
        out = args.out / f"{arm['name'].replace(':', '-')}.pt"
        began = time.perf_counter()

        def note(record: dict[str, Any], name: str = arm["name"]) -> None:
            print(f"[{name}] epoch {record['epoch']}: loss {record['loss']:.4f} top-1 {record['top1']:.2f} "
                  f"({record['seconds']:.0f} s)", flush=True)

        finetune(settings_of(arm, args), out, resume=out.exists(),
                 callbacks=FinetuneCallbacks(on_epoch_end=note, on_note=print))
        print(f"[{arm['name']}] trained in {time.perf_counter() - began:.0f} s -> {out}", flush=True)


def _model(arm: dict[str, Any], ckpt: Path) -> tuple[torch.nn.Module, Any]:
    return load_finetuned("cifar10-resnet20", arm["downsample"], ckpt)


@torch.no_grad()
def states_alone(net: PhaseNet, dataset: Any, batch_size: int) -> dict[str, Any]:
    """Top-1 of every state of the default search space alone, and of the aligned mean of all of them."""
    probe = PhaseSearch(net, budget=1)
    search = PhaseSearch(net, budget=probe.num_states, criterion="random", aggregate="mean", align=True)
    names = [s.name for s in search.search_space]
    correct: dict[tuple[int, ...], list[torch.Tensor]] = {}
    every: list[torch.Tensor] = []
    from polyglean.data import make_loader

    for x, y in make_loader(dataset, batch_size=batch_size):
        result = search.run(x, budgets=[probe.num_states])
        states = result.states[..., [s.index for s in search.search_space]]  # (N, B, len(space))
        pred = result.candidate_logits.argmax(-1)  # (N, B)
        for i in range(states.shape[1]):
            for n in range(states.shape[0]):
                key = tuple(states[n, i].tolist())
                correct.setdefault(key, []).append((pred[n, i] == y[n]).reshape(1))
        every.append(result.logits[probe.num_states].argmax(-1) == y)
    table = {"|".join(str(v) for v in k): 100.0 * torch.cat(v).float().mean().item() for k, v in correct.items()}
    default = "|".join("0" for _ in names)
    values = list(table.values())
    return {"sites": names, "top1": dict(sorted(table.items())), "default": table[default], "min": min(values),
            "max": max(values), "mean": sum(values) / len(values),
            "all_states_mean_top1": 100.0 * torch.cat(every).float().mean().item()}


def evaluate(args: argparse.Namespace) -> None:
    test_all = None
    for text in args.arm:
        arm = parse_arm(text)
        stem = arm["name"].replace(":", "-")
        ckpt, out = args.out / f"{stem}.pt", args.out / f"{stem}.json"
        if out.exists() and not args.overwrite:
            print(f"[{arm['name']}] already measured: {out}")
            continue
        if arm.get("pretrained"):
            saved = {"history": [], "config": None}
            model, preprocess = load_model("cifar10-resnet20")
        else:
            if not ckpt.exists():
                print(f"[{arm['name']}] no checkpoint yet: {ckpt}", file=sys.stderr)
                continue
            saved = torch.load(ckpt, weights_only=True)
            if saved["epoch"] < saved["total_epochs"]:
                print(f"[{arm['name']}] still training ({saved['epoch']} of {saved['total_epochs']} epochs)",
                      file=sys.stderr)
                continue
            model, preprocess = _model(arm, ckpt)
        began = time.perf_counter()
        test_all = open_dataset(args.test_data, preprocess)
        subset = open_dataset(args.test_data, preprocess, subset=args.search_subset)
        net = PhaseNet(model, input_size=preprocess.input_size)
        from polyglean.data import make_loader

        logits, labels = [], []
        with torch.no_grad():
            for x, y in make_loader(test_all, batch_size=args.batch_size):
                logits.append(model(x))
                labels.append(y)
        plain, outcomes = metrics_row(torch.cat(logits), torch.cat(labels), None)
        print(f"[{arm['name']}] plain top-1 {plain['top1']:.2f}", flush=True)
        shift = shift_consistency(model, preprocess, test_all, seed=0, batch_size=args.batch_size).as_dict()
        print(f"[{arm['name']}] shift consistency {shift['percent']:.2f}", flush=True)
        config = ClassificationConfig(budgets=(4, 10, 15), aggregates=("mean", "entropy"), aligns=(True,),
                                      batch_size=args.batch_size)
        searched = evaluate_classification(net, subset, config)
        assert searched is not None
        print(f"[{arm['name']}] search done", flush=True)
        alone = states_alone(net, subset, args.batch_size)
        print(f"[{arm['name']}] states: default {alone['default']:.2f}, min {alone['min']:.2f}, "
              f"max {alone['max']:.2f}", flush=True)
        write_torch(args.out / f"{stem}.outcomes.pt", {
            "plain": vars(outcomes), "search": {f"{a}-{'al' if al else 'no'}-{b}": vars(o)
                                                 for (a, al, b), o in searched.outcomes.items()}})
        write_json(out, {"arm": arm, "checkpoint": str(ckpt), "plain": plain, "shift_consistency": shift,
                         "search_subset": args.search_subset, "search": searched.rows, "states": alone,
                         "history": saved["history"], "config": saved["config"],
                         "seconds": time.perf_counter() - began, "machine": machine()})
        print(f"[{arm['name']}] measured in {time.perf_counter() - began:.0f} s -> {out}", flush=True)


def _fmt_ci(d: float, ci: list[float], digits: int = 2) -> str:
    return f"{d:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def table(args: argparse.Namespace) -> None:
    results = {}
    for path in sorted(args.out.glob("*.json")):
        payload = json.loads(path.read_text())
        if "arm" in payload:
            results[payload["arm"]["name"]] = payload
    if not results:
        raise SystemExit(f"no measured arm in {args.out}")
    outcomes = {name: torch.load(args.out / f"{name.replace(':', '-')}.outcomes.pt", weights_only=True)
                for name in results}
    rows = []
    for name, payload in results.items():
        seed = payload["arm"]["seed"]
        control = f"p0:s{seed}"
        row: dict[str, Any] = {"arm": name, "p": payload["arm"]["p"], "downsample": payload["arm"]["downsample"],
                               "seed": seed, "plain": payload["plain"],
                               "shift_consistency": payload["shift_consistency"]["percent"],
                               "states": payload["states"],
                               "search": {f"{r['aggregate']}@{r['budget']}": r for r in payload["search"]
                                          if r["budget"] > 1 and r["align"]}}
        if control in outcomes and control != name:
            mine = Outcomes(**outcomes[name]["plain"])
            ref = Outcomes(**outcomes[control]["plain"])
            row["vs_control"] = compare(mine, ref)
            for key in ("entropy-al-4", "entropy-al-15"):  # the searched predictions against the control's
                if key in outcomes[name]["search"] and key in outcomes[control]["search"]:
                    row[f"vs_control_{key}"] = compare(Outcomes(**outcomes[name]["search"][key]),
                                                       Outcomes(**outcomes[control]["search"][key]))
        rows.append(row)
    order = {"pretrained": -1, "p0": 0, "p0.25": 1, "p0.5": 2, "p1": 3, "blurpool": 4}
    rows.sort(key=lambda r: (r["seed"], order.get(r["arm"].split(":")[0], 9)))
    write_json(args.json, {"rows": rows, "machine": machine()})
    lines = [
        "| arm | seed | top-1 | Δ top-1 vs P=0 [95% CI] | NLL | Δ NLL vs P=0 [95% CI] | ECE | shift cons. | search Δ vs own plain: "
        "B=4 | B=10 | B=15 | B=15 mean | B=4 vs P=0's B=4 | states alone: default / min / mean / max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["search"]
        vs = r.get("vs_control")
        label = ("pretrained, not fine-tuned" if r["arm"].startswith("pretrained") else "BlurPool"
                 if r["downsample"] else f"P = {r['p']:g}")

        def cell(key: str) -> str:
            x = s.get(key)
            return _fmt_ci(x["delta_top1"], x["delta_top1_ci"]) if x else "—"

        st = r["states"]
        v4 = r.get("vs_control_entropy-al-4")
        against = _fmt_ci(v4["delta_top1"], v4["delta_top1_ci"]) if v4 else "—"
        lines.append(
            f"| {label} | {r['seed']} | {r['plain']['top1']:.2f} | "
            f"{_fmt_ci(vs['delta_top1'], vs['delta_top1_ci']) if vs else '—'} | {r['plain']['nll']:.4f} | "
            f"{_fmt_ci(vs['delta_nll'], vs['delta_nll_ci'], 4) if vs else '—'} | "
            f"{r['plain']['ece']:.2f} | {r['shift_consistency']:.2f} | {cell('entropy@4')} | "
            f"{cell('entropy@10')} | {cell('entropy@15')} | {cell('mean@15')} | {against} | "
            f"{st['default']:.2f} / {st['min']:.2f} / {st['mean']:.2f} / {st['max']:.2f} |")
    text = "\n".join(lines) + "\n"
    if args.markdown:
        from polyglean.io import write_atomic

        write_atomic(args.markdown, lambda f: f.write(text.encode()))
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "evaluate", "table"])
    p.add_argument("--arm", action="append", default=[], help="NAME:sSEED, repeatable")
    p.add_argument("--out", type=Path, default=Path("docs/results/work/phase-training"),
                   help="folder of the checkpoints and per-arm results (not committed)")
    p.add_argument("--train-data", type=Path, default=DATA / "cifar10" / "train")
    p.add_argument("--test-data", type=Path, default=DATA / "cifar10" / "test")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=20000, help="training images (evenly spread), the same for every arm")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--search-subset", default="0:5000",
                   help="START:STOP of the test set for the search and states (default: all 5,000 of cifar10/test)")
    p.add_argument("--overwrite", action="store_true", help="evaluate again arms already measured")
    p.add_argument("--json", type=Path, default=Path("docs/results/cifar10-phase-training.json"))
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("train", "evaluate") and not args.arm:
        p.error("give at least one --arm")
    {"train": train, "evaluate": evaluate, "table": table}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
