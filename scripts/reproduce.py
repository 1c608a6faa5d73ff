"""Reproduce the README's result tables and figures from the data, with one command.

    python scripts/reproduce.py --list                       # the experiments, cheapest first, and what is cached
    python scripts/reproduce.py --only cifar10-resnet20      # one (or several) of them
    python scripts/reproduce.py --all --device cuda          # every one; then the README's tables are rewritten

Every experiment runs ``python -m polyglean eval`` / ``train-aggregator`` commands (and ``scripts/phase_states.py``)
on the data in ``--data-root`` (default ``$POLYGLEAN_DATA`` or ``../shared/data``). Each command writes one JSON
result under ``OUT/runs/`` (atomically) beside a record of its arguments; a result whose record matches is never
computed again, so an interrupted ``--all`` resumes where it stopped, and running it twice does nothing new.
Trained aggregators, their candidate caches and TTA view caches go to ``OUT/work/``.

From the JSON results the script writes, per experiment, ``OUT/NAME.md`` (Markdown tables) and ``OUT/NAME.png``
(accuracy against cost, with 95% intervals), and replaces the block between ``<!-- table:NAME -->`` and
``<!-- /table:NAME -->`` in the README with ``OUT/NAME.md``, so the README's numbers come from these results.
Every reported change is against the plain model (B=1) on the same images: a paired bootstrap interval over images
(95%, 2,000 resamples) and McNemar's exact test on the images fixed / broken; a change is bold only when its
interval excludes zero.

Fitting rule: nothing is fitted on images a figure is reported on. On lossless CIFAR-10 (``cifar10/test``, 5,000
images) the learned aggregator and GPS/AugTTA/ClassTTA are fitted on positions 0-1999 of a fixed shuffled order
(the aggregator trains on 0-1599 and validates on 1600-1999) and every figure is reported on positions 2000-4999
(3,000 images). On ``imagenet-val1300``, fitted on positions 0-649, reported on 650-1299. ``cifar10/train`` is the
pretrained ResNets' own training data and is never used to fit a test-time module.

``--limit N`` evaluates N images per command (for CI: a smoke run whose numbers mean nothing); it never rewrites the
README. ``--device`` is passed to the commands that accept it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIT = "0:2000"  # lossless CIFAR-10: positions fitted on (training 0:1600, validation 1600:2000)
REPORT = "2000:"  # lossless CIFAR-10: positions reported on
LITE_FIT, LITE_REPORT = "0:650", "650:"
CIFAR_SPLIT = ("fitted on positions 0-1999 of a fixed shuffled order of `cifar10/test` (the aggregator trained on "
               "0-1599, validated on 1600-1999); every figure on the other 3,000 images, positions 2000-4999")
LITE_SPLIT = ("reported on positions 650-1299 of a fixed shuffled order of `imagenet-val1300` (650 images); anything "
              "fitted was fitted on positions 0-649")
# Flags that change how fast a command runs, not what it computes: a cached result made with others still counts.
_SPEED_FLAGS = {"--device": 1, "--batch-size": 1, "--workers": 1, "--no-progress": 0, "--search-batch-size": 1}


# ----------------------------------------------------------------------------------------------------- registry
@dataclass
class Context:
    """Where the data is, where results go, and the options of this invocation."""

    data: Path
    out: Path
    limit: int | None
    device: str | None
    python: str

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def work(self) -> Path:
        return self.out / "work"


@dataclass
class Run:
    """One command that writes one result file.

    ``argv(ctx)`` gives the command's arguments after ``python``; ``result(ctx)`` the file it writes (its existence,
    with a matching record of the arguments, means the run is done).
    """

    name: str
    argv: Callable[[Context], list[str]]
    result: Callable[[Context], Path]
    device_flag: str | None = "eval"  # the polyglean command whose --help must list --device to pass it
    only_for: str | None = None  # an intermediate (a trained module): not needed once this run's result exists

    def done(self, ctx: Context) -> bool:
        if self.only_for is not None and RUNS[self.only_for].done(ctx):
            return True
        path = self.result(ctx)
        if not path.is_file():
            return False
        record = _record_path(path)
        if not record.is_file():  # a result made by hand with the same command: adopted
            return True
        return _essential(json.loads(record.read_text())["argv"]) == _essential(portable(self.argv(ctx), ctx))


@dataclass
class Experiment:
    """A table (and figure) of the README: the runs it needs and how it is written."""

    name: str
    title: str
    runs: list[str]
    render: Callable[[Context, dict[str, Any]], str]
    cost: str  # a rough CPU cost, for --list
    figure: Callable[[Context, dict[str, Any], Path], None] | None = None
    notes: list[str] = field(default_factory=list)


RUNS: dict[str, Run] = {}
EXPERIMENTS: dict[str, Experiment] = {}


def _record_path(result: Path) -> Path:
    return result.with_name(result.name + ".cmd.json")


def portable(argv: list[str], ctx: Context) -> list[str]:
    """``argv`` with the data and output folders written as ``$DATA`` / ``$OUT`` (records survive a move)."""
    return [a.replace(str(ctx.out), "$OUT").replace(str(ctx.data), "$DATA") for a in argv]


def _essential(argv: list[str]) -> list[str]:
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        if a in _SPEED_FLAGS:
            skip = _SPEED_FLAGS[a]
            continue
        out.append(a)
    return out


def _polyglean(ctx: Context, command: str, *args: str) -> list[str]:
    argv = ["-m", "polyglean", command, *args]
    if ctx.limit is not None and command == "eval":
        argv += ["--limit", str(ctx.limit)]
        if "--tta-fit-data" in args:
            argv += ["--tta-fit-limit", str(ctx.limit)]
    return argv


def eval_run(name: str, *args: str | Callable[[Context], str]) -> Run:
    """A ``polyglean eval`` run writing ``OUT/runs/NAME.json``; callables in ``args`` are resolved per context."""

    def argv(ctx: Context) -> list[str]:
        resolved = [a(ctx) if callable(a) else a for a in args]
        return _polyglean(ctx, "eval", *resolved, "--workers", "0", "--no-progress",
                          "--json", str(ctx.runs / f"{name}.json"))

    run = Run(name, argv, lambda ctx: ctx.runs / f"{name}.json")
    RUNS[name] = run
    return run


def data(rel: str) -> Callable[[Context], str]:
    return lambda ctx: str(ctx.data / rel)


def work(rel: str) -> Callable[[Context], str]:
    return lambda ctx: str(ctx.work / rel)


# ----------------------------------------------------------------------------------------------------- the runs
PHASE_BUDGETS = "1,2,4,8,10,15,16"
for depth in (20, 32, 44, 56):
    for crit in ("entropy", "random", "delta") if depth in (20, 56) else ("entropy",):
        eval_run(f"cifar10-resnet{depth}-{crit}", "--model", f"cifar10-resnet{depth}", "--data", data("cifar10/test"),
                 "--subset", REPORT, "--budgets", PHASE_BUDGETS, "--criterion", crit, "--aggregate", "mean,entropy",
                 "--align-both", "--batch-size", "100")
for depth in (20, 56):
    eval_run(f"cifar10-jpeg-resnet{depth}", "--model", f"cifar10-resnet{depth}", "--data", data("cifar10-jpeg/test"),
             "--budgets", "1,4,10,15", "--aggregate", "mean,entropy", "--align-both", "--batch-size", "100")
for variant in (0, 1, 2):
    eval_run(f"imagenet-lite{variant}", "--model", f"imagenet-efficientnet-lite{variant}",
             "--data", data("imagenet-val1300"), "--subset", LITE_REPORT, "--budgets", "1,4,10,15",
             "--criterion", "entropy", "--aggregate", "mean,entropy,learned" if variant == 0 else "mean,entropy",
             "--align-both", "--batch-size", "16")

# The learned aggregator of ResNet-20, trained on the fit part of lossless CIFAR-10.
AGG_EPOCHS = 3  # chosen on the validation part: a 10-epoch run peaked there at epoch 3, then overfitted


def _train_argv(ctx: Context) -> list[str]:
    train, val = ("0:1600", "1600:2000") if ctx.limit is None else (f"0:{ctx.limit}", f"1600:{1600 + ctx.limit}")
    return ["-m", "polyglean", "train-aggregator", "--model", "cifar10-resnet20",
            "--data", str(ctx.data / "cifar10/test"),
            "--subset", train, "--val-data", str(ctx.data / "cifar10/test"), "--val-subset", val, "--budget", "30",
            "--epochs", str(AGG_EPOCHS if ctx.limit is None else 1), "--lr", "1e-3", "--batch-size", "64",
            "--cache", str(ctx.work / "agg-cache"), "--out", str(ctx.work / "r20-agg.pt"),
            "--export", str(ctx.work / "r20-agg-slim.pt"), "--no-progress", "--workers", "0"]


RUNS["cifar10-resnet20-agg"] = Run("cifar10-resnet20-agg", _train_argv, lambda ctx: ctx.work / "r20-agg-slim.pt",
                                   device_flag="train-aggregator", only_for="cifar10-resnet20-learned")
eval_run("cifar10-resnet20-learned", "--model", "cifar10-resnet20", "--data", data("cifar10/test"), "--subset", REPORT,
         "--budgets", "1,4,10,15", "--criterion", "entropy", "--aggregate", "mean,entropy,learned",
         "--aggregator", work("r20-agg-slim.pt"), "--batch-size", "100")

# Image-space TTA and its combination with the phase search (ResNet-20), fitted on the fit part.
_TTA = ("--model", "cifar10-resnet20", "--data", data("cifar10/test"), "--subset", REPORT, "--batch-size", "250",
        "--tta-cache", work("tta-cache"))
_TTA_FIT = ("--tta-fit-data", data("cifar10/test"), "--tta-fit-subset", FIT)
eval_run("cifar10-resnet20-tta-flip", *_TTA, "--tta", "none,mean,max,gps,augtta,classtta", "--tta-policy", "flip",
         "--budgets", "1,2,4", *_TTA_FIT)
eval_run("cifar10-resnet20-tta-flip-scales", *_TTA, "--tta", "mean,gps,augtta,classtta", "--tta-policy",
         "flip-scales", "--tta-budget", "2,4,8", "--budgets", "1", *_TTA_FIT)


def _states_argv(ctx: Context) -> list[str]:
    argv = [str(REPO / "scripts" / "phase_states.py"), "--model", "cifar10-resnet20", "--data",
            str(ctx.data / "cifar10/test"), "--subset", REPORT, "--batch-size", "100",
            "--json", str(ctx.runs / "cifar10-resnet20-states.json")]
    return argv + (["--limit", str(ctx.limit)] if ctx.limit is not None else [])


RUNS["cifar10-resnet20-states"] = Run("cifar10-resnet20-states", _states_argv,
                                      lambda ctx: ctx.runs / "cifar10-resnet20-states.json", device_flag=None)


# ------------------------------------------------------------------------------------------------- statistics
def _bits(row: dict[str, Any]) -> Any:
    import torch

    return torch.tensor([c == "1" for c in row["correct"]], dtype=torch.bool)


def change(reference: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Top-1 change of ``row`` against ``reference`` (points) with its 95% paired bootstrap interval and McNemar."""
    from polyglean.stats import mcnemar, paired_bootstrap

    if "correct" not in row or "correct" not in reference:  # rows that carry their change against the plain model
        low, high = row["delta_top1_ci"]
        return {"delta": row["delta_top1"], "low": low, "high": high, "significant": low > 0 or high < 0,
                "fixed": row["fixed"], "broken": row["broken"], "p": row["mcnemar_p"]}
    a, b = _bits(reference), _bits(row)
    d = paired_bootstrap(a.float(), b.float(), seed=0)
    m = mcnemar(a, b)
    return {"delta": 100 * d.delta, "low": 100 * d.low, "high": 100 * d.high, "significant": d.significant,
            "fixed": m.fixed, "broken": m.broken, "p": m.p_value}


def fmt_change(c: dict[str, Any]) -> str:
    text = f"{c['delta']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"
    return f"**{text}**" if c["significant"] else text


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def load(ctx: Context, name: str) -> dict[str, Any] | None:
    path = RUNS[name].result(ctx)
    return json.loads(path.read_text()) if path.is_file() and path.suffix == ".json" else None


def _rows(payload: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in payload["results"] if all(r.get(k) == v for k, v in match.items())]


def _one(payload: dict[str, Any], **match: Any) -> dict[str, Any]:
    rows = _rows(payload, **match)
    if len(rows) != 1:
        raise KeyError(f"expected one row matching {match}, found {len(rows)}")
    return rows[0]


# ------------------------------------------------------------------------------------------------- renderers
def _phase_table(payload: dict[str, Any], budgets: Iterable[int], variants: list[tuple[str, bool]],
                 label: Callable[[str, bool], str] | None = None) -> str:
    budgets = [b for b in budgets if _rows(payload, budget=b)]
    head = ["aggregate", "aligned", "B=1"] + [f"B={b}: top-1, change [95% CI]" for b in budgets if b != 1]
    top = max(budgets)
    head += [f"fixed / broken at {top} (McNemar p)", f"NLL 1 → {top}", "fwd. equiv. " + " / ".join(
        str(b) for b in budgets if b != 1)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for agg, al in variants:
        if not _rows(payload, aggregate=agg, align=al):
            continue
        ref = _one(payload, aggregate=agg, align=al, budget=1)
        cells = [label(agg, al) if label else agg, "yes" if al else "no", f"{ref['top1']:.2f}"]
        for b in budgets:
            if b == 1:
                continue
            r = _one(payload, aggregate=agg, align=al, budget=b)
            cells.append(f"{r['top1']:.2f} {fmt_change(change(ref, r))}")
        last = _one(payload, aggregate=agg, align=al, budget=top)
        c = change(ref, last)
        cells += [f"{c['fixed']} / {c['broken']} ({fmt_p(c['p'])})", f"{ref['nll']:.3f} → {last['nll']:.3f}",
                  " / ".join(f"{_one(payload, aggregate=agg, align=al, budget=b)['forward_equivalents']:.2f}"
                             for b in budgets if b != 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(found: list[tuple[str, dict[str, Any]]]) -> str:
    """One generated sentence: which changes against the plain model have an interval that excludes zero."""
    gains = [f"{what} ({c['delta']:+.2f})" for what, c in found if c["significant"] and c["delta"] > 0]
    losses = [f"{what} ({c['delta']:+.2f})" for what, c in found if c["significant"] and c["delta"] < 0]
    if not gains and not losses:
        return (f"No change against the plain model has a 95% interval that excludes zero ({len(found)} "
                "compared): on these images no row is a gain or a loss.")
    parts = []
    if gains:
        parts.append("gains (interval above zero): " + "; ".join(gains))
    if losses:
        parts.append("losses (interval below zero): " + "; ".join(losses))
    return f"Of {len(found)} changes against the plain model, " + ". ".join(parts) + "; every other one is noise."


def _phase_changes(payload: dict[str, Any], budgets: Iterable[int], variants: list[tuple[str, bool]]
                   ) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for agg, al in variants:
        if not _rows(payload, aggregate=agg, align=al):
            continue
        ref = _one(payload, aggregate=agg, align=al, budget=1)
        for b in budgets:
            if b != 1 and _rows(payload, aggregate=agg, align=al, budget=b):
                found.append((f"{agg}{', aligned' if al else ', not aligned'}, B={b}",
                              change(ref, _one(payload, aggregate=agg, align=al, budget=b))))
    return found


def _images(payload: dict[str, Any]) -> int:
    return int(payload["results"][0]["n_images"])


PHASE_VARIANTS = [("mean", True), ("mean", False), ("entropy", True), ("entropy", False), ("learned", True)]


def render_phase(run: str, what: str) -> Callable[[Context, dict[str, Any]], str]:
    def render(ctx: Context, _: dict[str, Any]) -> str:
        p = load(ctx, run)
        assert p is not None
        cfg = p["config"]
        text = (f"{what}, {_images(p):,} images; criterion {cfg['criterion']}, search space "
                f"{{{', '.join(cfg['search_space'])}}}; one search pass for all rows. Each cell: top-1 (%), then the "
                "change against B=1 in points with its 95% paired bootstrap interval (bold: the interval excludes "
                "zero).\n\n")
        return (text + _phase_table(p, [1, 4, 10, 15], PHASE_VARIANTS) + "\n\n"
                + verdict(_phase_changes(p, [4, 10, 15], PHASE_VARIANTS)))
    return render


def render_criteria(ctx: Context, _: dict[str, Any]) -> str:
    parts = []
    for depth in (20, 56):
        payloads = {c: load(ctx, f"cifar10-resnet{depth}-{c}") for c in ("entropy", "random", "delta")}
        payloads = {c: p for c, p in payloads.items() if p is not None}
        if not payloads:
            continue
        budgets = [2, 4, 8, 10, 15, 16]
        found: list[tuple[str, dict[str, Any]]] = []
        head = ["criterion"] + [f"B={b}" for b in budgets] + ["fixed / broken at 10 (p)"]
        lines = [f"ResNet-{depth}, mean aggregation, aligned, {_images(next(iter(payloads.values()))):,} images "
                 "(change against B=1 [95% CI]):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c, p in payloads.items():
            ref = _one(p, aggregate="mean", align=True, budget=1)
            cells = [c]
            for b in budgets:
                r = _one(p, aggregate="mean", align=True, budget=b)
                cells.append(f"{r['top1']:.2f} {fmt_change(change(ref, r))}")
            ch = change(ref, _one(p, aggregate="mean", align=True, budget=10))
            cells.append(f"{ch['fixed']} / {ch['broken']} ({fmt_p(ch['p'])})")
            lines.append("| " + " | ".join(cells) + " |")
            found += [(f"{c}, B={b}", change(ref, _one(p, aggregate="mean", align=True, budget=b))) for b in budgets]
        parts.append("\n".join(lines) + "\n\n" + verdict(found))
    return "\n\n".join(parts)


def render_learned(ctx: Context, _: dict[str, Any]) -> str:
    p = load(ctx, "cifar10-resnet20-learned")
    assert p is not None
    variants = [("mean", True), ("entropy", True), ("learned", True)]
    text = (f"ResNet-20 on lossless CIFAR-10, {_images(p):,} images; criterion entropy; {CIFAR_SPLIT}. "
            "`learned@default` is a control, not a search result: the trained module on the default state alone "
            "(B=1).\n\n")
    table = _phase_table(p, [1, 4, 10, 15], variants)
    ref = _one(p, aggregate="mean", align=True, budget=1)
    for r in _rows(p, aggregate="learned@default"):
        c = change(ref, r)
        n = len([b for b in (4, 10, 15) if _rows(p, budget=b)])
        table += (f"\n| learned@default (control) | — | {r['top1']:.2f} {fmt_change(c)} |" + " |" * n
                  + f" {c['fixed']} / {c['broken']} ({fmt_p(c['p'])}) | {ref['nll']:.3f} → {r['nll']:.3f} | 1.00 |")
    training = (p["config"].get("aggregators") or {}).get("aligned", {}).get("training") or {}
    if training:
        text += (f"Training: {training.get('train', {}).get('images')} images, validation "
                 f"{training.get('val', {}).get('images')}, {training.get('epochs')} epochs, lr {training.get('lr')}, "
                 f"B={training.get('budget')}, random criterion.\n\n")
    found = _phase_changes(p, [4, 10, 15], variants)
    found += [("learned@default", change(ref, r)) for r in _rows(p, aggregate="learned@default")]
    return text + table + "\n\n" + verdict(found)


TTA_RUNS = ["cifar10-resnet20-tta-flip", "cifar10-resnet20-tta-flip-scales"]


def _tta_label(r: dict[str, Any]) -> str:
    if r["tta"] == "none":
        return "phase search alone" if r["phase_budget"] > 1 else "plain model"
    picks = f", {r['view_budget']} picks from" if r["tta"] == "gps" and r["view_budget"] else ","
    return f"{r['tta']}{picks} {r['policy']}"


def _tta_rows(ctx: Context) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, plain-model row) of every TTA result, without duplicate rows."""
    out, seen = [], set()
    for name in TTA_RUNS:
        p = load(ctx, name)
        if p is None:
            continue
        plain = _one(p, tta="none", phase_budget=1) if _rows(p, tta="none") else None
        for r in p["results"]:
            key = (_tta_label(r), r["b_image"], r["phase_budget"])
            if key in seen:
                continue
            seen.add(key)
            ref = plain or _plain_of(ctx)
            out.append((r, ref))
    return out


def _plain_of(ctx: Context) -> dict[str, Any]:
    p = load(ctx, "cifar10-resnet20-tta-flip") or load(ctx, "cifar10-resnet20-entropy")
    assert p is not None
    return _one(p, tta="none", phase_budget=1) if "tta" in p["results"][0] else _one(
        p, aggregate="mean", align=True, budget=1)


def render_tta(ctx: Context, _: dict[str, Any]) -> str:
    rows = _tta_rows(ctx)
    n = rows[0][0]["n_images"]
    head = ["method", "views × phase states = B_total", "top-1", "change [95% CI]", "fixed / broken (McNemar p)",
            "NLL", "ECE", "fwd. equiv."]
    lines = [f"ResNet-20 on lossless CIFAR-10, {n:,} images; gps/augtta/classtta {CIFAR_SPLIT}, each at the phase "
             "budget it is evaluated at. Phase search: criterion entropy, entropy aggregation, aligned. Rows in order "
             "of cost; the change is against the plain model.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    found = []
    for r, ref in sorted(rows, key=lambda t: (t[0]["forward_equivalents"], t[0]["top1"])):
        c = change(ref, r)
        if r["b_image"] * r["phase_budget"] > 1:
            found.append((f"{_tta_label(r)} {r['b_image']}×{r['phase_budget']}", c))
        lines.append(f"| {_tta_label(r)} | {r['b_image']} × {r['phase_budget']} = {r['b_image'] * r['phase_budget']} "
                     f"| {r['top1']:.2f} | {fmt_change(c)} | {c['fixed']} / {c['broken']} ({fmt_p(c['p'])}) "
                     f"| {r['nll']:.3f} | {r['ece']:.2f} | {r['forward_equivalents']:.2f} |")
    return "\n".join(lines) + "\n\n" + verdict(found)


def render_states(ctx: Context, _: dict[str, Any]) -> str:
    parts = []
    s = load(ctx, "cifar10-resnet20-states")
    if s is not None:
        states = sorted(s["states"], key=lambda r: -r["top1"])
        default = next(r for r in s["states"] if all(v == 0 for v in r["state"].values()))
        parts.append(f"Every state of ResNet-20 alone, lossless CIFAR-10, {s['n_images']:,} images (exhaustive "
                     f"search): the default {default['top1']:.2f}; the others "
                     + ", ".join(f"{'/'.join(str(v) for v in r['state'].values())} {r['top1']:.2f}"
                                 for r in states if r is not default)
                     + " (phase index at " + " / ".join(s["search_space"]) + ").")
        lines = ["| group (aligned features, mean) | states | top-1 |", "|---|---|---|"]
        for k, v in s["groups"].items():
            lines.append(f"| {k} | {v['size']} | {v['top1']:.2f} |")
        for b, v in s["hindsight_best"].items():
            lines.append(f"| hindsight best (upper bound, with the default) | {b} | {v:.2f} |")
        parts.append("\n".join(lines))
    clean = load(ctx, "cifar10-resnet20-entropy")
    jpeg = load(ctx, "cifar10-jpeg-resnet20")
    if clean is not None and jpeg is not None:
        head = ["class", "lossless: B=1", "fixed / broken at B=4", "JPEG: B=1", "fixed / broken at B=4"]
        lines = ["Per class, mean aggregation, aligned, B=4 against B=1 (lossless: the report part; JPEG: all "
                 "5,000):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        classes = sorted(p.name for p in (ctx.data / "cifar10/test").iterdir() if p.is_dir()) \
            if (ctx.data / "cifar10/test").is_dir() else [str(i) for i in range(10)]
        per = {}
        for tag, p in (("clean", clean), ("jpeg", jpeg)):
            import torch

            labels = torch.tensor(p["labels"])
            a = _bits(_one(p, aggregate="mean", align=True, budget=1))
            b = _bits(_one(p, aggregate="mean", align=True, budget=4))
            per[tag] = [(100 * float(a[labels == k].float().mean()), int((~a & b)[labels == k].sum()),
                         int((a & ~b)[labels == k].sum())) for k in range(10)]
        for k, cls in enumerate(classes):
            c, j = per["clean"][k], per["jpeg"][k]
            lines.append(f"| {cls} | {c[0]:.1f} | {c[1]} / {c[2]} | {j[0]:.1f} | {j[1]} / {j[2]} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------- figures
def _points(ctx: Context, model: str) -> list[tuple[str, list[tuple[float, float, float, float]]]]:
    """Per method, (cost, top-1, low, high) points: the interval is top-1 at B=1 plus the change's interval."""
    series: list[tuple[str, list[tuple[float, float, float, float]]]] = []

    def add(label: str, ref: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        pts = []
        for r in rows:
            c = change(ref, r)
            pts.append((r["forward_equivalents"], r["top1"], ref["top1"] + c["low"], ref["top1"] + c["high"]))
        if pts:
            series.append((label, sorted(pts)))

    phase_runs = {"cifar10-resnet20": "cifar10-resnet20-entropy", "cifar10-resnet32": "cifar10-resnet32-entropy",
                  "cifar10-resnet44": "cifar10-resnet44-entropy", "cifar10-resnet56": "cifar10-resnet56-entropy",
                  "lite0": "imagenet-lite0", "lite1": "imagenet-lite1", "lite2": "imagenet-lite2"}
    p = load(ctx, phase_runs[model])
    if p is not None:
        for agg in ("mean", "entropy", "learned"):
            rows = _rows(p, aggregate=agg, align=True)
            if rows:
                ref = _one(p, aggregate=agg, align=True, budget=1)
                add(f"phase search, {agg} aggregation", ref, sorted(rows, key=lambda r: r["budget"]))
    if model == "cifar10-resnet20":
        q = load(ctx, "cifar10-resnet20-learned")
        if q is not None and _rows(q, aggregate="learned"):
            ref = _one(q, aggregate="mean", align=True, budget=1)
            add("phase search, learned aggregation", ref, _rows(q, aggregate="learned", align=True))
        tta = [r for r, _ in _tta_rows(ctx) if r["tta"] != "none"]
        if tta:
            plain = _plain_of(ctx)
            searched = {(r["tta"], r["policy"], r["view_budget"]) for r in tta if r["phase_budget"] > 1}
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in tta:
                if (r["tta"], r["policy"], r["view_budget"]) in searched:  # the same views, more phase states
                    label = f"TTA {_tta_label(r)} ({r['b_image']} views) + phase search"
                else:  # more views, one phase state
                    label = f"TTA {r['tta']}, {r['policy']} (more views)"
                groups.setdefault(label, []).append(r)
            for label, rows in groups.items():
                add(label, plain, rows)
    return series


def figure_for(model: str, title: str) -> Callable[[Context, dict[str, Any], Path], None]:
    def draw(ctx: Context, _: dict[str, Any], path: Path) -> None:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = _points(ctx, model)
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
        for i, (label, pts) in enumerate(series):
            xs, ys, lo, hi = zip(*pts)
            style = "o-" if label.startswith("phase") else ("s--" if "+ phases" in label else "^:")
            ax.errorbar(xs, ys, yerr=[[y - lo_ for y, lo_ in zip(ys, lo)], [hi_ - y for y, hi_ in zip(ys, hi)]],
                        fmt=style, ms=3.5, lw=1, capsize=2, label=label, color=plt.cm.tab20(i % 20))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if v in (2, 3, 5, 20, 30) else ""))
        ax.axhline(series[0][1][0][1], color="grey", lw=0.8, ls="--", label="plain model")
        ax.set_xlabel("cost (forward-pass equivalents, FLOPs; log scale)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="lower right", ncol=1 if len(series) < 8 else 2)
        ax.set_title(f"{title}\n(bars: 95% paired interval of the change against the plain model, placed at its top-1)",
                     fontsize=8)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return draw


# ------------------------------------------------------------------------------------------------- experiments
def _experiment(name: str, title: str, runs: list[str], render: Callable[[Context, dict[str, Any]], str], cost: str,
                figure: Callable[[Context, dict[str, Any], Path], None] | None = None) -> None:
    EXPERIMENTS[name] = Experiment(name, title, runs, render, cost, figure)


for depth, cost in ((20, "~3 min"), (56, "~8 min"), (32, "~5 min"), (44, "~6 min")):
    model = f"cifar10-resnet{depth}"
    _experiment(model, f"ResNet-{depth}, lossless CIFAR-10: mean and entropy aggregation", [f"{model}-entropy"],
                render_phase(f"{model}-entropy", f"ResNet-{depth} (`{model}`) on lossless `cifar10/test`, the "
                             "report part (positions 2000-4999; nothing is fitted)"), cost,
                figure_for(model, f"ResNet-{depth}, lossless CIFAR-10 (3,000 report images)"))
_experiment("cifar10-resnet20-learned", "ResNet-20, lossless CIFAR-10: the learned aggregator",
            ["cifar10-resnet20-agg", "cifar10-resnet20-learned"], render_learned, "~10 min")
_experiment("cifar10-criteria", "ResNet-20 and -56, lossless CIFAR-10: criteria",
            [f"cifar10-resnet{d}-{c}" for d in (20, 56) for c in ("entropy", "random", "delta")], render_criteria,
            "~25 min")
_experiment("cifar10-resnet20-tta", "ResNet-20, lossless CIFAR-10: image-space TTA and phase search with it",
            TTA_RUNS, render_tta, "~40 min")
_experiment("cifar10-resnet20-why", "ResNet-20: every state alone, hindsight bound, per class (lossless vs JPEG)",
            ["cifar10-resnet20-states", "cifar10-resnet20-entropy", "cifar10-jpeg-resnet20"], render_states, "~10 min")
for depth in (20, 56):
    _experiment(f"cifar10-jpeg-resnet{depth}", f"ResNet-{depth} on JPEG CIFAR-10 (a distribution shift)",
                [f"cifar10-jpeg-resnet{depth}"],
                render_phase(f"cifar10-jpeg-resnet{depth}", f"ResNet-{depth} on `cifar10-jpeg/test` (JPEG q~75: a "
                             "distribution shift for these models), all images; nothing is fitted"),
                "~5 min" if depth == 20 else "~15 min")
for variant, cost in ((0, "~30 min CPU"), (1, "~45 min CPU"), (2, "~60 min CPU")):
    _experiment(f"imagenet-lite{variant}", f"EfficientNet-Lite{variant} on imagenet-val1300",
                [f"imagenet-lite{variant}"],
                render_phase(f"imagenet-lite{variant}", f"EfficientNet-Lite{variant} "
                             f"(`imagenet-efficientnet-lite{variant}`), {LITE_SPLIT}"
                             + ("; `learned`: the shipped aggregator, trained on positions 0-649" if variant == 0
                                else "")),
                cost, figure_for(f"lite{variant}", f"EfficientNet-Lite{variant}, imagenet-val1300 (650 report images)"))


# Lite0's table also carries the shipped learned aggregator.
def _render_lite0(ctx: Context, extra: dict[str, Any]) -> str:
    text = render_phase("imagenet-lite0", f"EfficientNet-Lite0 (`imagenet-efficientnet-lite0`), {LITE_SPLIT}")(
        ctx, extra)
    return text + ("\n\n`learned`: the shipped Lite0 aggregator (trained on positions 0-649, lr 1e-4, chosen on "
                   "held-out images).")


EXPERIMENTS["imagenet-lite0"].render = _render_lite0


# CamVid (ESPNet): the learned map aggregator, trained on a part of camvid/train, and multi-scale TTA with the phase
# search at matched cost, both on the 101 camvid/val images.
CAMVID_AGG_SUBSET = "0:96"  # of a fixed shuffled order of camvid/train (the last 8 held out): what the CPU allowed


def _camvid_agg_argv(ctx: Context) -> list[str]:
    subset = CAMVID_AGG_SUBSET if ctx.limit is None else f"0:{ctx.limit + 1}"
    return ["-m", "polyglean", "train-aggregator", "--model", "camvid-espnet", "--data", str(ctx.data / "camvid/train"),
            "--labels", str(ctx.data / "camvid/trainannot"), "--subset", subset, "--holdout", "8" if ctx.limit is None
            else "1", "--budget", "4", "--epochs", "6", "--cache", str(ctx.work / "camvid-agg-cache"),
            "--out", str(ctx.work / "espnet-agg.pt"), "--overwrite", "--no-progress"]


RUNS["camvid-espnet-agg"] = Run("camvid-espnet-agg", _camvid_agg_argv, lambda ctx: ctx.work / "espnet-agg.pt",
                                device_flag=None, only_for="camvid-espnet-learned")
_CAMVID = ("--model", "camvid-espnet", "--data", data("camvid/val"), "--labels", data("camvid/valannot"))
eval_run("camvid-espnet-learned", *_CAMVID, "--budgets", "1,4", "--aggregate", "entropy,mean,learned",
         "--aggregator", work("espnet-agg.pt"))
eval_run("camvid-espnet-tta-ms", *_CAMVID, "--budgets", "1,4,6", "--aggregate", "entropy", "--seg-tta", "ms",
         "--seg-tta-budget", "2")  # B=6 and ms (~5.4 forward equivalents) at matched cost; ms with B=2 per view
eval_run("camvid-espnet-ms", *_CAMVID, "--budgets", "1", "--seg-tta", "ms")  # multi-scale alone, all 101 images
RUNS["camvid-espnet-ms"].device_flag = None
RUNS["camvid-espnet-learned"].device_flag = None  # segmentation eval runs on the CPU only
RUNS["camvid-espnet-tta-ms"].device_flag = None


def render_dense(run: str, note: str) -> Callable[[Context, dict[str, Any]], str]:
    def render(ctx: Context, _: dict[str, Any]) -> str:
        sys.path.insert(0, str(REPO / "scripts"))
        from dense_table import table

        payload = load(ctx, run)
        return table(payload) + (f"\n\n{note}" if note and payload is not None else "")

    return render


_experiment("camvid-espnet-learned", "ESPNet, CamVid val: the learned map aggregator",
            ["camvid-espnet-agg", "camvid-espnet-learned"],
            render_dense("camvid-espnet-learned", "`learned`: attention over the candidates of each pixel, trained "
                         "on 88 images of `camvid/train` (4,096 sampled labelled pixels each, random-criterion "
                         "candidates, budget 4); its cost includes the attention's FLOPs at every pixel. "
                         "`learned@default` (control): the module on the default candidate alone."), "~10 min, idle core")
_experiment("camvid-espnet-ms", "ESPNet, CamVid val: multi-scale TTA alone", ["camvid-espnet-ms"],
            render_dense("camvid-espnet-ms", ""), "~6 min, idle core")
_experiment("camvid-espnet-tta", "ESPNet, CamVid val: multi-scale TTA and the phase search at matched cost",
            ["camvid-espnet-tta-ms"], render_dense("camvid-espnet-tta-ms", ""), "~20 min, idle core")


# ------------------------------------------------------------------------------------------------- driver
def _accepts_device(ctx: Context, command: str, cache: dict[str, bool] = {}) -> bool:  # noqa: B006
    if command not in cache:
        out = subprocess.run([ctx.python, "-m", "polyglean", command, "--help"], capture_output=True, text=True,
                             cwd=REPO, env=_env(), check=False).stdout
        cache[command] = "--device" in out
    return cache[command]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_one(ctx: Context, run: Run, log: Callable[[str], None]) -> bool:
    """Runs ``run`` unless it is done; True when its result exists afterwards."""
    if run.done(ctx):
        return True
    argv = run.argv(ctx)
    if ctx.device and run.device_flag and _accepts_device(ctx, run.device_flag):
        argv += ["--device", ctx.device]
    result = run.result(ctx)
    result.parent.mkdir(parents=True, exist_ok=True)
    if result.suffix == ".pt":  # a training run that did not finish: continue its checkpoint
        partial = result.with_name(result.name.replace("-slim", ""))
        if partial.is_file() and "--resume" not in argv:
            argv += ["--resume"]
    lock = result.with_name(result.name + ".lock")
    try:  # another invocation running the same command: leave it to that one
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = int(lock.read_text() or 0) if lock.is_file() else 0
        if pid and _alive(pid):
            log(f"skipping {run.name}: process {pid} is running it")
            return False
        lock.unlink(missing_ok=True)  # left by an interrupted run
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    log(f"running {run.name}: {ctx.python} {' '.join(shlex.quote(a) for a in argv)}")
    logfile = ctx.out / "logs" / f"{run.name}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    tick = time.time()
    try:
        with open(logfile, "w") as f:
            code = subprocess.run([ctx.python, *argv], cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                  check=False).returncode
    finally:
        lock.unlink(missing_ok=True)
    if code != 0 or not result.is_file():
        log(f"FAILED {run.name} (exit {code}); see {logfile}")
        return False
    _record_path(result).write_text(json.dumps({"argv": portable(run.argv(ctx), ctx),
                                                "seconds": time.time() - tick}) + "\n")
    log(f"done {run.name} in {time.time() - tick:.0f} s")
    return True


def render_experiment(ctx: Context, exp: Experiment) -> Path | None:
    """Writes ``OUT/NAME.md`` (and ``.png``) when every run of ``exp`` is done; returns the Markdown path."""
    if not all(RUNS[r].done(ctx) for r in exp.runs if r in RUNS):
        return None
    text = exp.render(ctx, {})
    if exp.figure is not None:
        png = ctx.out / f"{exp.name}.png"
        exp.figure(ctx, {}, png)
        if png.is_file():
            text += f"\n\n![{exp.title}]({{results}}/{exp.name}.png)"
    md = ctx.out / f"{exp.name}.md"
    md.write_text(text + "\n")
    return md


def update_readme(readme: Path, ctx: Context, names: Iterable[str]) -> list[str]:
    """Replaces ``<!-- table:NAME -->...<!-- /table:NAME -->`` blocks with ``OUT/NAME.md``; returns those replaced."""
    text = readme.read_text()
    rel = os.path.relpath(ctx.out, readme.parent)
    done = []
    for name in names:
        md = ctx.out / f"{name}.md"
        start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if not md.is_file() or start not in text or end not in text:
            continue
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        body = md.read_text().replace("{results}", rel).strip()
        text = f"{before}{start}\n{body}\n{end}{after}"
        done.append(name)
    if done:
        tmp = readme.with_name(f".{readme.name}.tmp")
        tmp.write_text(text)
        tmp.replace(readme)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="list the experiments and what is cached")
    what.add_argument("--only", nargs="+", metavar="NAME", help="run these experiments")
    what.add_argument("--all", action="store_true", help="run every experiment, cheapest first")
    what.add_argument("--render", action="store_true", help="only rewrite the tables, figures and README from results")
    p.add_argument("--out", default=str(REPO / "docs" / "results"), help="results folder (default docs/results)")
    p.add_argument("--data-root", default=os.environ.get("POLYGLEAN_DATA") or str(REPO.parent / "shared" / "data"),
                   help="the data (default $POLYGLEAN_DATA or ../shared/data)")
    p.add_argument("--device", help="passed to every command that accepts --device (e.g. cuda)")
    p.add_argument("--limit", type=int, help="N images per command: a smoke run; the README is left alone")
    p.add_argument("--readme", default=str(REPO / "README.md"), help="README whose table blocks are rewritten")
    p.add_argument("--no-readme", action="store_true", help="do not touch the README")
    p.add_argument("--keep-going", action="store_true", help="after a failed run, continue with the next one")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the commands")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    unknown = [n for n in args.only or [] if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment(s) {', '.join(unknown)}; choose from: {', '.join(EXPERIMENTS)}")
    ctx = Context(Path(args.data_root).resolve(), Path(args.out).resolve(), args.limit, args.device, args.python)
    if not args.list and not (ctx.data / "cifar10").is_dir() and not (ctx.data / "imagenet-val1300").is_dir():
        p.error(f"no data at {ctx.data}: pass --data-root or set POLYGLEAN_DATA (the folder holding cifar10/)")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.list:
        for exp in EXPERIMENTS.values():
            state = "cached" if all(RUNS[r].done(ctx) for r in exp.runs) else \
                f"{sum(RUNS[r].done(ctx) for r in exp.runs)}/{len(exp.runs)} runs cached"
            print(f"{exp.name:28s} {exp.cost:12s} {state:18s} {exp.title}")
        return 0
    names = list(EXPERIMENTS) if args.all or args.render else args.only
    failed = []
    if not args.render:
        for name in names:
            for r in EXPERIMENTS[name].runs:
                if not run_one(ctx, RUNS[r], log):
                    failed.append(r)
                    if not args.keep_going:
                        log("stopping (pass --keep-going to continue with the other runs)")
                        break
            if failed and not args.keep_going:
                break
    written = []
    for n in names:
        try:
            if render_experiment(ctx, EXPERIMENTS[n]) is not None:
                written.append(n)
        except Exception as err:  # noqa: BLE001 - one table that cannot be written must not lose the others
            log(f"FAILED to write the table of {n}: {type(err).__name__}: {err}")
            failed.append(n)
    log(f"wrote {', '.join(f'{n}.md' for n in written) or 'no table'} in {ctx.out}")
    if written and args.limit is None and not args.no_readme and Path(args.readme).is_file():
        replaced = update_readme(Path(args.readme), ctx, written)
        log(f"README blocks rewritten: {', '.join(replaced) or 'none (no markers)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
