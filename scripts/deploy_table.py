"""Pay only where it helps: adaptive budgets and exported phase ensembles, measured on held-out images.

Splits a labelled folder into a fit part and a test part (``--fit START:STOP`` and ``--test START:STOP`` of the
fixed shuffled order that ``--subset`` uses), then

1. runs the search to ``--budget`` on both parts (criterion entropy, mean of aligned features) and reports, on the
   test part, accuracy against mean cost (forward equivalents, measured per image) for every fixed budget and for
   the confidence stop rule at every threshold (the curve), and runs the adaptive search for real at the costs
   calibrated on the fit part to a half and a third of the best fixed budget's extra cost;
2. for each K of ``--states``, chooses K states on the fit part (among all states of the search space when it has
   at most 16, else among the 16 the search above kept most often on the fit part), builds the ``PhaseEnsemble``,
   exports it to ONNX, and reports its test accuracy against the plain model and the search at B = K (paired
   intervals), and its latency in eager PyTorch and onnxruntime against the plain model (batch 1 and 32, median
   of repeats, one process, interleaved).

The best fixed budget is the most accurate one on the test part (``--choose-on test``, the default) or, without
looking at the test images, on the fit part (``--choose-on fit``).

    python scripts/deploy_table.py --model cifar10-resnet20 --data ../shared/data/cifar10/test \
        --fit 0:2500 --test 2500: --json runs/deploy/r20.json --plot runs/deploy/r20.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from polyglean.data import ImageDataset, parse_subset, subset_dataset
from polyglean.export import PhaseEnsemble
from polyglean.export.formats import export_module
from polyglean.export.select import collect_features, select_states, space_states
from polyglean.io import write_json
from polyglean.models import load_model
from polyglean.phase.net import PhaseNet
from polyglean.provenance import machine
from polyglean.search import PhaseSearch
from polyglean.search.stop import ConfidenceStop, calibrate_threshold
from polyglean.stats import mcnemar, paired_bootstrap


def run_search(search: PhaseSearch, loader: DataLoader, budgets: list[int], desc: str,
               device: torch.device | None = None) -> dict[str, Any]:
    """Per image: correct and cost (forward equivalents) at each budget, plain confidence; seconds; the states kept.
    The batches run on ``device`` (the search's net must be there); everything kept is on the CPU."""
    correct: dict[int, list] = {b: [] for b in {1, *budgets}}
    cost: dict[int, list] = {b: [] for b in {1, *budgets}}
    conf, labels = [], []
    seconds = dict.fromkeys({1, *budgets}, 0.0)
    budgets = sorted({1, *budgets})
    kept: Counter[tuple[int, ...]] = Counter()
    for x, y in tqdm(loader, desc=desc, file=sys.stderr, leave=False):
        r = search.run(x if device is None else x.to(device), budgets=budgets)
        r.logits = {b: v.cpu() for b, v in r.logits.items()}
        kept.update(tuple(s) for s in r.states.flatten(0, 1).tolist())
        per_forward = r.forward_flops / x.shape[0]
        for b in budgets:
            correct[b].append(r.logits[b].argmax(-1) == y)
            cost[b].append(r.image_flops_by_budget[b] / per_forward)
            seconds[b] += r.seconds_by_budget[b]
        conf.append(ConfidenceStop.confidence(r.logits[1]))
        labels.append(y)
    return {"correct": {b: torch.cat(v) for b, v in correct.items()}, "cost": {b: torch.cat(v) for b, v in cost.items()},
            "conf": torch.cat(conf), "labels": torch.cat(labels), "seconds": seconds, "kept": kept}


def interval(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    d = paired_bootstrap(a.float() * 100, b.float() * 100)
    return {"delta": d.delta, "low": d.low, "high": d.high, "significant": d.significant,
            "mcnemar_p": mcnemar(a, b).p_value}


def median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--fit", required=True, help="START:STOP of the shuffled order: the images to fit on")
    p.add_argument("--test", required=True, help="START:STOP: the images to report on (disjoint from --fit)")
    p.add_argument("--budget", type=int, default=15)
    p.add_argument("--states", default="2,4,8", help="the K to export, comma-separated; 'none' skips the export")
    p.add_argument("--choose-on", choices=("test", "fit"), default="test",
                   help="the part on which the best fixed budget (the adaptive rule's budget) is chosen")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", help="where the searches run (cpu, cuda, cuda:N, mps; default: cpu); the exported "
                                    "ensembles are built, checked and timed on the CPU either way")
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    args = p.parse_args(argv)

    from polyglean.errors import ArgumentError
    from polyglean.runtime import resolve_device

    try:  # an unknown or absent device is refused here, before any work
        device = resolve_device(args.device or "cpu")
    except ArgumentError as err:
        p.error(str(err))
    torch.set_num_threads(1)
    model, preprocess = load_model(args.model)
    net = PhaseNet(model.to(device), input_size=preprocess.input_size)
    data = ImageDataset(args.data, preprocess)
    fit_range, test_range = parse_subset(args.fit), parse_subset(args.test)
    fit, test = subset_dataset(data, *fit_range), subset_dataset(data, *test_range)
    fit_loader = DataLoader(fit, batch_size=args.batch_size)
    test_loader = DataLoader(test, batch_size=args.batch_size)
    search = PhaseSearch(net, budget=args.budget, criterion="entropy", aggregate="mean", align=True)
    budgets = list(range(1, args.budget + 1))
    out: dict[str, Any] = {"model": args.model, "data": args.data, "fit": args.fit, "test": args.test,
                           "fit_images": len(fit), "test_images": len(test), "budget": args.budget,
                           "search_space": [s.name for s in search.search_space], "machine": machine(),
                           "device": str(device)}

    # 1. fixed budgets on both parts; the best fixed budget (chosen on --choose-on); the adaptive curve on the test part
    t = run_search(search, test_loader, budgets, "test search", device)
    f = run_search(search, fit_loader, budgets, "fit search", device)
    plain = t["correct"][1]
    fixed, fixed_fit = [], []
    for b in budgets:
        fixed.append({"budget": b, "top1": 100 * float(t["correct"][b].float().mean()),
                      "cost": float(t["cost"][b].mean()), **interval(plain, t["correct"][b])})
        fixed_fit.append({"budget": b, "top1": 100 * float(f["correct"][b].float().mean()),
                          "cost": float(f["cost"][b].mean()), **interval(f["correct"][1], f["correct"][b])})
    out["fixed"], out["fixed_fit"] = fixed, fixed_fit
    chooser = fixed if args.choose_on == "test" else fixed_fit
    top_b = max(chooser[1:], key=lambda r: r["top1"])["budget"]
    best = fixed[top_b - 1]
    out["best_fixed"], out["best_chosen_on"] = top_b, args.choose_on
    curve = []
    for q in torch.linspace(0, 1, 41).tolist():  # the last point: nobody stops (many confidences are exactly 1)
        thr = float(torch.quantile(t["conf"], q)) if q > 0 else 0.0
        stop = t["conf"] >= thr if q < 1 else torch.zeros_like(t["conf"], dtype=torch.bool)
        right = torch.where(stop, plain, t["correct"][top_b])
        cost = torch.where(stop, torch.ones_like(t["cost"][top_b]), t["cost"][top_b])
        curve.append({"threshold": thr if q < 1 else None, "top1": 100 * float(right.float().mean()),
                      "cost": float(cost.mean())})
    out["adaptive_curve"] = curve

    # the adaptive search for real, its threshold calibrated on the fit part (from the fit search above: the
    # plain confidence and the measured cost of the search to the best budget, per fit image)
    extra = best["cost"] - 1.0
    real = []
    # per test image (in the order of --test), so that two runs with swapped parts can be pooled (deploy_pool.py)
    per_image = {"plain_correct": plain.int().tolist(), "best_fixed_correct": t["correct"][top_b].int().tolist(),
                 "best_fixed_cost": [round(v, 5) for v in t["cost"][top_b].tolist()]}
    for name, share in (("half", 0.5), ("third", 1 / 3)):
        target = 1.0 + share * extra
        thr = calibrate_threshold(f["conf"], f["cost"][top_b], target)
        fit_stops = f["conf"] >= thr
        info = {"rule": "confidence", "threshold": thr, "target": target, "images": len(fit),
                "achieved": float(torch.where(fit_stops, torch.ones_like(f["cost"][top_b]), f["cost"][top_b]).mean()),
                "stopped_at_1": float(fit_stops.float().mean())}
        adaptive = PhaseSearch(net, budget=top_b, criterion="entropy", aggregate="mean", align=True,
                               stop=ConfidenceStop(min(max(thr, 0.0), 1.0)))
        a = run_search(adaptive, test_loader, [top_b], f"adaptive {name}", device)
        right = a["correct"][top_b]
        gain = 100 * float(right.float().mean() - plain.float().mean())
        per_image[f"adaptive_{name}_correct"] = right.int().tolist()
        per_image[f"adaptive_{name}_cost"] = [round(v, 5) for v in a["cost"][top_b].tolist()]
        real.append({"share_of_extra_cost": name, "calibration": info, "top1": 100 * float(right.float().mean()),
                     "cost": float(a["cost"][top_b].mean()), "seconds": a["seconds"][top_b],
                     "stopped_at_1": float((t["conf"] >= thr).float().mean()),
                     "gain_kept": gain / (best["top1"] - fixed[0]["top1"]) if best["top1"] != fixed[0]["top1"] else None,
                     **interval(plain, right), "vs_best_fixed": interval(t["correct"][top_b], right)})
    out["adaptive_real"], out["per_image"] = real, per_image
    out["seconds_fixed"] = t["seconds"]
    write_json(args.json, out)  # part 1 is kept should the exports not finish

    # 2. exported ensembles
    ks = [] if args.states == "none" else [int(v) for v in args.states.split(",")]
    ensembles = []
    if ks:
        if device.type != "cpu":  # onnxruntime runs on the CPU here: build, check and time everything there
            model = model.cpu()
            net = PhaseNet(model, input_size=preprocess.input_size)
        space = [s.name for s in search.search_space]
        states_all = space_states(net, space)
        if len(states_all) <= 16:
            pool = states_all
        else:  # the 16 states the search above kept most often on the fit part, the default first
            zero = tuple([0] * len(net.sites))
            pool = [zero] + [s for s, _ in f["kept"].most_common() if s != zero][:15]
        feats, logits, labels = collect_features(net, fit_loader, pool)
        example_1 = next(iter(DataLoader(test, batch_size=1)))[0]
        example_32 = next(iter(DataLoader(test, batch_size=32)))[0]
        import onnxruntime as ort

        def session_of(path: Path) -> Any:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            return ort.InferenceSession(path.read_bytes(), opts, providers=["CPUExecutionProvider"])

        with tempfile.TemporaryDirectory() as tmp:
            plain_path = Path(tmp) / "plain.onnx"
            export_module(PhaseEnsemble(net, [tuple([0] * len(net.sites))]).eval(), example_32[:4], plain_path, "onnx")
            plain_session = session_of(plain_path)
            for k in ks:
                sel = select_states(net, feats, logits, labels, pool, k)
                ens = PhaseEnsemble(net, sel.states, aggregate="mean", align=True).eval()
                path = Path(tmp) / f"k{k}.onnx"
                checks = export_module(ens, example_32[:4], path, "onnx")
                right = []
                with torch.no_grad():
                    for x, y in test_loader:
                        right.append(ens(x).argmax(-1) == y)
                right_t = torch.cat(right)
                session = session_of(path)
                name = session.get_inputs()[0].name
                plain_name = plain_session.get_inputs()[0].name
                latency = {}
                for batch, xb in (("1", example_1), ("32", example_32)):
                    arr = xb.numpy()
                    fns = {"plain_eager": lambda: model(xb), "ensemble_eager": lambda: ens(xb),
                           "plain_onnxruntime": lambda: plain_session.run(None, {plain_name: arr}),
                           "ensemble_onnxruntime": lambda: session.run(None, {name: arr})}
                    with torch.no_grad():
                        for fn in fns.values():
                            fn()
                        rounds = {key: [] for key in fns}
                        for _ in range(args.repeats):  # interleaved, so machine load hits all alike
                            for key, fn in fns.items():
                                rounds[key].append(median_seconds(fn, 1))
                    med = {key: statistics.median(v) for key, v in rounds.items()}
                    latency[batch] = {**{f"{key}_ms": 1000 * v for key, v in med.items()},
                                      "ensemble_eager_vs_plain": med["ensemble_eager"] / med["plain_eager"],
                                      "ensemble_onnxruntime_vs_plain_onnxruntime":
                                          med["ensemble_onnxruntime"] / med["plain_onnxruntime"]}
                ensembles.append({"k": k, "states": [list(s) for s in sel.states], "fit_nll": sel.nll,
                                  "top1": 100 * float(right_t.float().mean()), "vs_plain": interval(plain, right_t),
                                  "search_top1": fixed[k - 1]["top1"] if k <= len(fixed) else None,
                                  "vs_search": interval(t["correct"][k], right_t) if k in t["correct"] else None,
                                  "segment_runs": ens.segment_runs, "export_check": checks, "latency": latency})
                print(f"K={k}: top-1 {ensembles[-1]['top1']:.2f} (plain {fixed[0]['top1']:.2f}, search B={k} "
                      f"{fixed[k - 1]['top1']:.2f}); latency b1 x{latency['1']['ensemble_eager_vs_plain']:.2f} eager, "
                      f"x{latency['1']['ensemble_onnxruntime_vs_plain_onnxruntime']:.2f} ORT", file=sys.stderr)
    out["ensembles"] = ensembles
    write_json(args.json, out)
    print(f"best fixed budget B={top_b} (chosen on the {args.choose_on} part)")
    print("fixed: " + ", ".join(f"B={r['budget']} {r['top1']:.2f}@{r['cost']:.2f}" for r in fixed))
    for r in real:
        print(f"adaptive ({r['share_of_extra_cost']} of B={top_b}'s extra cost): {r['top1']:.2f} at {r['cost']:.2f} "
              f"(calibrated {r['calibration']['achieved']:.2f} on fit), gain kept {r['gain_kept']}, "
              f"vs plain {r['delta']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}], "
              f"vs B={top_b} {r['vs_best_fixed']['delta']:+.2f} "
              f"[{r['vs_best_fixed']['low']:+.2f}, {r['vs_best_fixed']['high']:+.2f}]")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["cost"] for r in fixed], [r["top1"] for r in fixed], "o-", label="fixed budget B=1..")
        ax.plot([r["cost"] for r in curve], [r["top1"] for r in curve], "-", label=f"confidence stop (B={top_b})")
        ax.plot([r["cost"] for r in real], [r["top1"] for r in real], "s",
                label=f"adaptive, calibrated on the fit part\nto 1/2 and 1/3 of B={top_b}'s extra cost")
        for rows, color in ((fixed, "C0"), (real, "C2")):  # the paired 95% interval of the change vs plain
            for r in rows:
                ax.errorbar(r["cost"], r["top1"], yerr=[[r["delta"] - r["low"]], [r["high"] - r["delta"]]],
                            color=color, alpha=0.3)
        ax.annotate(f"B={top_b} (best on {args.choose_on} part)", (best["cost"], best["top1"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.set_xlabel("mean cost (forward equivalents, FLOPs)")
        ax.set_ylabel("top-1 (%)")
        where = "/".join(Path(args.data).resolve().parts[-2:])
        ax.set_title(f"{args.model} on {where}: {len(test)} held-out images", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
