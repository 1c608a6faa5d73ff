"""``polyglean eval --device/--precision``: refused where the machine cannot honour them, B=1 equal to the plain model
run the same way (bf16 on the CPU here; CUDA where a GPU is present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyglean.cli.main import main

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(shared_data: Path, out: Path, *extra: str, limit: int = 24) -> int:
    return main(["eval", "--model", "cifar10-resnet20", "--data", str(shared_data / "cifar10" / "test"),
                 "--limit", str(limit), "--budgets", "1,4", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--json", str(out), *extra])


def _plain(shared_data: Path, limit: int, device: str, precision: str) -> tuple[float, torch.Tensor]:
    from polyglean.data import ImageDataset, limit_dataset
    from polyglean.models import load_model
    from polyglean.runtime import Runtime

    model, pre = load_model("cifar10-resnet20")
    rt = Runtime.resolve(device, precision)
    model = model.to(rt.device)
    subset = limit_dataset(ImageDataset(shared_data / "cifar10" / "test", pre), limit, spread=True)
    logits = []
    for start in range(0, len(subset), 8):  # the batches of the eval run
        x = torch.stack([subset[i][0] for i in range(start, min(start + 8, len(subset)))]).to(rt.device)
        with torch.no_grad(), rt.autocast():
            logits.append(model(x).float().cpu())
    y = torch.tensor([subset[i][1] for i in range(len(subset))])
    z = torch.cat(logits)
    return (z.argmax(-1) == y).float().mean().item() * 100, torch.nn.functional.cross_entropy(z, y).item()


@pytest.mark.parametrize(("argv", "message"), [
    (["--precision", "fp16", "--device", "cpu"], "fp16"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_refused(tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path.joinpath("c").mkdir()
    rc = main(["eval", "--model", "cifar10-resnet20", "--data", str(tmp_path), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_refused_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "cifar10-resnet20", "--data", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_bf16_on_cpu_budget_one_is_the_plain_model(shared_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    out = tmp_path / "r.json"
    assert _run(shared_data, out, "--device", "cpu", "--precision", "bf16") == 0
    payload = json.loads(out.read_text())
    assert payload["config"]["precision"] == "bf16" and payload["config"]["device"] == "cpu"
    row = next(r for r in payload["results"] if r["budget"] == 1)
    top1, nll = _plain(shared_data, 24, "cpu", "bf16")
    assert row["top1"] == pytest.approx(top1) and row["nll"] == pytest.approx(nll, rel=1e-6)


@cuda
@pytest.mark.data
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_eval_on_cuda(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    gpu, cpu = tmp_path / "gpu.json", tmp_path / "cpu.json"
    assert _run(shared_data, gpu, "--device", "cuda", "--precision", precision, limit=64) == 0
    rows = {r["budget"]: r for r in json.loads(gpu.read_text())["results"]}
    top1, nll = _plain(shared_data, 64, "cuda", precision)
    assert rows[1]["top1"] == pytest.approx(top1) and rows[1]["nll"] == pytest.approx(nll, rel=1e-6)
    assert _run(shared_data, cpu, "--device", "cpu", limit=64) == 0
    ref = {r["budget"]: r for r in json.loads(cpu.read_text())["results"]}
    tol = {"fp32": (1.6, 1e-3), "bf16": (5.0, 0.05), "fp16": (3.2, 0.02)}[precision]  # points, NLL
    for b in (1, 4):
        assert abs(rows[b]["top1"] - ref[b]["top1"]) <= tol[0]
        assert abs(rows[b]["nll"] - ref[b]["nll"]) <= tol[1]
