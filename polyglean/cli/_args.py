"""Arguments several commands share."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` (required), ``--weights`` and ``--pretrained``, as :func:`polyglean.models.load_model` takes them."""
    p.add_argument("--model", required=True, help="a preset, torchvision:NAME or timm:NAME")
    p.add_argument("--weights", help="checkpoint for the model (loaded strictly, weights_only)")
    p.add_argument("--pretrained", action="store_true", help="download the library's weights (torchvision/timm)")
