"""Sweep the timm zoo: one model per family (timm module), small variants first, random weights, through the
four checks of the core tests and the reference executor; write JSON and the README's markdown table.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 5 python scripts/zoo_sweep.py --json zoo.json --markdown zoo.md

Results are appended to the JSON as they come (a rerun skips families already there, unless ``--redo``), so a
long sweep can be stopped and resumed; ``--table-only`` rewrites the table from the JSON: into ``--markdown``,
and/or into ``--readme`` between its ``<!-- zoo-table -->`` and ``<!-- /zoo-table -->`` lines. To recheck some
families after a fix:

    python scripts/zoo_sweep.py --json scripts/zoo_sweep.json --families byobnet starnet --redo --readme README.md
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.zoo import ZooResult, candidates, check_model, families  # noqa: E402


class FamilyTimeout(BaseException):
    """One family's time is up (a BaseException, so that no ``except Exception`` of the check swallows it)."""


def _alarm(signum: int, frame: object) -> None:
    raise FamilyTimeout("time limit of one family reached")


START, END = "<!-- zoo-table -->", "<!-- /zoo-table -->"


def markdown(rows: list[dict]) -> str:
    works = [r for r in rows if r["status"] == "works"]
    refused = [r for r in rows if r["status"] == "refused"]
    failing = [r for r in rows if r["status"] in ("error", "timeout")]
    nosites = [r for r in rows if r["status"] == "no sites"]
    unbuildable = [r for r in rows if r["status"] == "unbuildable"]
    slow = [r for r in failing if r["status"] == "timeout"]
    lines = [f"{len(rows)} families tried: {len(works)} work, {len(refused)} refused with a clear reason, "
             f"{len(nosites)} without subsampling, {len(failing) - len(slow)} failing, {len(slow)} too slow for "
             f"the sweep, {len(unbuildable)} not buildable offline.", "",
             "| family | model | input | sites (factor; ° off the main path) |", "|---|---|---|---|"]
    for r in sorted(works, key=lambda r: r["family"]):
        factors = " ".join(f.replace("*", "°") for f in r["factors"])
        lines.append(f"| {r['family']} | `{r['model']}` | {r['input_size'][1]}x{r['input_size'][2]} | {factors} |")
    others = refused + nosites + failing
    if others:
        lines += ["", "| family | model | status | why |", "|---|---|---|---|"]
        for r in sorted(others, key=lambda r: r["family"]):
            reason = r["reason"].replace("|", "/")
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            status = {"error": "fails", "timeout": "too slow for the sweep", "no sites": "no subsampling"}.get(
                r["status"], r["status"])
            if r["status"] == "timeout":
                reason = f"over the limit of {r['seconds']:.0f} s per family"
            lines.append(f"| {r['family']} | `{r['model']}` | {status} | {reason} |")
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
    p.add_argument("--readme", type=Path, help=f"rewrite the table in this file, between {START} and {END}")
    p.add_argument("--table-only", action="store_true", help="only rewrite --markdown/--readme from --json")
    p.add_argument("--redo", action="store_true", help="recheck the --families already in --json")
    p.add_argument("--limit", type=int, default=150, help="seconds per family before it is reported as timed out")
    args = p.parse_args(argv)
    if args.redo and not args.families:
        p.error("--redo rechecks the families named by --families; name them")
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    if args.readme is not None:
        text = args.readme.read_text()
        if text.count(START) != 1 or text.count(END) != 1:
            p.error(f"{args.readme} must hold one {START} line and one {END} line")
    if args.redo:
        rows = [r for r in rows if r["family"] not in set(args.families)]
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
                    result = ZooResult(family, name, "timeout", f"over {args.limit} s", seconds=float(args.limit))
                    result = check_model(family, name, args.small)
                    if result.status != "unbuildable":
                        break
            except FamilyTimeout:
                pass
            finally:
                signal.alarm(0)
            rows = [r for r in rows if r["family"] != family] + [result.as_dict()]
            args.json.write_text(json.dumps(rows, indent=1))
            print(f"{family:28s} {result.model:40s} {result.status:11s} {result.seconds:6.1f}s {result.reason[:90]}",
                  flush=True)
    rows.sort(key=lambda r: r["family"])
    args.json.write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    if args.markdown:
        args.markdown.write_text(table)
    if args.readme is not None:
        text = args.readme.read_text()
        head, rest = text.split(START, 1)
        args.readme.write_text(head + START + "\n" + table + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
