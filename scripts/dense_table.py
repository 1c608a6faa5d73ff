"""Markdown tables of segmentation results from the JSON `polyglean eval --labels ... --json FILE` writes.

    python scripts/dense_table.py docs/results/runs/camvid-espnet-learned.json > docs/results/camvid-espnet-learned.md

Every figure is read from the JSON (no number is typed by hand): one row per result, in the JSON's order; the Δ
column is the paired bootstrap over images (recomputing the set's confusion-matrix mIoU) that eval wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = ("TTA", "B", "aggregate", "aligned", "mIoU", "Δ mIoU [95% CI]", "pixel acc", "class acc",
           "boundary mIoU (3 px)", "pixels fixed / broken", "cost (fwd eq.)")


def _delta(row: dict[str, Any]) -> str:
    d = row.get("miou_delta")
    if not d:
        return "—"
    cell = f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
    return f"**{cell}**" if d["low"] > 0 or d["high"] < 0 else cell


def table(payload: dict[str, Any]) -> str:
    """The rows of one eval JSON as a markdown table, with a line saying what was evaluated."""
    cfg = payload.get("config", {})
    lines = [f"{payload.get('model')} on {payload.get('num_images')} images of {Path(str(payload.get('data'))).name}; "
             f"criterion {cfg.get('criterion')}; search space {', '.join(cfg.get('search_space', []))}; Δ: paired "
             "bootstrap over images, 95%; cost: forward equivalents (FLOPs over one plain forward)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in payload["results"]:
        cells = (r["tta"], str(r["budget"]), r["aggregate"] + (" (control)" if "@default" in r["aggregate"] else ""),
                 "yes" if r["align"] else "no", f"{r['miou']:.2f}", _delta(r), f"{r['pixel_acc']:.2f}",
                 f"{r['mean_class_acc']:.2f}", f"{r['boundary_miou_k3']:.2f}",
                 f"{r['pixels_fixed']} / {r['pixels_broken']}", f"{r['forward_equivalents']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="eval JSON file(s); one table each")
    args = p.parse_args()
    print("\n\n".join(table(json.loads(Path(f).read_text())) for f in args.json))


if __name__ == "__main__":
    main()
