"""The worker's `OutcomeWriter` on the memory twin (both backends): outcomes of the runs that
ended since its last write go in one write, in order, and an outage delays them, never drops
them. (Against a real Redis, the worker's process tests and the chaos suite hold it end to end.)
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from app.fleet.job_state import JobState
from app.stores.abc import RecordedRun
from app.stores.memory import MemoryJobStore
from app.worker.job_run import JobRun
from app.worker.outcome_writer import OutcomeWriter
from tests.helpers import eventually

pytestmark = pytest.mark.anyio


class _Counted(MemoryJobStore):
    """The memory store, counting `record_outcomes` calls (and failing the first `failures`)."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.writes: list[int] = []
        self.failures = failures

    async def record_outcomes(self, outcomes: Sequence[RecordedRun]) -> list[bool]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Redis away")
        self.writes.append(len(outcomes))
        return await super().record_outcomes(outcomes)


def ended(n: int) -> JobRun:
    return JobRun(id=f"j{n}", name="echo", state=JobState.SUCCEEDED, result_json=b"1",
                  fencing_token=n + 1)  # fmt: skip


async def test_the_runs_that_ended_together_are_written_in_one_step() -> None:
    store = _Counted()
    writer = OutcomeWriter(store)
    async with anyio.create_task_group() as tg:
        for n in range(10):  # before the writer runs: all queued at once
            writer.finished(ended(n))
        assert sorted(writer.unwritten_ids()) == sorted(f"j{n}" for n in range(10))
        await tg.start(writer.run)
        await eventually(lambda: writer.written == 10)
        assert store.writes == [10]
        assert writer.unwritten_ids() == []
        writer.finished(ended(10))  # alone: written alone
        await eventually(lambda: writer.written == 11)
        assert store.writes == [10, 1]
        await writer.close(within=1)
    found = await store.outcomes("j3", [4])
    assert found[4].state is JobState.SUCCEEDED


async def test_an_outage_delays_the_outcomes_and_loses_none() -> None:
    store = _Counted(failures=2)
    writer = OutcomeWriter(store)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for n in range(3):
            writer.finished(ended(n))
        await eventually(lambda: writer.written == 3, within=10)
        assert sum(store.writes) == 3
        assert writer.statistics().dropped == 0
        await writer.close(within=1)
