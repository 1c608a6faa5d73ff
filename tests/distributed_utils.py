"""Running a function on several gloo processes from a test, as torchrun would (RANK, WORLD_SIZE, MASTER_*)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    record: dict[str, Any]
    try:
        record = {"ok": True, "value": fn(rank, *args)}
    except BaseException as exc:  # reported to the test, which asserts on it
        record = {"ok": False, "type": type(exc).__name__, "message": str(exc),
                  "traceback": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record, default=str))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)  # the interpreter's own teardown has been seen to take minutes on a loaded machine


def spawn(fn: Callable[..., Any], world: int, tmp: Path, *args: Any, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Runs ``fn(rank, *args)`` in ``world`` fresh processes; returns each rank's record (value, or error type and
    message). A process still running after ``timeout`` seconds is killed and reported as ``hung``."""
    ctx = mp.get_context("spawn")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_child, args=(r, world, port, str(tmp), fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    records = []
    for r, p in enumerate(procs):
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            records.append({"ok": False, "type": "hung", "message": f"rank {r} still running after {timeout}s"})
            continue
        path = tmp / f"rank{r}.json"
        records.append(json.loads(path.read_text()) if path.is_file()
                       else {"ok": False, "type": "died", "message": f"exit code {p.exitcode}"})
    return records
