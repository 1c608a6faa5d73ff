"""Sweep the timm zoo: one model per family (timm module), small variants first, random weights, through the
four checks of the core tests and the reference executor; write JSON and the README's markdown table.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 5 python scripts/zoo_sweep.py --json zoo.json --markdown zoo.md

Results are appended to the JSON as they come (a rerun skips families already there), so a long sweep can be
stopped and resumed; ``--markdown`` alone rewrites the table from the JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.zoo import ZooResult, candidates, check_model, families  # noqa: E402


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError("time limit of one family reached")


def markdown(rows: list[dict]) -> str:
    works = [r for r in rows if r["status"] == "works"]
    refused = [r for r in rows if r["status"] in ("refused", "error", "timeout")]
    unbuildable = [r for r in rows if r["status"] == "unbuildable"]
    lines = [f"{len(rows)} families tried: {len(works)} work, {len(refused)} refused or failing, "
             f"{len(unbuildable)} not buildable offline.", "",
             "| family | model | input | sites (factor; * off the main path) |", "|---|---|---|---|"]
    for r in sorted(works, key=lambda r: r["family"]):
        lines.append(f"| {r['family']} | `{r['model']}` | {r['input_size'][1]}x{r['input_size'][2]} | "
                     f"{' '.join(r['factors'])} |")
    if refused:
        lines += ["", "| family | model | why |", "|---|---|---|"]
        for r in sorted(refused, key=lambda r: r["family"]):
            reason = r["reason"].replace("|", "/")
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            status = "timeout" if "TimeoutError" in reason else r["status"]
            lines.append(f"| {r['family']} | `{r['model']}` | {status}: {reason} |")
    if unbuildable:
        lines += ["", "Not buildable offline with random weights: "
                  + ", ".join(f"{r['family']} (`{r['model']}`)" for r in unbuildable) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="results, one row per family (appended, resumable)")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--families", nargs="*", help="timm modules to sweep (default: all)")
    p.add_argument("--small", type=int, default=96, help="input size tried first (default 96)")
    p.add_argument("--table-only", action="store_true", help="only rewrite --markdown from --json")
    p.add_argument("--limit", type=int, default=180, help="seconds per family before it is reported as timed out")
    args = p.parse_args(argv)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    done = {r["family"] for r in rows}
    if not args.table_only:
        for family in args.families or families():
            if family in done:
                continue
            result = ZooResult(family, "", "unbuildable", "no model")
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(args.limit)
            try:
                for name in candidates(family):
                    result = ZooResult(family, name, "timeout", f"over {args.limit} s")
                    result = check_model(family, name, args.small)
                    if result.status != "unbuildable":
                        break
            except TimeoutError:
                pass
            finally:
                signal.alarm(0)
            rows.append(result.as_dict())
            args.json.write_text(json.dumps(rows, indent=1))
            print(f"{family:28s} {result.model:40s} {result.status:11s} {result.seconds:6.1f}s {result.reason[:90]}",
                  flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
