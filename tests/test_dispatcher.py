"""The dispatcher in one process, on asyncio and trio: the memory stores, in-process workers.

Every fault the process tests show with real processes is shown here in milliseconds: a worker
that refuses, dies, goes silent; deadlines; cancel wherever the job is; a dispatcher that stops
(is cancelled) at each await point of a job's way, with another finishing its jobs exactly once
(httpcore's tests/test_cancellations.py does the same for its pool).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import pytest
import trio.testing

from app.config import OrchestratorConfig
from app.core.balancer import PowerOfTwoChoices
from app.core.breaker import BreakerState
from app.core.clock import LoopClock
from app.core.lifecycle import Lifecycle
from app.fleet.batch_job import BatchJob
from app.fleet.job_signature import advertised, signature_of
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodInfo, PodStatus, encode_pod_info
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.memory_worker_client import MemoryWorker, MemoryWorkerClient
from app.orchestrator.service import OrchestratorService
from app.orchestrator.worker_client import Completion, Reply, WorkerClient
from app.pb import orchestrator as pb
from app.stores.abc import JobStore, WriteResult
from app.stores.memory import MemoryJobEvents, MemoryJobStore, MemoryPodRegistry
from tests.helpers import eventually, twin_jobs

pytestmark = pytest.mark.anyio

REPORT = 0.1  # the workers' report interval: stale after 0.2 s
CONFIG = OrchestratorConfig(
    max_inflight=8,
    claim_idle_seconds=0.3,
    retry_base_seconds=0.01,
    retry_max_seconds=0.05,
    breaker_failure_threshold=2,
    breaker_open_seconds=60,
    keepalive_seconds=0.1,
    keepalive_timeout_seconds=0.2,
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """trio under MockClock: the dispatcher's sleeps and the jobs' cost no real time there."""
    if request.param == "trio":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0.01)})
    return "asyncio"


class Fleet:
    """The memory stores, workers that report to a memory registry, and dispatchers."""

    def __init__(self, tg: anyio.abc.TaskGroup, workers: int) -> None:
        self.tg = tg
        self.clock = LoopClock()
        self.store = MemoryJobStore(retention_seconds=600)
        self.events = MemoryJobEvents(self.store)
        self.registry = MemoryPodRegistry()
        self.workers = {f"10.0.0.{i}:9091": MemoryWorker(twin_jobs())
                        for i in range(1, workers + 1)}  # fmt: skip
        self.client = MemoryWorkerClient(self.workers, store=self.store)
        self.reporting = dict.fromkeys(self.workers, True)
        self.queue_capacity = 0  # what the workers report
        self.dispatchers: list[Dispatcher] = []

    async def start(self) -> None:
        await self.tg.start(self.client.run)
        await self._report()
        self.tg.start_soon(self._report_forever)

    async def _report(self) -> None:
        now = self.clock.now()
        for address, worker in self.workers.items():
            if not self.reporting[address]:
                continue
            ip, port = address.split(":")
            status = PodStatus.DRAINING if worker.draining else PodStatus.IDLE
            info = PodInfo(
                grpc_port=int(port), status=status, ip=ip, max_size=8, capacity=4,
                queue_capacity=self.queue_capacity,
                update_datetime=now.isoformat(), update_epoch_ms=int(now.timestamp() * 1000),
                job_names=sorted(worker.jobs), live_job_ids=worker.live_ids(),
                job_signatures=advertised(
                    (name, signature_of(fn)) for name, fn in sorted(worker.jobs.items())
                ).signatures,
            )  # fmt: skip
            await self.registry.put(f"wpm-apps:{ip}:{port}", encode_pod_info(info), 60)

    async def _report_forever(self) -> None:
        while True:
            await anyio.sleep(REPORT)
            await self._report()

    async def dispatcher(
        self,
        consumer: str,
        tg: anyio.abc.TaskGroup | None = None,
        *,
        store: JobStore | None = None,
        client: WorkerClient | None = None,
        config: OrchestratorConfig = CONFIG,
        refresh_seconds: float = 0.05,
    ) -> Dispatcher:
        """A dispatcher with a directory of its own, started in `tg` (default: the fleet's)."""
        tg = tg or self.tg
        # a slow refresh takes reports for fresh for as long (else all go stale between two)
        directory = WorkerDirectory(
            self.registry, report_interval_seconds=max(REPORT, refresh_seconds),
            refresh_seconds=refresh_seconds, clock=self.clock,
        )  # fmt: skip
        await tg.start(directory.run)
        dispatcher = Dispatcher(
            store or self.store, self.events, directory, client or self.client,
            PowerOfTwoChoices(), config, consumer=consumer, clock=self.clock,
        )  # fmt: skip
        await tg.start(dispatcher.run)
        self.dispatchers.append(dispatcher)
        return dispatcher

    async def submit(self, job_id: str, job_type: str = "echo", **params: Any) -> BatchJob:
        options = {k: params.pop(k) for k in ("deadline", "max_attempts", "retry") if k in params}
        job = BatchJob(
            job_id=job_id,
            job_type=job_type,
            params={k: str(v) for k, v in params.items()},
            deadline_at=self.clock.timestamp() + options.get("deadline", 30),
            max_attempts=options.get("max_attempts", 3),
            retry_on_failure=options.get("retry", False),
            submitted_at=self.clock.timestamp(),
        )
        await self.store.submit(job, bound=100)
        return job

    async def wait_state(self, job_id: str, *states: JobState, within: float = 10) -> BatchJob:
        with anyio.fail_after(within):
            while True:
                job = await self.store.get(job_id)
                if job is not None and job.state in states:
                    return job
                with anyio.move_on_after(0.5):
                    await self.events.wait_changed(job_id)

    async def wait_until(self, condition: Callable[[], bool], within: float = 10) -> None:
        await eventually(condition, within=within)

    async def wait_queue_empty(self) -> None:
        await eventually(lambda: self.store.statistics().queue == 0)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with anyio.create_task_group() as tg:
        f = Fleet(tg, workers=2)
        await f.store.ensure_group()
        await f.start()
        yield f
        tg.cancel_scope.cancel()


def started(fleet: Fleet, job_id: str) -> int:
    return sum(w.started[job_id] for w in fleet.workers.values())


async def test_a_job_runs_once_and_its_entry_is_acked(fleet: Fleet) -> None:
    d = await fleet.dispatcher("o1")
    await fleet.submit("j1", a=1)
    job = await fleet.wait_state("j1", JobState.SUCCEEDED)
    assert job.result_json == '{"a":"1"}'
    assert [a.outcome for a in job.attempts] == ["SUCCEEDED"]
    assert started(fleet, "j1") == 1
    await fleet.wait_until(lambda: d.statistics().inflight == 0)
    await fleet.wait_queue_empty()
    s = d.statistics()
    assert (s.state, s.dispatched, s.succeeded, s.retries) == (Lifecycle.RUNNING, 1, 1, 0)
    assert "succeeded=1" in repr(d)


async def test_a_job_submitted_with_a_free_slot_is_driven_without_a_read_of_the_queue(
    fleet: Fleet,
) -> None:
    """The Submit's own script delivers the entry to its orchestrator (one round trip and a wake
    of the blocked read less), and with a worker's room free, makes the first attempt too (the
    DISPATCHED write less). Without a free slot the job waits in the queue for the readers, and
    is driven all the same."""
    config = msgspec.structs.replace(CONFIG, max_inflight=4)
    d = await fleet.dispatcher("o1", config=config)
    service = OrchestratorService(fleet.store, fleet.events, d._directory, d, config)
    for i in range(3):
        answer = await service.submit(pb.BatchExecutionRequest(job_id=f"t{i}", job_type="echo"))
        job = await fleet.wait_state(answer.job_id, JobState.SUCCEEDED)
        # its first attempt made by the submit's own step: token 1, one attempt, run once
        assert [(a.fencing_token, a.outcome) for a in job.attempts] == [(1, "SUCCEEDED")]
        assert started(fleet, f"t{i}") == 1
    s = d.statistics()
    assert (s.taken_on_submit, s.dispatched_on_submit, s.dispatched) == (3, 3, 3)
    # 6 long runs at once, 4 slots (the blocked read keeps at least one): at most 3 are taken
    # on their submit, the others by the queue's readers as slots free
    for i in range(6):
        await service.submit(pb.BatchExecutionRequest(job_id=f"long{i}", job_type="sleep",
                                                      params={"seconds": "0.2"}))  # fmt: skip
    for i in range(6):
        await fleet.wait_state(f"long{i}", JobState.SUCCEEDED)
    assert 3 < d.statistics().taken_on_submit <= 6
    await fleet.wait_queue_empty()


class _CancelledAsTaken:
    """The store, but a job is cancelled as it is taken the first time: after its fresh queue
    entry was read, behind the copy that entry carries."""

    def __init__(self, store: MemoryJobStore, job_id: str) -> None:
        self._store, self._job_id = store, job_id
        self.takes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def take(self, job_id: str) -> Any:
        if job_id == self._job_id:
            self.takes += 1
            if self.takes == 1:
                await self._store.request_cancel(job_id, error="no longer wanted", now=time.time())
        return await self._store.take(job_id)


async def test_a_job_changed_behind_its_entrys_copy_is_taken_again_from_its_record(
    fleet: Fleet,
) -> None:
    """A fresh entry's job is driven from the record the entry carries (no read): when the
    record changed meanwhile, the first write is refused and the job is taken from the store
    instead, never run from the stale copy."""
    store = _CancelledAsTaken(fleet.store, "c1")
    d = await fleet.dispatcher("o1", store=cast("JobStore", store))
    await fleet.submit("c1")
    await fleet.submit("ok1")
    assert (await fleet.wait_state("c1", JobState.CANCELLED)).error == "no longer wanted"
    await fleet.wait_state("ok1", JobState.SUCCEEDED)
    await fleet.wait_queue_empty()  # both entries acked
    assert started(fleet, "c1") == 0
    assert store.takes == 2
    s = d.statistics()
    assert (s.copies_out_of_date, s.dispatched) == (1, 1)


async def test_a_refusing_worker_is_passed_over(fleet: Fleet) -> None:
    first = fleet.workers["10.0.0.1:9091"]
    first.draining = True  # refuses, but reports IDLE for a moment yet: it is tried
    fleet.reporting["10.0.0.1:9091"] = True
    d = await fleet.dispatcher("o1")
    for i in range(6):
        await fleet.submit(f"r{i}")
    for i in range(6):
        # all six may hit the draining worker first: the retry budget then spaces the retries
        # over its window (10 s), so the wait is longer than the default
        job = await fleet.wait_state(f"r{i}", JobState.SUCCEEDED, within=30)
        assert job.attempts[-1].worker == "10.0.0.2:9091"
        assert all(a.outcome == "REFUSED" for a in job.attempts[:-1])
    assert sum(first.started.values()) == 0
    assert d.statistics().failed == 0


async def test_two_versions_of_a_job_each_get_only_the_params_they_take(fleet: Fleet) -> None:
    """A rolling upgrade: the second worker's `sleep` takes a `unit` the first's does not. A job
    with it goes to the second only; one that neither takes goes to either, which refuses it."""
    newer = fleet.workers["10.0.0.2:9091"]

    async def sleep(seconds: str = "1", unit: str = "s") -> dict[str, str]:
        return {"seconds": seconds, "unit": unit}

    newer.jobs["sleep"] = sleep
    await fleet._report()  # now, not at the next interval
    await fleet.dispatcher("o1")
    for i in range(6):
        await fleet.submit(f"u{i}", "sleep", seconds=0, unit="ms")
    for i in range(6):
        job = await fleet.wait_state(f"u{i}", JobState.SUCCEEDED)
        assert [a.worker for a in job.attempts] == ["10.0.0.2:9091"]
    assert sum(n for k, n in fleet.workers["10.0.0.1:9091"].started.items() if k[0] == "u") == 0
    # jobs both versions take go to both, as before
    for i in range(8):
        await fleet.submit(f"b{i}", "sleep", seconds=0)
    for i in range(8):
        await fleet.wait_state(f"b{i}", JobState.SUCCEEDED)
    assert all(sum(w.started.values()) for w in fleet.workers.values())
    # params no version takes: not held back; the worker's refusal ends the job
    await fleet.submit("neither", "sleep", colour="red")
    job = await fleet.wait_state("neither", JobState.FAILED)
    assert "colour" in job.error


async def test_a_job_waiting_for_a_worker_goes_as_soon_as_a_call_ends(fleet: Fleet) -> None:
    """Two workers of 8 slots each, 17 jobs: the 17th waits for a worker, and takes the first
    slot that frees, not the next directory refresh (nor its own 1 s timer)."""
    config = msgspec.structs.replace(CONFIG, max_inflight=32)
    await fleet.dispatcher("o1", config=config, refresh_seconds=5)
    for i in range(16):
        await fleet.submit(f"busy-{i}", "sleep", seconds=0.2)
    await fleet.wait_until(lambda: sum(len(w.live_ids()) for w in fleet.workers.values()) == 16)
    await fleet.submit("waiting", "sleep", seconds=0)
    job = await fleet.wait_state("waiting", JobState.SUCCEEDED)
    ends: list[float] = []
    for i in range(16):
        ended = (await fleet.wait_state(f"busy-{i}", JobState.SUCCEEDED)).attempts[-1].finished_at
        assert ended is not None
        ends.append(ended)
    first_end = min(ends)
    # on trio the clock is virtual: no noise; on asyncio a loaded machine may add some
    assert job.attempts[0].started_at - first_end < 0.1, (job.attempts[0].started_at, first_end)


class _SlowWrites:
    """The store, its writes taking a moment (Redis a round trip away)."""

    def __init__(self, store: MemoryJobStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def write(self, *args: Any, **kwargs: Any) -> Any:
        await anyio.sleep(0.02)
        return await self._store.write(*args, **kwargs)


class _CountingCalls:
    """The workers' client, counting the calls in flight to each worker and their peak."""

    def __init__(self, client: MemoryWorkerClient) -> None:
        self._client = client
        self.inflight: dict[str, int] = dict.fromkeys(client.workers, 0)
        self.peak: dict[str, int] = dict.fromkeys(client.workers, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def wait(self, address: str, job: BatchJob) -> Any:
        self.inflight[address] += 1
        self.peak[address] = max(self.peak[address], self.inflight[address])
        try:
            return await self._client.wait(address, job)
        finally:
            self.inflight[address] -= 1


async def test_a_burst_never_sends_a_worker_more_than_its_room(fleet: Fleet) -> None:
    """40 jobs taken at once, each DISPATCHED write a round trip long: a worker's room is taken
    as it is chosen, so the jobs that choose while the writes are under way see it; no worker
    is sent more than its 8 (before, all 40 chose while every count was 0: the worker refused
    what was over its queue)."""
    config = msgspec.structs.replace(CONFIG, max_inflight=64)
    calls = _CountingCalls(fleet.client)
    await fleet.dispatcher("o1", store=cast("JobStore", _SlowWrites(fleet.store)),
                           client=cast("WorkerClient", calls), config=config)  # fmt: skip
    for i in range(40):
        await fleet.submit(f"burst-{i}", "sleep", seconds=0.1)
    for i in range(40):
        job = await fleet.wait_state(f"burst-{i}", JobState.SUCCEEDED, within=30)
        assert [a.outcome for a in job.attempts] == ["SUCCEEDED"]
    assert max(calls.peak.values()) <= 8, calls.peak
    assert sum(calls.peak.values()) == 16  # both filled up: the burst was one


class _QueueTakenByOthers(_CountingCalls):
    """Workers whose queues other orchestrators fill: past `limit` calls in flight from this
    one, a call is refused as a real worker refuses with a full queue."""

    def __init__(self, client: MemoryWorkerClient, limit: int) -> None:
        super().__init__(client)
        self.limit = limit
        self.refused = 0

    async def wait(self, address: str, job: BatchJob) -> Any:
        if self.inflight[address] >= self.limit:
            self.refused += 1
            await anyio.lowlevel.checkpoint()
            return Completion(
                reply=Reply.REFUSED,
                error="RESOURCE_EXHAUSTED: queue is full (12 waiting, 8 running)",
            )
        return await super().wait(address, job)


async def test_a_worker_s_queue_shared_with_others_is_learnt_from_its_refusals(
    fleet: Fleet,
) -> None:
    """A dispatcher may have a worker's whole room in flight (8 running, 100 queued): short jobs
    go faster with some queued there. Other orchestrators fill that queue too: its refusals halve
    this one's share, and a refusal for a full queue is load, which uses up no attempt: every
    job SUCCEEDED."""
    fleet.queue_capacity = 100
    await fleet._report()
    calls = _QueueTakenByOthers(fleet.client, limit=20)
    config = msgspec.structs.replace(CONFIG, max_inflight=128, retry_budget_ratio=1.0)
    d = await fleet.dispatcher("o1", client=cast("WorkerClient", calls), config=config)
    for i in range(100):
        await fleet.submit(f"q{i}", "sleep", seconds=0.05, max_attempts=1)
    for i in range(100):
        job = await fleet.wait_state(f"q{i}", JobState.SUCCEEDED, within=60)
        assert job.attempts[-1].outcome == "SUCCEEDED"
    assert calls.refused > 0
    for address in fleet.workers:
        entry = d._directory.get(address)
        assert entry is not None
        assert d.room(entry) < 8 + 100  # learnt
        assert calls.peak[address] >= 20  # and the queue was used


async def test_a_killed_worker_s_job_finishes_elsewhere_once(fleet: Fleet) -> None:
    d = await fleet.dispatcher("o1")
    await fleet.submit("k1", "sleep", seconds=1)
    await fleet.wait_state("k1", JobState.RUNNING)
    where = (await fleet.store.get("k1")).attempts[0].worker  # type: ignore[union-attr]
    fleet.workers[where].kill()
    fleet.reporting[where] = False
    job = await fleet.wait_state("k1", JobState.SUCCEEDED)
    assert [a.outcome for a in job.attempts] == ["UNREACHABLE", "SUCCEEDED"]
    assert job.attempts[1].worker != where
    assert fleet.client.forgotten[where] >= 1
    assert d.breaker(where).statistics().consecutive_failures == 1


async def test_a_silent_worker_is_lost_when_its_reports_stop(fleet: Fleet) -> None:
    await fleet.dispatcher("o1")
    await fleet.submit("s1", "sleep", seconds=0.5)
    job = await fleet.wait_state("s1", JobState.RUNNING)
    where = job.attempts[0].worker
    fleet.workers[where].pause()  # calls hang from now on, and its reports stop
    fleet.reporting[where] = False
    job = await fleet.wait_state("s1", JobState.SUCCEEDED)
    assert job.attempts[0].outcome == "LOST"
    assert job.attempts[0].error.startswith("worker lost: its last report is")


async def test_a_black_holed_worker_s_run_is_followed_not_run_again(fleet: Fleet) -> None:
    """The network to the worker goes (its report stays fresh, listing the run): the call
    breaks, but the run goes on there and records its outcome; nothing starts a second copy."""
    d = await fleet.dispatcher("o1")
    await fleet.submit("b1", "sleep", seconds=0.5)
    job = await fleet.wait_state("b1", JobState.RUNNING)
    where = job.attempts[0].worker
    fleet.workers[where].black_hole()
    job = await fleet.wait_state("b1", JobState.SUCCEEDED)
    assert [a.outcome for a in job.attempts] == ["SUCCEEDED"]
    assert job.result_json == '{"slept":0.5}'
    assert sum(w.started["b1"] for w in fleet.workers.values()) == 1
    assert d.statistics().recovered == 1  # the outcome came from the store
    assert d.statistics().followed == 1


async def test_a_reset_call_attaches_to_its_run_again(fleet: Fleet) -> None:
    await fleet.dispatcher("o1")
    await fleet.submit("b2", "sleep", seconds=0.5)
    job = await fleet.wait_state("b2", JobState.RUNNING)
    worker = fleet.workers[job.attempts[0].worker]
    worker.black_hole()  # the call breaks ...
    worker.reconnect()  # ... and the worker is reachable again at once
    job = await fleet.wait_state("b2", JobState.SUCCEEDED)
    assert [a.outcome for a in job.attempts] == ["SUCCEEDED"]
    assert sum(w.started["b2"] for w in fleet.workers.values()) == 1
    assert fleet.client.calls["admit"] >= 2  # attached again


async def test_a_worker_cut_off_from_the_registry_keeps_its_run(fleet: Fleet) -> None:
    """Its report goes stale, but it answers: the call goes on; it gets no new work."""
    d = await fleet.dispatcher("o1")
    await fleet.submit("p1", "sleep", seconds=1)
    job = await fleet.wait_state("p1", JobState.RUNNING)
    where = job.attempts[0].worker
    fleet.reporting[where] = False
    await fleet.wait_until(lambda: d.eligibility(d._directory.get(where)) is not None)  # type: ignore[arg-type]
    await fleet.submit("p2", "echo")
    assert (await fleet.wait_state("p2", JobState.SUCCEEDED)).attempts[0].worker != where
    job = await fleet.wait_state("p1", JobState.SUCCEEDED)
    assert [a.outcome for a in job.attempts] == ["SUCCEEDED"]
    assert sum(w.started["p1"] for w in fleet.workers.values()) == 1
    assert fleet.client.calls["probe"] >= 1


async def test_a_deadline_during_the_run_times_out_and_stops_the_run(fleet: Fleet) -> None:
    await fleet.dispatcher("o1")
    await fleet.submit("t1", "sleep", seconds=60, deadline=0.5)
    job = await fleet.wait_state("t1", JobState.TIMED_OUT)
    assert job.error == "deadline passed while running"
    worker = fleet.workers[job.attempts[0].worker]
    await fleet.wait_until(lambda: worker.runs["t1"].ended.is_set())
    assert worker.runs["t1"].outcome is not None
    assert worker.runs["t1"].outcome.state is JobState.CANCELLED


async def test_with_no_worker_a_job_waits_until_its_deadline(fleet: Fleet) -> None:
    for address in fleet.workers:
        fleet.reporting[address] = False
    await fleet.registry.delete("wpm-apps:10.0.0.1:9091")
    await fleet.registry.delete("wpm-apps:10.0.0.2:9091")
    d = await fleet.dispatcher("o1")
    await fleet.submit("w1", deadline=0.3)
    await fleet.wait_until(lambda: d.statistics().waiting_for_worker == 1)
    job = await fleet.wait_state("w1", JobState.TIMED_OUT)
    assert job.error == "deadline passed: no eligible worker took it"
    assert d.statistics().waiting_for_worker == 0


async def test_attempts_run_out_and_the_breaker_opens(fleet: Fleet) -> None:
    for worker in fleet.workers.values():
        worker.reachable = False
    d = await fleet.dispatcher("o1")
    await fleet.submit("u1", max_attempts=3)
    job = await fleet.wait_state("u1", JobState.FAILED)
    assert job.error.startswith("gave up after 3 attempts: UNREACHABLE on 10.0.0.")
    assert len(job.attempts) == 3
    # both workers failed; the one that failed twice has its breaker open
    states = {d.breaker(a).statistics().state for a in fleet.workers}
    assert BreakerState.OPEN in states


async def test_a_failed_run_is_retried_only_when_asked(fleet: Fleet) -> None:
    async def fail() -> None:
        raise ValueError("nope")

    for worker in fleet.workers.values():
        worker.jobs["fail"] = fail
    await fleet.dispatcher("o1")
    await fleet.submit("f1", "fail")
    await fleet.submit("f2", "fail", retry=True, max_attempts=2)
    once = await fleet.wait_state("f1", JobState.FAILED)
    twice = await fleet.wait_state("f2", JobState.FAILED)
    assert (once.error, len(once.attempts)) == ("ValueError: nope", 1)
    assert [a.outcome for a in twice.attempts] == ["FAILED", "FAILED"]


async def test_cancel_a_queued_job_ends_it_at_once(fleet: Fleet) -> None:
    for address in fleet.workers:
        fleet.reporting[address] = False
        ip, port = address.split(":")
        await fleet.registry.delete(f"wpm-apps:{ip}:{port}")
    d = await fleet.dispatcher("o1")
    await fleet.submit("c1")
    await fleet.wait_until(lambda: d.statistics().waiting_for_worker == 1)
    job = await d.cancel("c1")
    assert job is not None
    assert (job.state, job.error) == (JobState.CANCELLED, "cancelled by request")
    await fleet.wait_until(lambda: d.statistics().inflight == 0)
    await fleet.wait_queue_empty()
    assert await d.cancel("nope") is None


async def test_cancel_a_running_job_held_by_another_dispatcher(fleet: Fleet) -> None:
    holder = await fleet.dispatcher("o1")
    await fleet.submit("c2", "sleep", seconds=60)
    job = await fleet.wait_state("c2", JobState.RUNNING)
    other = await fleet.dispatcher("o2")  # takes nothing: the queue is empty
    cancelled = await other.cancel("c2")
    assert cancelled is not None
    assert cancelled.state is JobState.CANCELLED
    run = fleet.workers[job.attempts[0].worker].runs["c2"]
    assert run.outcome is not None
    assert run.outcome.state is JobState.CANCELLED  # stopped where it ran, not only recorded
    assert holder.statistics().cancelled == 1
    assert other.statistics().cancelled == 0
    # a finished job comes back as it is
    again = await other.cancel("c2")
    assert again is not None
    assert again.state is JobState.CANCELLED


async def test_a_stopped_dispatcher_s_job_is_claimed_and_attaches_to_its_run(
    fleet: Fleet,
) -> None:
    async with anyio.create_task_group() as first:
        await fleet.dispatcher("o1", first)
        await fleet.submit("a1", "sleep", seconds=0.5)
        await fleet.wait_state("a1", JobState.RUNNING)
        first.cancel_scope.cancel()  # as if o1 were killed: its entry stays pending
    survivor = await fleet.dispatcher("o2")
    job = await fleet.wait_state("a1", JobState.SUCCEEDED)
    assert [a.outcome for a in job.attempts] == ["ORPHANED", "SUCCEEDED"]
    assert job.attempts[0].worker == job.attempts[1].worker
    assert started(fleet, "a1") == 1  # attached, not run again
    assert survivor.statistics().claimed == 1


async def test_a_first_attempt_made_by_a_submit_whose_dispatcher_stopped_runs_once(
    fleet: Fleet,
) -> None:
    """The submit wrote the first attempt (DISPATCHED, token 1) and delivered the entry, then
    its orchestrator stopped before calling the worker (or as it did): another claims the entry,
    finds the attempt, and sends the job to that worker, which runs it once."""
    async with anyio.create_task_group() as first:
        d = await fleet.dispatcher("o1", first)
        service = OrchestratorService(fleet.store, fleet.events, d._directory, d, CONFIG)
        await service.submit(pb.BatchExecutionRequest(job_id="s1", job_type="sleep",
                                                      params={"seconds": "1"}))  # fmt: skip
        assert d.statistics().dispatched_on_submit == 1
        first.cancel_scope.cancel()  # as if o1 were killed: its entry stays pending
    record = await fleet.store.get("s1")
    assert record is not None
    assert (record.state, record.fencing_token) == (JobState.DISPATCHED, 1)
    survivor = await fleet.dispatcher("o2")
    job = await fleet.wait_state("s1", JobState.SUCCEEDED)
    assert [a.outcome for a in job.attempts] == ["ORPHANED", "SUCCEEDED"]
    assert job.attempts[0].worker == job.attempts[1].worker  # where its run may have started
    assert started(fleet, "s1") == 1
    assert survivor.statistics().claimed == 1


async def test_a_run_that_ended_with_its_dispatcher_and_worker_gone_is_not_run_again(
    fleet: Fleet,
) -> None:
    async with anyio.create_task_group() as first:
        await fleet.dispatcher("o1", first)
        await fleet.submit("e1", "sleep", seconds=0.2)
        job = await fleet.wait_state("e1", JobState.RUNNING)
        first.cancel_scope.cancel()  # o1 is killed: the answer will reach nobody
    worker = fleet.workers[job.attempts[0].worker]
    await fleet.wait_until(lambda: worker.runs["e1"].ended.is_set())  # the run ended ...
    worker.kill()  # ... and its worker is gone with what it knew
    fleet.reporting[job.attempts[0].worker] = False
    survivor = await fleet.dispatcher("o2")
    done = await fleet.wait_state("e1", JobState.SUCCEEDED)
    assert done.result_json == '{"slept":0.2}'
    assert [a.outcome for a in done.attempts] == ["SUCCEEDED"]  # read back, not run again
    assert started(fleet, "e1") == 1
    assert survivor.statistics().recovered == 1


async def test_a_dead_worker_s_many_jobs_all_move_at_once_whatever_the_budget(
    fleet: Fleet,
) -> None:
    crowded, spare = fleet.workers.values()
    fleet.reporting["10.0.0.2:9091"] = False  # only the first is known while the jobs arrive
    await fleet.registry.delete("wpm-apps:10.0.0.2:9091")
    d = await fleet.dispatcher("o1")
    for i in range(8):
        await fleet.submit(f"m{i}", "sleep", seconds=0.3)
    await fleet.wait_until(lambda: sum(not r.ended.is_set() for r in crowded.runs.values()) == 8)
    fleet.reporting["10.0.0.2:9091"] = True
    crowded.kill()
    fleet.reporting["10.0.0.1:9091"] = False
    killed_at = anyio.current_time()
    for i in range(8):
        job = await fleet.wait_state(f"m{i}", JobState.SUCCEEDED)
        assert [a.outcome for a in job.attempts] == ["UNREACHABLE", "SUCCEEDED"]
    # 8 retries against a budget of 3 + 20 % of 8 calls: recovery is not held back by it
    assert anyio.current_time() - killed_at < 2
    assert d.statistics().retry_budget_refused == 0
    assert sum(spare.started.values()) == 8


class _FenceTurnsJunk:
    """The store, but one job's fencing token turns junk as the job is written RUNNING (inside
    the call's task group)."""

    def __init__(self, store: MemoryJobStore, job_id: str) -> None:
        self._store, self._job_id = store, job_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def write(self, job: BatchJob, token: int, **options: Any) -> Any:
        if job.job_id == self._job_id and job.state is JobState.RUNNING:
            self._store._fences.set(job.job_id, b"junk")
        return await self._store.write(job, token, **options)


async def test_junk_in_the_store_sets_its_job_aside_and_the_others_run(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.submit("bad-record")
    fleet.store._records.set("bad-record", b"{junk")
    await fleet.submit("bad-fence", "sleep", seconds=0.2)
    for i in range(3):
        await fleet.submit(f"ok{i}")
    store = cast("JobStore", _FenceTurnsJunk(fleet.store, "bad-fence"))
    d = await fleet.dispatcher("o1", store=store)
    for i in range(3):
        await fleet.wait_state(f"ok{i}", JobState.SUCCEEDED)
    job = await fleet.wait_state("bad-fence", JobState.FAILED)
    assert job.error == "quarantined: fencing token unreadable: b'junk' is not an integer"
    await fleet.wait_queue_empty()
    await fleet.wait_until(lambda: d.statistics().inflight == 0)
    assert sorted(q.job_id for q in await fleet.store.quarantined()) == ["bad-fence", "bad-record"]
    bad = fleet.store.bad_data.statistics()
    assert (bad.found["job_record"], bad.found["fencing_token"]) == (1, 1)
    assert (bad.quarantined["job_record"], bad.quarantined["fencing_token"]) == (1, 1)
    assert d.state is Lifecycle.RUNNING
    # said once each, and nothing failed on the way (no error, no traceback)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2, said
    assert all(m.startswith("bad data: ") for m in said)


class _Writes:
    """The store, noting the state each write of a job records."""

    def __init__(self, store: MemoryJobStore) -> None:
        self._store = store
        self.states: dict[str, list[JobState]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def write(self, job: BatchJob, token: int, **options: Any) -> WriteResult:
        self.states.setdefault(job.job_id, []).append(job.state)
        return await self._store.write(job, token, **options)


async def test_a_short_run_is_one_call_and_is_not_written_running(fleet: Fleet) -> None:
    writes = _Writes(fleet.store)
    await fleet.dispatcher("o1", store=cast("JobStore", writes))
    await fleet.submit("short", "sleep", seconds=0)
    await fleet.submit(
        "long", "sleep", seconds=OrchestratorConfig().running_recorded_after_seconds * 6
    )
    for job_id in ("short", "long"):
        await fleet.wait_state(job_id, JobState.SUCCEEDED)
    assert writes.states["short"] == [JobState.DISPATCHED, JobState.SUCCEEDED]
    # a run still going is asked how it stands, recorded RUNNING, and waited for (attached)
    assert writes.states["long"] == [JobState.DISPATCHED, JobState.RUNNING, JobState.SUCCEEDED]
    assert (started(fleet, "short"), started(fleet, "long")) == (1, 1)


async def test_with_no_delay_every_run_is_recorded_running(fleet: Fleet) -> None:
    writes = _Writes(fleet.store)
    config = msgspec.structs.replace(CONFIG, running_recorded_after_seconds=0)
    await fleet.dispatcher("o1", store=cast("JobStore", writes), config=config)
    await fleet.submit("short", "sleep", seconds=0)
    await fleet.wait_state("short", JobState.SUCCEEDED)
    assert writes.states["short"] == [JobState.DISPATCHED, JobState.RUNNING, JobState.SUCCEEDED]


async def test_a_worker_cut_off_before_its_call_is_given_up_and_the_job_runs_elsewhere(
    fleet: Fleet,
) -> None:
    """Its report stays fresh, but no call reaches it (a connect that hangs): the RunWork has no
    keepalive to break it, so the worker's silence to SendWork beside it ends the call, as an
    admission that is not answered did."""
    cut = fleet.workers["10.0.0.1:9091"]
    cut.black_hole()
    other = "10.0.0.2:9091"
    fleet.reporting[other] = False  # at first the cut-off worker is the only one
    await fleet.registry.delete("wpm-apps:10.0.0.2:9091")
    config = msgspec.structs.replace(CONFIG, keepalive_seconds=0.2, keepalive_timeout_seconds=0.3)
    d = await fleet.dispatcher("o1", config=config)
    for i in range(4):
        await fleet.submit(f"c{i}", "sleep", seconds=0)
    await fleet.wait_until(lambda: d.breaker("10.0.0.1:9091").state is BreakerState.OPEN)
    fleet.reporting[other] = True
    given_up = []
    for i in range(4):
        job = await fleet.wait_state(f"c{i}", JobState.SUCCEEDED)
        assert job.attempts[-1].worker == "10.0.0.2:9091"
        given_up += [a.error for a in job.attempts[:-1]]
    assert given_up
    assert all(e == "no answer within 0.5s" for e in given_up), given_up
    assert sum(cut.started.values()) == 0
    await fleet.wait_until(lambda: d.statistics().inflight == 0)


class _Gate:
    """Wraps an object's coroutine methods; the `nth` call of `method` blocks for good instead
    of being made (where a cancellation then lands)."""

    def __init__(self, target: object, method: str, nth: int) -> None:
        self._target, self._method, self._nth = target, method, nth
        self.calls = 0
        self.reached = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name != self._method:
            return attr

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self._nth:
                self.reached.set()
                await anyio.sleep(math.inf)
            return await cast("Callable[..., Awaitable[Any]]", attr)(*args, **kwargs)

        return gated


# A job's awaits on its way through one dispatcher, in order: its record, fence and cancel
# flag read at once, DISPATCHED under the next token (one write), the call that runs it
# (RunWork) and, beside it once the run has gone on for `running_recorded_after_seconds`, the
# worker's word that it has the run (SendWork) and RUNNING; then the final write (which acks
# the queue entry in the same step). A short run has no RUNNING write.
AWAIT_POINTS = [
    (0.2, "store", "take", 1),
    (0.2, "store", "write", 1), (0.2, "client", "wait", 1),
    (0.2, "client", "admit", 1), (0.2, "store", "write", 2), (0.2, "store", "write", 3),
    (0.0, "client", "wait", 1), (0.0, "store", "write", 2),
]  # fmt: skip


@pytest.mark.parametrize(("seconds", "edge", "method", "nth"), AWAIT_POINTS)
async def test_a_dispatcher_cancelled_at_each_await_point_loses_and_repeats_nothing(
    fleet: Fleet, seconds: float, edge: str, method: str, nth: int
) -> None:
    gate = _Gate(fleet.store if edge == "store" else fleet.client, method, nth)
    store = cast("JobStore", gate) if edge == "store" else fleet.store
    client = cast("WorkerClient", gate) if edge == "client" else fleet.client
    async with anyio.create_task_group() as first:
        d1 = await fleet.dispatcher("o1", first, store=store, client=client)
        await fleet.submit("x1", "sleep", seconds=seconds)
        with anyio.fail_after(10):
            await gate.reached.wait()
        first.cancel_scope.cancel()
    # what the cancelled dispatcher leaves: nothing in hand, no probe or call counted
    s = d1.statistics()
    assert (s.state, s.inflight, s.waiting_for_worker) == (Lifecycle.STOPPED, 0, 0)
    assert all(d1.inflight_to(a) == 0 and d1.breaker(a).allows() for a in fleet.workers)
    record = await fleet.store.get("x1")
    assert record is not None
    assert not record.state.finished  # no end was written that did not happen
    # another dispatcher takes the job over: it ends once, run once
    await fleet.dispatcher("o2")
    job = await fleet.wait_state("x1", JobState.SUCCEEDED)
    assert started(fleet, "x1") == 1
    await fleet.wait_until(lambda: fleet.dispatchers[-1].statistics().inflight == 0)
    await fleet.wait_queue_empty()
    assert job.attempts[-1].outcome == "SUCCEEDED"


async def test_what_is_kept_per_worker_goes_when_the_worker_leaves(fleet: Fleet) -> None:
    d = await fleet.dispatcher("o1")
    await fleet.submit("g1")
    await fleet.wait_state("g1", JobState.SUCCEEDED)
    d.breaker("10.0.0.9:9091")  # a worker seen once, gone since
    kept = d.breaker("10.0.0.1:9091")
    gone = "10.0.0.2:9091"
    fleet.reporting[gone] = False
    await fleet.registry.delete(f"wpm-apps:{gone.replace(':9091', '')}:9091")
    await fleet.wait_until(lambda: "10.0.0.9:9091" not in d._breakers and gone not in d._breakers)
    assert d.breaker("10.0.0.1:9091") is kept  # a worker still there keeps its own
