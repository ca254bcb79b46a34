"""Store faults in one process: the dispatcher, the directory and the service when Redis goes
away, comes back, or comes back without its data (tests/chaos/test_redis_faults.py shows the same
with real processes). The dispatcher's tests run on asyncio and on trio under MockClock."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
import redis
import redis.asyncio as aioredis
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.config import OrchestratorConfig
from app.core.balancer import PowerOfTwoChoices
from app.core.clock import ManualClock
from app.errors import StoreUnavailable
from app.fleet.batch_job import BatchJob, LostJob
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodInfo, PodStatus, encode_pod_info
from app.grpc.status import retry_info
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.memory_worker_client import MemoryWorkerClient
from app.orchestrator.service import OrchestratorService
from app.pb import orchestrator as pb
from app.stores.abc import JobStore
from app.stores.memory import MemoryJobEvents, MemoryJobStore, MemoryPodRegistry
from app.stores.redis.job_store import RedisJobStore
from app.stores.redis.monitor import RedisMonitor
from tests.helpers import ROOT, RedisServer, base_env, free_port
from tests.test_dispatcher import Fleet, started
from tests.test_dispatcher import anyio_backend as anyio_backend  # asyncio, and trio on MockClock

pytestmark = pytest.mark.anyio


class FlakyStore:
    """A job store that is away (every call raises StoreUnavailable) while `down`."""

    def __init__(self, store: MemoryJobStore) -> None:
        self.store = store
        self.down = False
        self.refused = 0

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await anyio.lowlevel.checkpoint()
            if self.down:
                self.refused += 1
                raise StoreUnavailable("Redis unreachable (ConnectionError: refused)")
            return await method(*args, **kwargs)

        return call


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with anyio.create_task_group() as tg:
        f = Fleet(tg, workers=2)
        await f.store.ensure_group()
        await f.start()
        yield f
        tg.cancel_scope.cancel()


async def test_a_job_in_hand_waits_out_an_outage_and_runs_once(fleet: Fleet) -> None:
    flaky = FlakyStore(fleet.store)
    d = await fleet.dispatcher("o1", store=cast(JobStore, flaky))
    await fleet.submit("j1", "sleep", seconds=0.5)
    await fleet.wait_state("j1", JobState.RUNNING)
    flaky.down = True  # Redis goes away while the job runs, and stays away past its end
    await fleet.wait_until(lambda: flaky.refused >= 3)
    await anyio.sleep(1.0)
    flaky.down = False
    job = await fleet.wait_state("j1", JobState.SUCCEEDED)
    assert [a.outcome for a in job.attempts] == ["SUCCEEDED"]  # not given up, not re-run
    assert started(fleet, "j1") == 1
    assert d.statistics().store_waits >= 1
    await fleet.wait_until(lambda: d.statistics().inflight == 0)
    await fleet.wait_queue_empty()


async def test_a_lost_consumer_group_is_recreated_said_once_and_new_jobs_run(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.orchestrator.dispatcher")
    d = await fleet.dispatcher("o1")
    await fleet.submit("before", a=1)
    await fleet.wait_state("before", JobState.SUCCEEDED)
    fleet.store.forget_everything()  # Redis restarted empty: the group is gone (NOGROUP)
    await fleet.submit("after", a=2)
    job = await fleet.wait_state("after", JobState.SUCCEEDED)
    assert job.result_json == '{"a":"2"}'
    assert d.statistics().queue_recreated == 1
    said = [r for r in caplog.records if "consumer group was gone" in r.getMessage()]
    assert len(said) == 1
    await d.data_lost()  # the monitor noticing the same loss a moment later: not said again
    assert d.statistics().queue_recreated == 1


async def test_a_running_job_whose_record_vanished_ends_and_is_noted_lost(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.orchestrator.dispatcher")
    d = await fleet.dispatcher("o1")
    await fleet.submit("j1", "sleep", seconds=0.5)
    await fleet.wait_state("j1", JobState.RUNNING)
    fleet.store.forget_everything()
    await fleet.wait_until(lambda: d.statistics().lost == 1)
    (lost,) = await fleet.store.lost_jobs(count=10)
    assert (lost.job_id, lost.state, lost.noticed_by) == ("j1", "SUCCEEDED", "o1")
    assert lost.worker in fleet.workers
    assert lost.result_json == '{"slept":0.5}'  # what the run gave, for the operator
    await fleet.wait_until(lambda: d.statistics().inflight == 0)
    said = [r for r in caplog.records if "job j1 lost" in r.getMessage()]
    assert len(said) == 1
    assert await fleet.store.get("j1") is None  # nothing made up in its place


async def test_a_job_waiting_for_a_worker_when_its_record_vanished_is_not_stuck(
    fleet: Fleet,
) -> None:
    d = await fleet.dispatcher("o1")
    await fleet.submit("j1", "nobody-runs-it", deadline=3600)  # no eligible worker: it waits
    await fleet.wait_until(lambda: d.statistics().waiting_for_worker == 1)
    fleet.store.forget_everything()
    await d.data_lost()  # the monitor saw the epoch marker change
    await fleet.wait_until(lambda: d.statistics().lost == 1, within=5)
    (lost,) = await fleet.store.lost_jobs(count=10)
    assert (lost.job_id, lost.job_type, lost.state) == ("j1", "nobody-runs-it", "PENDING")
    await fleet.wait_until(lambda: d.statistics().inflight == 0)


class ForgettingStore(FlakyStore):
    """A store whose first `take` meets an outage, over which Redis forgets everything: the
    entry was read, and then Redis lost it with its record (restarted empty, or lost its last
    second) before the orchestrator could read the record."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        call = super().__getattr__(name)
        if name != "take":
            return call

        async def take(*args: Any, **kwargs: Any) -> Any:
            if not self.refused:
                self.refused += 1
                self.store.forget_everything()
                raise StoreUnavailable("Redis unreachable (ConnectionError: reset)")
            return await call(*args, **kwargs)

        return take


async def test_a_job_forgotten_between_its_read_and_its_take_is_noted_lost(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    forgetting = ForgettingStore(fleet.store)
    d = await fleet.dispatcher("o1", store=cast(JobStore, forgetting))
    await fleet.submit("j1", "sleep", seconds=0.1)
    await fleet.wait_until(lambda: d.statistics().lost == 1)
    (lost,) = await fleet.store.lost_jobs(count=10)
    assert (lost.job_id, lost.state, lost.noticed_by) == ("j1", "PENDING", "o1")
    assert "queue entry vanished" in lost.reason
    assert await fleet.store.quarantined() == []  # not taken for junk
    assert not any("quarantine" in r.getMessage() for r in caplog.records)
    await fleet.wait_until(lambda: d.statistics().inflight == 0)
    assert started(fleet, "j1") == 0


async def test_after_redis_went_back_in_time_a_job_goes_to_the_worker_that_has_it(
    fleet: Fleet,
) -> None:
    d = await fleet.dispatcher("o1")
    await d.went_back_in_time()  # the monitor saw the heartbeat fall
    # a run Redis has no trace of: its dispatch was in the writes Redis lost
    job = BatchJob(job_id="j1", job_type="sleep", params={"seconds": "0.3"})
    holder = sorted(fleet.workers)[1]
    await fleet.client.admit(holder, job)
    await fleet.submit("j1", "sleep", seconds=0.3)
    done = await fleet.wait_state("j1", JobState.SUCCEEDED)
    assert [a.worker for a in done.attempts] == [holder]  # attached there, not run again
    assert started(fleet, "j1") == 1
    assert d.statistics().found_on_worker == 1


# --- the directory ------------------------------------------------------------------------------


class FlakyRegistry(MemoryPodRegistry):
    """A pod registry that is away while `down`."""

    down = False

    async def keys(self, prefix: str) -> list[str]:
        if self.down:
            raise StoreUnavailable("registry away")
        return await super().keys(prefix)


def report(clock: ManualClock, port: int = 9091) -> bytes:
    now = clock.now()
    info = PodInfo(grpc_port=port, status=PodStatus.IDLE, update_datetime=now.isoformat(),
                   update_epoch_ms=int(now.timestamp() * 1000), ip="10.0.0.1")  # fmt: skip
    return encode_pod_info(info)


async def test_a_registry_outage_is_not_blamed_on_the_workers() -> None:
    clock = ManualClock()
    registry = FlakyRegistry()
    await registry.put("wpm-apps:10.0.0.1:1", report(clock), 60)
    directory = WorkerDirectory(registry, report_interval_seconds=1, clock=clock)
    await directory.refresh()
    address = "10.0.0.1:9091"
    registry.down = True
    clock.advance(0.5)
    with pytest.raises(StoreUnavailable):
        await directory.refresh()
    clock.advance(9.5)  # the registry away for 10 s: the worker could not report either
    assert directory.stale_reason(directory.get(address)) is None
    registry.down = False
    await registry.delete("wpm-apps:10.0.0.1:1")  # and it came back empty (lost its data)
    await directory.refresh()
    # kept at its last report, not taken for stale, for as long as the outage plus 2 intervals
    assert directory.stale_reason(directory.get(address)) is None
    clock.advance(11.0)
    await directory.refresh()
    assert directory.stale_reason(directory.get(address)) is None
    clock.advance(1.0)
    await directory.refresh()  # past the excuse, and it never reported again: gone
    assert directory.stale_reason(directory.get(address)) == "its PodInfo key is gone"


async def test_a_vanished_key_keeps_its_last_report_until_stale() -> None:
    clock = ManualClock()
    registry = MemoryPodRegistry()
    await registry.put("wpm-apps:10.0.0.1:1", report(clock), 60)
    directory = WorkerDirectory(registry, report_interval_seconds=1, clock=clock)
    await directory.refresh()
    await registry.delete("wpm-apps:10.0.0.1:1")
    await directory.refresh()
    assert [e.address for e in directory.entries()] == ["10.0.0.1:9091"]
    clock.advance(2.5)
    await directory.refresh()
    assert directory.entries() == []


# --- the service --------------------------------------------------------------------------------


async def service_with(store: JobStore) -> OrchestratorService:
    memory = MemoryJobStore()
    directory = WorkerDirectory(MemoryPodRegistry())
    config = OrchestratorConfig()
    dispatcher = Dispatcher(store, MemoryJobEvents(memory), directory, MemoryWorkerClient({}),
                            PowerOfTwoChoices(), config, consumer="o1")  # fmt: skip
    return OrchestratorService(store, MemoryJobEvents(memory), directory, dispatcher, config)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_service_answers_an_outage_with_unavailable_and_a_retry_after() -> None:
    flaky = FlakyStore(MemoryJobStore())
    service = await service_with(cast(JobStore, flaky))
    request = pb.BatchExecutionRequest(job_id="j1", job_type="echo")
    flaky.down = True
    for call in (
        lambda: service.submit(request),
        lambda: service.get_job(pb.JobRequest(job_id="j1")),
        lambda: service.cancel_job(pb.JobRequest(job_id="j1")),
    ):
        with pytest.raises(GRPCError) as refused:
            await call()
        assert refused.value.status is Status.UNAVAILABLE
        assert refused.value.message == (
            "Redis unreachable (ConnectionError: refused); retry after 1s"
        )
    # once the monitor has seen it down, calls are refused without trying the store
    service.store_down = lambda: ("Redis at redis://r:6379/0 unreachable", 3)
    tried = flaky.refused
    with pytest.raises(GRPCError) as refused:
        await service.submit(request)
    assert (refused.value.status, refused.value.message) == (
        Status.UNAVAILABLE, "Redis at redis://r:6379/0 unreachable; retry after 3s"
    )  # fmt: skip
    hint = retry_info(refused.value.details)  # the same, for clients that read RetryInfo
    assert hint is not None
    assert hint.retry_delay_seconds == 3
    assert flaky.refused == tried
    with pytest.raises(GRPCError) as refused:
        await anext(aiter(service.watch_job(pb.JobRequest(job_id="j1"))))
    assert refused.value.status is Status.UNAVAILABLE
    flaky.down = False
    service.store_down = lambda: None
    assert (await service.submit(request)).job_id == "j1"


# --- the monitor, on a real redis-server ------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_monitor_says_once_when_redis_lost_its_data(
    redis_server: RedisServer, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.stores.redis.monitor")
    client = aioredis.Redis.from_url(redis_server.url)
    reactions: list[str] = []

    async def react() -> None:
        reactions.append("recreated")

    monitor = RedisMonitor(client, on_data_lost=react, data_loss_action="recreating the group")
    try:
        assert await monitor.check()
        assert await monitor.check()
        assert reactions == []  # the marker it set itself is no loss
        redis_client.flushdb()  # what a restart without its files looks like
        assert await monitor.check()
        assert await monitor.check()
        assert reactions == ["recreated"]
        assert monitor.statistics().data_losses == 1
        said = [r.getMessage() for r in caplog.records if "lost its data" in r.getMessage()]
        assert len(said) == 1
        assert said[0].endswith("; recreating the group")
    finally:
        await client.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_monitor_turns_down_and_up_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.stores.redis.monitor")
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    changes: list[bool] = []
    monitor = RedisMonitor(client, what="Redis at test", on_change=changes.append, interval=0.1)
    try:
        assert monitor.up
        assert monitor.down_reason() is None
        assert not await monitor.check()
        assert not await monitor.check()
        assert changes == [False]
        assert not monitor.up
        assert monitor.down_reason() == "Redis at test unreachable"
        assert 1 <= monitor.retry_after() <= 5
    finally:
        await client.aclose()
    said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(said) == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_monitor_says_once_when_redis_went_back_in_time(
    redis_server: RedisServer, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.stores.redis.monitor")
    client = aioredis.Redis.from_url(redis_server.url)
    reactions: list[str] = []

    async def react() -> None:
        reactions.append("careful")

    monitor = RedisMonitor(client, on_went_back=react)
    try:
        for _ in range(3):
            assert await monitor.check()
        redis_client.decrby("wpm-fleet:heartbeat", 2)  # its last writes lost (my last beat)
        assert await monitor.check()
        assert await monitor.check()
        assert reactions == ["careful"]
        s = monitor.statistics()
        assert (s.went_back, s.data_losses) == (1, 0)
        said = [r.getMessage() for r in caplog.records if "went back in time" in r.getMessage()]
        assert len(said) == 1
    finally:
        await client.aclose()


# --- the operators' check -----------------------------------------------------------------------


def run_lost_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "lost"], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_jobworker_lost_lists_the_notes_and_exits_as_a_check(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    env = base_env(tmp_path, REDIS_URL=redis_server.url)
    none = run_lost_check(env)
    assert (none.returncode, none.stdout, none.stderr) == (0, "", "0 lost job(s)\n")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        store = RedisJobStore(client)
        lost = LostJob(job_id="j1", reason="its record vanished", noticed_by="o1",
                       noticed_at=time.time(), job_type="echo", state="RUNNING",
                       worker="10.0.0.1:9091", attempts=1)  # fmt: skip
        assert await store.report_lost(lost)
    finally:
        await client.aclose()
    some = run_lost_check(env)
    assert some.returncode == 1, some.stderr
    assert some.stdout.startswith("j1\techo\tRUNNING on 10.0.0.1:9091\tnoticed ")
    assert some.stderr == "1 lost job(s)\n"
    unreachable = run_lost_check({**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith("jobworker: Redis unreachable (")
    assert "Traceback" not in unreachable.stderr
