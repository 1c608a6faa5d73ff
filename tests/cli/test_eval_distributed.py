"""``torchrun --nproc-per-node 2 -m polyglean eval`` on the CPU (gloo) against a one-process run, on real images:
identical metrics, a bad image stopping every rank with the error shown once, a killed run resumed by another
number of processes, more processes than images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyglean.cli.main import main

pytestmark = [pytest.mark.data, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
METRICS = ("aggregate", "align", "budget", "top1", "top5", "nll", "ece", "fixed", "broken", "delta_top1",
           "delta_top1_ci", "delta_nll", "delta_nll_ci", "mcnemar_p", "n_images", "forward_equivalents")


@pytest.fixture(scope="module")
def images(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real CIFAR-10 test images of every class (a temporary copy, so a test can add a bad one)."""
    root = tmp_path_factory.mktemp("cifar")
    for cls in sorted((shared_data / "cifar10" / "test").iterdir()):
        (root / cls.name).mkdir()
        for f in sorted(cls.iterdir())[:3]:
            shutil.copy(f, root / cls.name / f.name)
    return root


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "cifar10-resnet20", "--data", str(data), "--budgets", "1,4", "--batch-size", "4",
            "--aggregate", "entropy,mean", "--device", "cpu", "--workers", "0", "--no-progress", "--json", str(out),
            *extra]


def _env(shared_data: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "POLYGLEAN_DATA": str(shared_data)}


def _torchrun(argv: list[str], shared_data: Path, nproc: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "polyglean", *argv]
    return subprocess.Popen(cmd, env=_env(shared_data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, **kw)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun's workers may sit in their own process groups)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _metrics(path: Path) -> list[dict]:
    return [{k: r.get(k) for k in METRICS} for r in json.loads(path.read_text())["results"]]


@pytest.fixture(scope="module")
def single(images: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "one.json"
    os.environ.setdefault("POLYGLEAN_DATA", str(shared_data))
    assert main(_argv(images, out)) == 0
    return out


def test_two_processes_give_the_one_process_metrics(images: Path, shared_data: Path, single: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "two.json"
    proc = _torchrun(_argv(images, out), shared_data)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert _metrics(out) == _metrics(single)  # equal, not close
    payload = json.loads(out.read_text())
    assert payload["config"]["processes"] == 2 and payload["results"][0]["n_images"] == 30
    assert stdout.count("criterion=entropy") == 1  # one table, from rank 0
    assert not (tmp_path / "two.json.parts").exists()  # saved batches removed once the JSON is written


def test_a_bad_image_stops_every_rank_with_one_message(images: Path, shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "truck" / "zz_broken.png").write_bytes(b"not a png")  # the last image: a batch of rank 1
    proc = _torchrun(_argv(data, tmp_path / "r.json"), shared_data)
    _, stderr = proc.communicate(timeout=900)  # no hang: the ranks agree after every batch
    assert proc.returncode != 0
    assert stderr.count("polyglean eval: error:") == 1, stderr[-3000:]
    assert "zz_broken.png" in stderr
    assert not (tmp_path / "r.json").exists()


def test_a_killed_run_resumes_with_another_number_of_processes(images: Path, shared_data: Path, single: Path,
                                                               tmp_path: Path) -> None:
    out, parts, ref = tmp_path / "r.json", tmp_path / "parts", tmp_path / "ref.json"
    small = ("--batch-size", "1")  # 30 batches: the run is killed long before its end
    assert main(_argv(images, ref, *small)) == 0
    proc = _torchrun(_argv(images, out, "--parts", str(parts), *small), shared_data)
    saved: list[Path] = []
    while proc.poll() is None and len(saved) < 2:
        saved = list(parts.glob("*/batch-*.pt"))
        time.sleep(0.01)
    _kill_tree(proc.pid)
    proc.communicate()
    kept = len(list(parts.glob("*/batch-*.pt")))
    if kept == 0 or out.exists():
        pytest.skip("the run finished before it could be killed")
    assert kept < 30
    assert main(_argv(images, out, "--parts", str(parts), *small)) == 2  # saved batches, no --resume: refused
    assert main(_argv(images, out, "--parts", str(parts), "--resume", *small)) == 0
    assert _metrics(out) == _metrics(ref)
    assert not any(parts.glob("*/batch-*.pt"))


def test_more_processes_than_images(images: Path, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = _torchrun(_argv(images, out, "--limit", "1"), shared_data)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert {r["n_images"] for r in json.loads(out.read_text())["results"]} == {1}
