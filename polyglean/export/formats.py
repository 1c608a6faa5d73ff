"""Writing a module as TorchScript, ``torch.export`` (``.pt2``) or ONNX, with a dynamic batch dimension, checked
against the eager module before the file is written."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.io import write_atomic

__all__ = ["FORMATS", "export_module", "format_from_path", "onnx_outputs"]

FORMATS = ("torchscript", "onnx", "pt2")
_SUFFIX = {".onnx": "onnx", ".pt2": "pt2", ".ts": "torchscript", ".torchscript": "torchscript"}
ONNX_OPSET = 18
TOLERANCE = 1e-4

log = logging.getLogger(__name__)


def format_from_path(path: str | Path, fmt: str | None) -> str:
    """The format named, or the one the file's suffix says; refuses a disagreement or an unknown suffix."""
    suffix = Path(path).suffix.lower()
    implied = _SUFFIX.get(suffix)
    if fmt is None:
        if implied is None:
            raise ArgumentError(f"cannot tell the export format from {str(path)!r}: give --format "
                                f"({', '.join(FORMATS)}) or a suffix {', '.join(_SUFFIX)}")
        return implied
    if fmt not in FORMATS:
        raise ArgumentError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if implied is not None and implied != fmt:
        raise ArgumentError(f"--format {fmt} but the file name {str(path)!r} says {implied}; make them agree")
    return fmt


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=4096)


def _exported(module: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, (example,), dynamic_shapes={"x": {0: _batch_dim()}}, strict=False)
    except Exception as err:  # torch.export raises many kinds; the first line names the op that failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{type(module).__name__} cannot be exported with torch.export ({type(err).__name__}: "
                         f"{first})") from err


def onnx_outputs(data: bytes, x: Tensor) -> Tensor:
    """Runs an ONNX model (bytes) on ``x`` in onnxruntime (CPU) and returns its first output."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("onnxruntime is not installed: pip install 'polyglean[export]'") from None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def _check(what: str, got: Tensor, want: Tensor) -> None:
    diff = float((got.float() - want.float().cpu()).abs().max())
    if not diff <= TOLERANCE:
        raise ModelError(f"the {what} export differs from the eager module by {diff:.3g} (more than {TOLERANCE}); "
                         "it is not written")


@torch.no_grad()
def export_module(module: nn.Module, example: Tensor, path: str | Path, fmt: str) -> dict[str, float]:
    """Exports ``module`` to ``path`` with a dynamic batch dimension, after checking the exported graph against
    the eager module on ``example`` and on a batch of another size (max abs difference <= 1e-4).

    Returns:
        The largest difference measured for each checked batch size.
    """
    if fmt not in FORMATS:
        raise ArgumentError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    module = module.eval()
    other = torch.cat([example, example[:1]]) if example.shape[0] > 1 else example.repeat(2, 1, 1, 1)
    checks = {}
    if fmt == "pt2":
        program = _exported(module, example)
        runner = program.module()
        for x in (example, other):
            _check("pt2", runner(x), module(x))
            checks[f"batch{x.shape[0]}"] = float((runner(x) - module(x)).abs().max())
        write_atomic(path, lambda f: torch.export.save(program, f))
    elif fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError:
            raise ModelError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'polyglean[export]'") \
                from None
        program = _exported(module, example)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its steps on stdout
                onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                                 dynamic_shapes={"x": {0: _batch_dim()}})
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"{type(module).__name__} cannot be exported to ONNX ({type(err).__name__}: "
                             f"{first})") from err
        data = onnx_program.model_proto.SerializeToString()
        for x in (example, other):
            got = onnx_outputs(data, x)
            _check("ONNX", got, module(x))
            checks[f"batch{x.shape[0]}"] = float((got - module(x).cpu()).abs().max())
        write_atomic(path, lambda f: f.write(data))
    else:
        try:
            with warnings.catch_warnings():  # the trace fixes the spatial size on purpose; the batch stays free
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(module, example, check_trace=False)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"{type(module).__name__} cannot be traced to TorchScript ({type(err).__name__}: "
                             f"{first})") from err
        for x in (example, other):
            _check("TorchScript", traced(x), module(x))
            checks[f"batch{x.shape[0]}"] = float((traced(x) - module(x)).abs().max())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; still asked for
            write_atomic(path, lambda f: torch.jit.save(traced, f))
    return checks
