"""What the command modules share: model arguments, list parsing, output-path checks, progress bars, tables and
result files. Command modules import this one and the library, never each other."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from polyglean.errors import ArgumentError
from polyglean.io import check_writable, write_json
from polyglean.provenance import machine

__all__ = [
    "Bars", "add_model_arguments", "add_runtime_arguments", "check_outputs", "delta_cells", "int_list", "load_model",
    "machine", "model_source", "names", "runtime",
    "phase_net", "refuse_repeats",
    "table", "write_results",
]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` (required), ``--weights`` and ``--pretrained``, as :func:`polyglean.models.load_model` takes them."""
    p.add_argument("--model", required=True, help="a preset, torchvision:NAME or timm:NAME")
    p.add_argument("--weights", help="checkpoint for the model (loaded strictly, weights_only)")
    p.add_argument("--pretrained", action="store_true", help="download the library's weights (torchvision/timm)")
    p.add_argument("--random-weights", type=int, nargs="?", const=0, metavar="SEED",
                   help="run the model with random weights on purpose, initialised from SEED (default 0); "
                        "torchvision/timm models need this, --weights or --pretrained")


def model_source(args: argparse.Namespace) -> dict[str, Any]:
    """The weights options of :func:`add_model_arguments` as keyword arguments of ``load_model``."""
    return {"weights": args.weights, "pretrained": args.pretrained, "random_weights": args.random_weights}


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` (see :class:`polyglean.runtime.Runtime`)."""
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu); under "
                                    "torchrun each process takes the GPU of its local rank")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default), or bf16/fp16 under autocast (fp16 needs a GPU)")


def runtime(args: argparse.Namespace) -> Any:
    """The checked :class:`polyglean.runtime.Runtime` of ``--device`` and ``--precision``."""
    from polyglean.runtime import Runtime

    return Runtime.resolve(args.device, args.precision)


def load_model(spec: str, weights: str | None = None, *, downsample: str | None = None,
               pretrained: bool = False, random_weights: int | None = None) -> tuple[Any, Any]:
    """:func:`polyglean.experiments.load_eval_model` for a command: the model in eval mode and its preprocessing."""
    from polyglean.experiments import load_eval_model

    model, preprocess = load_eval_model(spec, weights, downsample=downsample, pretrained=pretrained,
                                        random_weights=random_weights)
    return model.eval(), preprocess


def phase_net(model: Any, input_size: Sequence[int]) -> Any:
    """:class:`polyglean.phase.net.PhaseNet` of ``model`` for a command's input size."""
    from polyglean.phase.net import PhaseNet

    return PhaseNet(model, input_size=tuple(input_size))


def names(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (order kept, repeats kept: the caller refuses them)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def int_list(flag: str) -> Callable[[str], list[int]]:
    """An argparse ``type`` for comma-separated integers, sorted, without repeats."""

    def parse(text: str) -> list[int]:
        try:
            values = sorted({int(v) for v in names(text)})
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        return values

    return parse


def refuse_repeats(flag: str, values: Sequence[str]) -> list[str]:
    """``values`` unless one is named twice (an ArgumentError naming it)."""
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ArgumentError(f"{flag} names {v!r} twice ({','.join(values)}); name each once")
        seen.add(v)
    return list(values)


def check_outputs(**paths: str | None) -> None:
    """Checks, before any work, that every given output path can be written (``flag=path`` pairs).

    Raises:
        ArgumentError: a directory, a missing or unwritable folder, or two outputs at one path.
    """
    given = {flag: p for flag, p in paths.items() if p}
    for flag, path in given.items():
        check_writable(path, f"--{flag.replace('_', '-')}")
    resolved: dict[Path, str] = {}
    for flag, path in given.items():
        key = Path(path).resolve()
        if key in resolved:
            raise ArgumentError(f"--{resolved[key]} and --{flag.replace('_', '-')} both write {path!r}")
        resolved[key] = flag.replace("_", "-")


def write_results(path: str | None, payload: dict[str, Any]) -> None:
    """Writes the result JSON atomically (stamped with the machine), if a path was given."""
    if path:
        write_json(path, {**payload, "machine": payload.get("machine") or machine()})


class Bars:
    """tqdm progress bars driven by the library's ``progress(stage, done, total)`` callback, one per stage.

    Args:
        prefix: shown before each stage (e.g. the model).
        enabled: False draws nothing.
    """

    def __init__(self, prefix: str, enabled: bool = True) -> None:
        self.prefix = prefix
        self.enabled = enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, unit="img", desc=f"{self.prefix} {stage}", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def table(cols: Sequence[str], rows: Iterable[Sequence[str]], head: str | None = None) -> str:
    """Right-aligned plain-text columns under an optional heading line."""
    body = [tuple(cols), *[tuple(r) for r in rows]]
    widths = [max(len(r[i]) for r in body) for i in range(len(cols))]
    lines = [head] if head else []
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body])


def delta_cells(row: dict[str, Any]) -> tuple[str, str]:
    """``"+0.40 [-0.10, +0.90]"`` (top-1 change in points with its 95% interval) and McNemar's p, or dashes."""
    if "delta_top1" not in row:
        return "-", "-"
    low, high = row["delta_top1_ci"]
    return f"{row['delta_top1']:+.2f} [{low:+.2f}, {high:+.2f}]", f"{row['mcnemar_p']:.3g}"
