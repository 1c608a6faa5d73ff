"""``polyglean inspect MODEL``: the subsampling sites of a model, what they discard and what a search there costs."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from polyglean.phase.net import PhaseNet

DEFAULT_MODEL = "imagenet-efficientnet-lite0"


def add_parser(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="list a model's subsampling sites",
        description="Find the subsampling sites of a model by rule and show, for each: its ops, factor, input -> "
        "output size, the share of activations the default phase discards, and the share of the model's FLOPs "
        "from the site on (the cost of evaluating one more phase state there).",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"a preset, torchvision:NAME or timm:NAME (default: {DEFAULT_MODEL}); "
                        "`polyglean inspect --list` shows the presets")
    p.add_argument("--weights", help="checkpoint to load (state dict; loaded strictly)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="spatial input size (default: the model's preprocessing size)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the model presets and exit")
    p.add_argument("--device", help="where to run the model while counting (cpu, cuda, cuda:N, mps; default: cuda "
                                    "when available)")


def describe(net: PhaseNet, model_name: str, model: nn.Module | None = None) -> dict[str, Any]:
    """The site table of ``net`` as plain data (what ``--json`` prints); with ``model`` (the module ``net`` wraps),
    also the output stride of the à trous network built from each site."""
    from polyglean.phase.atrous import atrous_strides
    from polyglean.phase.stitch import stitch_strides

    flops = net.segment_flops()
    total = sum(flops)
    strides = stitch_strides(net)
    atrous = atrous_strides(model, net) if model is not None else [None] * len(net.sites)
    return {
        "model": model_name,
        "input_size": list(net.input_size),
        "total_factor": list(net.total_factor),
        "max_reduction": list(net.max_reduction),
        "total_gflops": total / 1e9,
        "sites": [
            {
                "index": s.index,
                "name": s.name,
                "ops": list(s.ops),
                "factor": list(s.factor),
                "level": s.level,
                "reduction": list(s.reduction),
                "main_path": s.main_path,
                "in_size": list(s.in_size),
                "out_size": list(s.out_size),
                "discarded": s.discarded,
                "flops_from_site": net.flops_from(s),
                "stitched_stride": list(strides[s.index]) if strides[s.index] else None,
                "atrous_stride": list(atrous[s.index]) if atrous[s.index] else None,
            }
            for s in net.sites
        ],
    }


def format_table(info: dict[str, Any]) -> str:
    c, h, w = info["input_size"]
    lines = [f"{info['model']}  input {c}x{h}x{w}  {info['total_gflops']:.3f} GFLOPs  "
             f"total reduction {info['total_factor'][0]}x{info['total_factor'][1]}"]
    largest = info.get("max_reduction", info["total_factor"])
    if list(largest) != list(info["total_factor"]):
        lines[0] += f" (largest path {largest[0]}x{largest[1]})"
    if not info["sites"]:
        lines.append("no subsampling sites found: no strided convolution, pooling or slicing (patches cut by a "
                     "reshape, as in NaFlexViT, are not one), so there is nothing to glean")
        return "\n".join(lines)
    rows = [("#", "site", "ops", "factor", "in -> out", "reduction", "path", "discarded", "FLOPs from site",
             "stitched OS", "à trous OS")]
    for s in info["sites"]:
        rows.append((
            str(s["index"]), s["name"], ", ".join(s["ops"]), "{}x{}".format(*s["factor"]),
            "{}x{} -> {}x{}".format(*s["in_size"], *s["out_size"]), "{}x{}".format(*s.get("reduction", s["factor"])),
            "main" if s.get("main_path", True) else "off", f"{s['discarded']:.0%}",
            f"{s['flops_from_site']:.1%}",
            "{}x{}".format(*s["stitched_stride"]) if s.get("stitched_stride") else "-",
            "{}x{}".format(*s["atrous_stride"]) if s.get("atrous_stride") else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    if info.get("dense_search_space"):
        lines.append("segmentation model: the dense search searches the path to the output but its first site ("
                     + ", ".join(info["dense_search_space"]) + ")")
    elif not any(s.get("main_path", True) for s in info["sites"]):
        lines.append("no site lies on the main path (the branches subsample in parallel): the default search refuses "
                     "this model; name the sites to search (--search-space) and use --aggregate-on logits")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from polyglean.cli._common import load_model, phase_net
    from polyglean.models import list_models

    if args.list:
        print("\n".join(list_models()))
        print("or any torchvision:NAME / timm:NAME")
        return 0
    from polyglean.experiments import check_input_size

    if args.input_size:
        check_input_size((3, *args.input_size))  # before the model is even loaded
    from polyglean.runtime import Runtime

    rt = Runtime.resolve(args.device)  # the FLOPs are counted on this device
    # The sites and FLOPs do not depend on the weights' values: without --weights, seeded random ones will do.
    from polyglean.models.loader import has_default_weights

    model, preprocess = load_model(args.model, args.weights,
                                   random_weights=None if args.weights or has_default_weights(args.model) else 0)
    size = preprocess.input_size
    if args.input_size:
        size = (size[0], *args.input_size)
        check_input_size(size)
    net = phase_net(model.to(rt.device), size)
    info = describe(net, args.model, model)
    from polyglean.models import get_preset

    if args.model in list_models() and get_preset(args.model).task == "segmentation":
        from polyglean.search.dense import main_path

        info["dense_search_space"] = [s.name for s in main_path(net.sites)[1:]]
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
