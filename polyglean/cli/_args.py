"""Arguments several commands share."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` (required), ``--weights``, ``--pretrained`` and ``--random-weights``, as
    :func:`polyglean.models.load_model` takes them."""
    p.add_argument("--model", required=True, help="a preset, torchvision:NAME or timm:NAME")
    p.add_argument("--weights", help="checkpoint for the model (loaded strictly, weights_only)")
    p.add_argument("--pretrained", action="store_true", help="download the library's weights (torchvision/timm)")
    p.add_argument("--random-weights", type=int, nargs="?", const=0, metavar="SEED",
                   help="run the model with random weights on purpose, initialised from SEED (default 0); "
                        "torchvision/timm models need this, --weights or --pretrained")


def model_source(args: argparse.Namespace) -> dict[str, Any]:
    """The weights options of :func:`add_model_arguments` as keyword arguments of ``load_model``."""
    return {"weights": args.weights, "pretrained": args.pretrained, "random_weights": args.random_weights}
