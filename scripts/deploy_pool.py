"""Pools the adaptive-budget results of ``deploy_table.py`` runs whose test parts are disjoint (cross-fitting).

Two runs with their parts swapped (``--fit 0:2500 --test 2500:`` and ``--fit 2500: --test 0:2500``) report every
image once, each time with the budget chosen and the stop rule calibrated on the other part only. Pooled, the paired
intervals are over all the images: plain against the fixed budget chosen on the fit part, plain against the adaptive
rule at a half and a third of that budget's extra cost, and the adaptive rule against the fixed budget.

    python scripts/deploy_pool.py runs/deploy/jpeg-r20.json runs/deploy/jpeg-r20-swap.json \
        --json runs/deploy/jpeg-r20-pooled.json --plot runs/deploy/jpeg-r20-pooled.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from polyglean.io import write_json
from polyglean.provenance import machine
from polyglean.stats import mcnemar, paired_bootstrap


def interval(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Change from ``a`` to ``b`` (per-image correct, 0/1) in points, with its 95% paired bootstrap interval."""
    d = paired_bootstrap(a.float() * 100, b.float() * 100)
    return {"delta": d.delta, "low": d.low, "high": d.high, "significant": d.significant,
            "mcnemar_p": mcnemar(a.bool(), b.bool()).p_value}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="deploy_table.py JSON files of one model and folder, disjoint test parts")
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    args = p.parse_args(argv)

    runs = [json.loads(Path(f).read_text()) for f in args.runs]
    for f, r in zip(args.runs, runs):
        if "per_image" not in r:
            sys.exit(f"{f}: no per-image results (written by an older deploy_table.py); run it again")
        if (r["model"], r["data"], r["budget"]) != (runs[0]["model"], runs[0]["data"], runs[0]["budget"]):
            sys.exit(f"{f}: model {r['model']!r}, data {r['data']!r}, budget {r['budget']} differ from {args.runs[0]}")
    tests = [r["test"] for r in runs]
    if len(set(tests)) != len(tests):
        sys.exit(f"the runs' test parts must be disjoint, got {tests}")

    def cat(key: str) -> torch.Tensor:
        return torch.cat([torch.tensor(r["per_image"][key]) for r in runs])

    plain, fixed = cat("plain_correct"), cat("best_fixed_correct")
    n = plain.numel()
    weights = [r["test_images"] / n for r in runs]
    fixed_cost = float(cat("best_fixed_cost").float().mean())
    gain = 100 * float(fixed.float().mean() - plain.float().mean())
    out: dict[str, Any] = {"model": runs[0]["model"], "data": runs[0]["data"], "runs": args.runs, "images": n,
                           "tests": tests, "best_fixed_per_run": [r["best_fixed"] for r in runs],
                           "chosen_on": [r.get("best_chosen_on", "test") for r in runs], "machine": machine(),
                           "plain_top1": 100 * float(plain.float().mean()),
                           "fixed": {"top1": 100 * float(fixed.float().mean()), "cost": fixed_cost,
                                     **interval(plain, fixed)}}
    adaptive = []
    for name in ("half", "third"):
        right, cost = cat(f"adaptive_{name}_correct"), cat(f"adaptive_{name}_cost")
        kept = 100 * float(right.float().mean() - plain.float().mean())
        adaptive.append({"share_of_extra_cost": name, "top1": 100 * float(right.float().mean()),
                         "cost": float(cost.float().mean()), "gain_kept": kept / gain if gain else None,
                         **interval(plain, right), "vs_fixed": interval(fixed, right)})
    out["adaptive"] = adaptive
    # every fixed budget, pooled (the runs' top-1 and mean cost, weighted by their images)
    budgets = [row["budget"] for row in runs[0]["fixed"]]
    out["fixed_budgets"] = [{"budget": b, "top1": sum(w * r["fixed"][b - 1]["top1"] for w, r in zip(weights, runs)),
                             "cost": sum(w * r["fixed"][b - 1]["cost"] for w, r in zip(weights, runs))}
                            for b in budgets]
    write_json(args.json, out)

    f = out["fixed"]
    print(f"{out['model']} on {out['data']}: {n} images, each reported once (budgets chosen on the other part: "
          f"{out['best_fixed_per_run']})")
    print(f"plain {out['plain_top1']:.2f}; fixed {f['top1']:.2f} at {f['cost']:.2f}: "
          f"{f['delta']:+.2f} [{f['low']:+.2f}, {f['high']:+.2f}] (McNemar p {f['mcnemar_p']:.3g})")
    for a in adaptive:
        v = a["vs_fixed"]
        print(f"adaptive ({a['share_of_extra_cost']} of the extra cost) {a['top1']:.2f} at {a['cost']:.2f}: "
              f"vs plain {a['delta']:+.2f} [{a['low']:+.2f}, {a['high']:+.2f}], vs fixed {v['delta']:+.2f} "
              f"[{v['low']:+.2f}, {v['high']:+.2f}], gain kept {a['gain_kept']}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        rows = out["fixed_budgets"]
        ax.plot([r["cost"] for r in rows], [r["top1"] for r in rows], "o-", label="fixed budget B=1..")
        for r, marker, label in [(f, "D", "fixed budget chosen on the fit part"),
                                 (adaptive[0], "s", "adaptive, 1/2 of its extra cost"),
                                 (adaptive[1], "^", "adaptive, 1/3 of its extra cost")]:
            ax.errorbar(r["cost"], r["top1"], yerr=[[r["delta"] - r["low"]], [r["high"] - r["delta"]]], fmt=marker,
                        capsize=3, label=label)
        ax.set_xlabel("mean cost (forward equivalents, FLOPs)")
        ax.set_ylabel("top-1 (%)")
        where = "/".join(Path(out["data"]).resolve().parts[-2:])
        ax.set_title(f"{out['model']} on {where}: {n} images, cross-fitted", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
