"""Sharding, gathering, failure and resume of :mod:`polyglean.distributed`, on 2 gloo processes on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyglean.distributed import (
    BatchStore,
    DistContext,
    PeerFailed,
    global_batches,
    init_distributed,
    run_sharded,
    together,
)
from polyglean.errors import ArgumentError, DataError
from tests.distributed_utils import spawn


def _compute_factory(log: Path | None, rank: int, fail_at: int | None = None):
    def compute(batches: list[list[int]]):
        for batch in batches:
            if log is not None:
                with open(log / f"computed{rank}.txt", "a") as f:
                    f.write(json.dumps(batch) + "\n")
            if fail_at is not None and fail_at in batch:
                raise DataError(f"image {fail_at} is corrupt")
            yield {"index": batch, "value": torch.tensor(batch, dtype=torch.float64) ** 2}
    return compute


def _sharded(rank: int, n: int, batch_size: int, log: str, fail_at: int | None = None,
             store_root: str | None = None, resume: bool = False, stop_after: int | None = None) -> list | None:
    ctx = init_distributed("cpu", timeout_s=60)
    assert ctx.world_size > 1 and ctx.rank == rank and ctx.backend == "gloo"
    store = BatchStore(store_root, {"n": n, "bs": batch_size}, resume=resume) if store_root else None
    compute = _compute_factory(Path(log), rank, fail_at)
    if stop_after is not None:  # a run that is killed after a few batches
        inner = compute

        def compute(batches):  # noqa: F811
            for i, payload in enumerate(inner(batches)):
                if i == stop_after:
                    raise KeyboardInterrupt
                yield payload
    out = run_sharded(global_batches(n, batch_size), compute, ctx=ctx, store=store)
    if out is None:
        return None
    return [p["index"] for p in out] + [[float(v) for p in out for v in p["value"]]]


def _computed(log: Path) -> list[list[int]]:
    out = []
    for f in sorted(log.glob("computed*.txt")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


class TestSingleProcess:
    def test_batches(self) -> None:
        assert global_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
        assert global_batches(0, 3) == []
        with pytest.raises(ArgumentError, match="batch size"):
            global_batches(5, 0)

    def test_run_without_process_group(self, tmp_path: Path) -> None:
        out = run_sharded(global_batches(5, 2), _compute_factory(tmp_path, 0))
        assert [p["index"] for p in out] == [[0, 1], [2, 3], [4]]
        assert torch.equal(torch.cat([p["value"] for p in out]), torch.arange(5.0, dtype=torch.float64) ** 2)

    def test_error_propagates(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match="image 3"):
            run_sharded(global_batches(5, 2), _compute_factory(tmp_path, 0, fail_at=3))

    def test_together(self) -> None:
        with pytest.raises(DataError), together(DistContext()):
            raise DataError("x")

    def test_store_refuses_old_batches_without_resume(self, tmp_path: Path) -> None:
        store = BatchStore(tmp_path, {"a": 1})
        store.save(0, {"x": torch.ones(2)})
        with pytest.raises(ArgumentError, match="--resume"):
            BatchStore(tmp_path, {"a": 1})
        assert BatchStore(tmp_path, {"a": 2}).done() == set()  # other settings: another folder
        resumed = BatchStore(tmp_path, {"a": 1}, resume=True)
        assert resumed.done() == {0} and torch.equal(resumed.load(0)["x"], torch.ones(2))

    def test_resume_computes_only_the_missing(self, tmp_path: Path) -> None:
        store = BatchStore(tmp_path / "parts", {"a": 1})
        for k, batch in enumerate(global_batches(7, 2)):
            if k != 2:
                store.save(k, {"index": batch, "value": torch.tensor(batch, dtype=torch.float64) ** 2})
        out = run_sharded(global_batches(7, 2), _compute_factory(tmp_path, 0),
                          store=BatchStore(tmp_path / "parts", {"a": 1}, resume=True))
        assert _computed(tmp_path) == [[4, 5]]
        assert [p["index"] for p in out] == global_batches(7, 2)


class TestTwoProcesses:
    def test_each_batch_once_and_gathered_in_order(self, tmp_path: Path) -> None:
        records = spawn(_sharded, 2, tmp_path, 11, 3, str(tmp_path))
        assert all(r["ok"] for r in records), records
        assert records[1]["value"] is None
        *indices, values = records[0]["value"]
        assert indices == global_batches(11, 3)
        assert values == [float(i * i) for i in range(11)]
        computed = _computed(tmp_path)
        assert sorted(computed) == global_batches(11, 3)  # every batch once, none padded or repeated
        assert json.loads((tmp_path / "computed1.txt").read_text().splitlines()[0]) == [3, 4, 5]

    def test_more_processes_than_batches(self, tmp_path: Path) -> None:
        records = spawn(_sharded, 2, tmp_path, 2, 4, str(tmp_path))
        assert all(r["ok"] for r in records), records
        assert records[0]["value"][:-1] == [[0, 1]]
        assert not (tmp_path / "computed1.txt").exists()

    def test_a_failing_rank_stops_all_with_its_error_once(self, tmp_path: Path) -> None:
        records = spawn(_sharded, 2, tmp_path, 12, 2, str(tmp_path), 7)
        by_type = {r["type"] for r in records}
        assert "hung" not in by_type, records
        failing, other = records[1], records[0]  # image 7 is in batch 3, which rank 1 runs
        assert failing["type"] == "DataError" and "image 7" in failing["message"]
        assert other["type"] == "PeerFailed" and "image 7" not in other["message"]
        assert len(_computed(tmp_path)) <= 4  # stopped at the failing step, not at the end

    def test_killed_run_resumes_with_another_world_size(self, tmp_path: Path) -> None:
        parts = str(tmp_path / "parts")
        records = spawn(_sharded, 2, tmp_path / "a", 10, 2, str(tmp_path / "a"), None, parts, False, 1)
        assert not any(r["ok"] for r in records)
        store = BatchStore(parts, {"n": 10, "bs": 2}, resume=True)
        saved = store.done()
        assert saved == {0, 1}
        # resumed by one process
        out = run_sharded(global_batches(10, 2), _compute_factory(tmp_path / "a", 0), store=store)
        assert [p["index"] for p in out] == global_batches(10, 2)
        # and a run interrupted by one process, resumed by two
        store2 = BatchStore(tmp_path / "p2", {"n": 10, "bs": 2})
        for k in (0, 3):
            store2.save(k, {"index": global_batches(10, 2)[k],
                            "value": torch.tensor(global_batches(10, 2)[k], dtype=torch.float64) ** 2})
        records = spawn(_sharded, 2, tmp_path / "b", 10, 2, str(tmp_path / "b"), None, str(tmp_path / "p2"), True)
        assert all(r["ok"] for r in records), records
        assert sorted(_computed(tmp_path / "b")) == [global_batches(10, 2)[k] for k in (1, 2, 4)]
        assert records[0]["value"][-1] == [float(i * i) for i in range(10)]
