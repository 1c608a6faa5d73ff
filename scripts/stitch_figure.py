"""The quality-vs-cost figure of `polyglean eval --stitch` runs: mIoU and boundary mIoU against measured GFLOPs per
image, every row of every run given (e.g. the last site and the last two sites of one model), with the 95% interval
of each row's change against the native model.

    PYTHONPATH=$PWD python scripts/stitch_figure.py runs/stitch-cgnet-last.json runs/stitch-cgnet-last2.json \
        --out docs/stitch-cgnet-camvid.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polyglean.cli._stitch import plot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by `polyglean eval --stitch ... --json`")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    payloads = [json.loads(f.read_text()) for f in args.runs]
    plot(payloads, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
