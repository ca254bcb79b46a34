"""Fixtures of the chaos scenarios: a fleet of real processes on a private redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.chaos.harness import ChaosFleet


@pytest.fixture
def chaos(tmp_path: Path, orch_stubs: SimpleNamespace) -> Iterator[ChaosFleet]:
    fleet = ChaosFleet(tmp_path, orch_stubs)
    fleet.start_redis()
    try:
        yield fleet
    finally:
        fleet.close()
