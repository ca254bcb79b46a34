"""A run's fencing token: what a job reads of it, how an attaching attempt takes the run over,
and how a worker back from an absence stops the runs the fleet gave to another (asyncio, trio)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from app import current_run
from app.core.clock import ManualClock
from app.errors import JobAlreadyExists
from app.fleet.batch_job import AttemptRecord, BatchJob
from app.fleet.job_state import JobState
from app.fleet.pod_info import decode_pod_info
from app.stores.abc import WriteResult
from app.stores.memory import MemoryJobStore, MemoryPodRegistry
from app.worker.job_master import JobMaster
from app.worker.job_registry import JobRegistry
from app.worker.reporter import ApplicationInfoReportJob, PodIdentity
from app.worker.run_context import RunContext
from app.worker.superseded_runs import SupersededRuns

pytestmark = pytest.mark.anyio

IDENTITY = PodIdentity(ip="10.0.0.7", pid=4242, host="h", grpc_port=9091, start_datetime="t0")


async def whoami() -> list[object]:
    run = current_run()
    return [run.job_id, run.name, run.fencing_token]


def whoami_in_a_thread() -> list[object]:
    run = current_run()
    return [run.job_id, run.name, run.fencing_token]


async def hold(seconds: float = 60) -> None:
    await anyio.sleep(seconds)


@pytest.fixture
async def master() -> AsyncIterator[JobMaster]:
    registry = JobRegistry()
    registry.register(whoami, name="whoami")
    registry.register(whoami_in_a_thread, name="whoami_thread")
    registry.register(hold, name="hold")
    async with anyio.create_task_group() as tg:
        master = JobMaster(registry, core_size=2, max_size=4)
        await tg.start(master.run)
        yield master
        tg.cancel_scope.cancel()


async def test_a_job_reads_its_run_and_fencing_token(master: JobMaster) -> None:
    run = await master.run_and_wait("whoami", job_id="j1", fencing_token=7)
    assert run.result() == ["j1", "whoami", 7]
    run = await master.run_and_wait("whoami_thread", job_id="j2", fencing_token=9)
    assert run.result() == ["j2", "whoami_thread", 9]  # a plain `def` in a worker thread too
    run = await master.run_and_wait("whoami", job_id="j3")
    assert run.result() == ["j3", "whoami", 0]  # sent directly: no orchestrator, no token


async def test_current_run_outside_a_run_says_so() -> None:
    with pytest.raises(LookupError, match="only known inside a job's run"):
        current_run()
    assert RunContext(job_id="x", name="y").fencing_token == 0


async def test_an_attaching_newer_attempt_takes_the_run_over(master: JobMaster) -> None:
    master.submit_nowait("hold", job_id="h1", fencing_token=3)
    with pytest.raises(JobAlreadyExists):
        master.submit_nowait("hold", job_id="h1", fencing_token=5)  # an adopting orchestrator
    assert master.get("h1").fencing_token == 5
    with pytest.raises(JobAlreadyExists):
        master.submit_nowait("hold", job_id="h1", fencing_token=4)  # an older one does not
    assert master.get("h1").fencing_token == 5
    assert [r.id for r in master.live()] == ["h1"]
    await master.cancel("h1")
    assert master.live() == []


HERE = "10.0.0.7:9091"


async def _job_with_attempts(store: MemoryJobStore, job_id: str, *workers: str) -> int:
    """A job whose attempts went to `workers` in turn, each under a new token; the last token."""
    job = BatchJob(job_id=job_id, job_type="hold")
    await store.submit(job, bound=100)
    token = 0
    for number, worker in enumerate(workers, 1):
        token = await store.next_token(job_id)
        job.attempts.append(
            AttemptRecord(number=number, worker=worker, fencing_token=token, started_at=0.0)
        )
        job.state = JobState.RUNNING
        assert await store.write(job, token) is WriteResult.WRITTEN
    return token


async def test_back_from_an_absence_a_worker_stops_the_runs_taken_over(master: JobMaster) -> None:
    store = MemoryJobStore()
    kept = await _job_with_attempts(store, "kept", HERE)
    await _job_with_attempts(store, "taken", HERE, "10.0.0.8:9091")  # started again elsewhere
    # taken over by another orchestrator that is about to attach to this very run
    await _job_with_attempts(store, "adopted", HERE, HERE)
    master.submit_nowait("hold", job_id="kept", fencing_token=kept)
    master.submit_nowait("hold", job_id="taken", fencing_token=1)
    master.submit_nowait("hold", job_id="adopted", fencing_token=1)
    master.submit_nowait("hold", job_id="direct")  # no token: not the fleet's to judge
    check = SupersededRuns(store, master, address=HERE)
    await check(30.0)
    taken = await master.wait_finished("taken")
    assert taken.state is JobState.CANCELLED
    assert taken.error.startswith("superseded: another attempt (fencing token 2, on 10.0.0.8:9091)")
    assert sorted(r.id for r in master.live()) == ["adopted", "direct", "kept"]
    assert (check.checks, check.stopped) == (1, 1)


async def test_the_reporter_calls_back_after_an_absence_and_lists_live_runs(
    master: JobMaster,
) -> None:
    clock = ManualClock()
    registry = MemoryPodRegistry()
    returns: list[float] = []

    async def on_return(away: float) -> None:
        returns.append(away)

    report = ApplicationInfoReportJob(
        registry, master, IDENTITY, interval_seconds=5, clock=clock, on_return=on_return,
        unrecorded_ids=lambda: ["ended-not-recorded"],
    )  # fmt: skip
    master.submit_nowait("hold", job_id="live")
    assert await report.report()
    clock.advance(9.9)  # within two intervals: nobody took this worker for gone
    assert await report.report()
    assert returns == []
    clock.advance(12.0)  # frozen, or cut off, for longer than that
    assert await report.report()
    assert returns == [pytest.approx(12.0)]
    raw = await registry.get(report.key)
    assert raw is not None
    assert decode_pod_info(raw).live_job_ids == ["live", "ended-not-recorded"]
