"""Entry point of the ``polyglean`` command: dispatches to one module per command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from polyglean import __version__
from polyglean.cli import bench as bench_cmd
from polyglean.cli import demo as demo_cmd
from polyglean.cli import eval as eval_cmd
from polyglean.cli import export as export_cmd
from polyglean.cli import inspect as inspect_cmd
from polyglean.cli import train as train_cmd
from polyglean.cli import train_aggregator as train_aggregator_cmd
from polyglean.errors import PolygleanError

COMMANDS = {"demo": demo_cmd, "inspect": inspect_cmd, "eval": eval_cmd, "bench": bench_cmd,
            "train": train_cmd, "train-aggregator": train_aggregator_cmd, "export": export_cmd}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyglean",
        description="Glean the activations that subsampling layers discard: inspect a model's subsampling sites, "
        "run it at other phases, search and aggregate them.",
    )
    parser.add_argument("--version", action="version", version=f"polyglean {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


def _quiet(err: PolygleanError) -> bool:
    """Under torchrun an error is shown once: a rank that stopped because another failed says nothing, and an
    option error (the same on every rank) is shown by rank 0 only."""
    import os

    from polyglean.errors import ArgumentError

    if getattr(err, "quiet", False):
        return True
    return isinstance(err, ArgumentError) and os.environ.get("RANK", "0") != "0"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except PolygleanError as err:  # the user's to fix: one line; anything else is a bug and keeps its traceback
        if not _quiet(err):
            print(f"polyglean {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
