"""Shared fixtures: where the real data lives, and how tests that need it behave.

Tests that read ``../shared/data`` carry ``@pytest.mark.data`` and use the ``shared_data`` fixture. Without the
data they are skipped with the reason; with ``POLYGLEAN_REQUIRE_DATA=1`` (set by ``.ci/run``) a missing folder is a
failure instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("POLYGLEAN_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


if "POLYGLEAN_DATA" not in os.environ and (_data_root() / "DATA.md").is_file():
    # Preset weights are looked up under $POLYGLEAN_DATA only (never relative to the working directory).
    os.environ["POLYGLEAN_DATA"] = str(_data_root())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real data (``../shared/data`` or ``$POLYGLEAN_DATA``)."""
    root = _data_root()
    if not (root / "DATA.md").is_file():
        msg = f"real data not found at {root} (set POLYGLEAN_DATA to the folder holding DATA.md)"
        if os.environ.get("POLYGLEAN_REQUIRE_DATA") == "1":
            pytest.fail(msg + "; POLYGLEAN_REQUIRE_DATA=1 forbids skipping")
        pytest.skip(msg)
    return root


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
