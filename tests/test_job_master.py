"""JobMaster: Spring executor semantics on a CapacityLimiter, on asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from app.errors import (
    Draining,
    InvalidJobRequest,
    JobAlreadyExists,
    JobNotFound,
    QueueFull,
    UnknownJob,
)
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodStatus
from app.worker.builtin_jobs import builtin_specs
from app.worker.job_master import JobMaster
from app.worker.job_registry import JobRegistry
from tests.helpers import eventually

pytestmark = pytest.mark.anyio


class Gate:
    """Jobs named `gate` wait on this until the test opens it; `entered` counts arrivals."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.entered = 0

    async def job(self, tag: str = "") -> str:
        self.entered += 1
        await self.event.wait()
        return tag


def registry_with(gate: Gate) -> JobRegistry:
    registry = JobRegistry()
    registry.update(builtin_specs())
    registry.register(gate.job, name="gate")
    return registry


@pytest.fixture
async def gate() -> Gate:
    return Gate()


async def started_master(tg: anyio.abc.TaskGroup, gate: Gate, **options: Any) -> JobMaster:
    options.setdefault("core_size", 2)
    options.setdefault("max_size", 4)
    options.setdefault("queue_capacity", 2)
    master = JobMaster(registry_with(gate), **options)
    await tg.start(master.run)
    return master


@pytest.fixture
async def master_tg() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


async def test_executor_admission_order(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    """core run, then the queue fills, then the limiter grows to max, then reject."""
    master = await started_master(master_tg, gate)
    states = [master.submit_nowait("gate", job_id=f"j{i}").state for i in range(6)]
    assert states == [JobState.RUNNING] * 2 + [JobState.QUEUED] * 2 + [JobState.RUNNING] * 2
    s = master.statistics()
    assert (s.load.active, s.load.capacity, s.load.queued) == (4, 4, 2)
    with pytest.raises(QueueFull, match="queue is full"):
        master.submit_nowait("gate", job_id="j6")
    assert master.statistics().jobs.rejected == 1
    # the queued ones run once tokens come back, oldest first
    gate.event.set()
    for i in range(6):
        record = await master.wait_finished(f"j{i}")
        assert record.state is JobState.SUCCEEDED
    assert master.limiter.borrowed_tokens == 0


async def test_queue_capacity_zero_grows_directly(
    master_tg: anyio.abc.TaskGroup, gate: Gate
) -> None:
    master = await started_master(master_tg, gate, core_size=1, max_size=2, queue_capacity=0)
    master.submit_nowait("gate", job_id="a")
    assert master.submit_nowait("gate", job_id="b").state is JobState.RUNNING
    with pytest.raises(QueueFull):
        master.submit_nowait("gate", job_id="c")
    gate.event.set()


async def test_grown_tokens_shrink_after_keep_alive(
    master_tg: anyio.abc.TaskGroup, gate: Gate
) -> None:
    master = await started_master(master_tg, gate, core_size=1, max_size=3, queue_capacity=0,
                                  keep_alive_seconds=0.05)  # fmt: skip
    for i in range(3):
        master.submit_nowait("gate", job_id=f"g{i}")
    assert master.limiter.total_tokens == 3
    gate.event.set()
    await eventually(lambda: master.limiter.borrowed_tokens == 0)
    await eventually(lambda: master.limiter.total_tokens == 1)
    assert master.statistics().load.capacity == 1
    # like the pool's threads above core size, the runners above the token count end
    await eventually(lambda: runner_tasks() <= 1)


def runner_tasks() -> int:
    """The JobMaster's pooled runner tasks alive now (running a job or parked)."""
    return sum(task.name == "JobMaster runner" for task in anyio.get_running_tasks())


async def test_runners_are_pooled(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    """A worker that runs one job after another reuses its parked runner for each."""
    master = await started_master(master_tg, gate, core_size=2, max_size=4)
    for i in range(50):
        record = await master.run_and_wait("echo", job_id=f"s{i}", params={"n": str(i)})
        assert record.state is JobState.SUCCEEDED
    assert runner_tasks() == 1
    # two at once need a second runner, and no more than that
    master.submit_nowait("gate", job_id="g1")
    master.submit_nowait("gate", job_id="g2")
    await eventually(lambda: gate.entered == 2)
    assert runner_tasks() == 2
    gate.event.set()
    await eventually(lambda: master.limiter.borrowed_tokens == 0)
    assert runner_tasks() == 2
    assert master.statistics().jobs.succeeded == 52


async def test_a_run_handed_to_a_parked_runner_ends_when_all_is_cancelled(gate: Gate) -> None:
    """Handed to a parked runner, then cancelled before it ran: it still ends, token back."""
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            master = await started_master(tg, gate, core_size=2, max_size=2, queue_capacity=2)
            await master.run_and_wait("echo", job_id="first")
            assert runner_tasks() == 1  # parked
            master.submit_nowait("gate", job_id="handed")
            master.submit_nowait("gate", job_id="fresh")
            master.submit_nowait("gate", job_id="queued")
            outer.cancel()  # before any of them had a turn
    assert master.limiter.borrowed_tokens == 0
    for job_id in ("handed", "fresh", "queued"):
        assert master.get(job_id).state is JobState.CANCELLED, job_id
    assert runner_tasks() == 0


async def test_watermark_status_follows_the_limiter(
    master_tg: anyio.abc.TaskGroup, gate: Gate
) -> None:
    # max 4, watermark 50: up to 2 active is IDLE, 3 is BUSY
    master = await started_master(master_tg, gate, core_size=4, max_size=4, watermark=50)
    assert master.status() is PodStatus.IDLE
    master.submit_nowait("gate", job_id="a")
    master.submit_nowait("gate", job_id="b")
    assert master.status() is PodStatus.IDLE
    master.submit_nowait("gate", job_id="c")
    assert master.status() is PodStatus.BUSY
    gate.event.set()
    await eventually(lambda: master.limiter.borrowed_tokens == 0)
    assert master.status() is PodStatus.IDLE


async def test_outcomes(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    master = await started_master(master_tg, gate)
    ok = await master.run_and_wait("echo", job_id="e", params={"x": "1"})
    assert (ok.state, ok.result()) == (JobState.SUCCEEDED, {"x": "1"})
    failed = await master.run_and_wait("fail", job_id="f", params={"message": "boom"})
    assert (failed.state, failed.error) == (JobState.FAILED, "JobFailedError: boom")
    timed = await master.run_and_wait(
        "sleep", job_id="t", params={"seconds": "5"}, timeout_seconds=0.05
    )
    assert timed.state is JobState.TIMED_OUT
    assert timed.error == "timed out after 0.05s"
    blocking = await master.run_and_wait("block", job_id="b", params={"seconds": "0.01"})
    assert (blocking.state, blocking.result()) == (JobState.SUCCEEDED, {"blocked": 0.01})
    s = master.statistics()
    assert (s.jobs.succeeded, s.jobs.failed, s.jobs.timed_out, s.load.active) == (2, 1, 1, 0)


async def test_cancel_running_and_queued(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    master = await started_master(master_tg, gate, core_size=1, max_size=1, queue_capacity=1)
    master.submit_nowait("gate", job_id="run")
    master.submit_nowait("gate", job_id="wait")
    queued = await master.cancel("wait")
    assert (queued.state, queued.started_at) == (JobState.CANCELLED, None)
    await eventually(lambda: gate.entered == 1)
    running = await master.cancel("run")
    assert (running.state, running.error) == (JobState.CANCELLED, "cancelled by request")
    assert master.limiter.borrowed_tokens == 0
    # a finished job is returned as it is
    assert (await master.cancel("run")).state is JobState.CANCELLED


async def test_cancel_blocking_job(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    master = await started_master(master_tg, gate)
    master.submit_nowait("block", job_id="b", params={"seconds": "30"})
    record = await master.cancel("b")
    assert record.state is JobState.CANCELLED
    assert master.limiter.borrowed_tokens == 0


async def test_bad_requests(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    master = await started_master(master_tg, gate)
    with pytest.raises(InvalidJobRequest, match=r"^id: must not be empty$"):
        master.submit_nowait("echo", job_id="")
    with pytest.raises(InvalidJobRequest, match=r"^name: must not be empty$"):
        master.submit_nowait("", job_id="x")
    with pytest.raises(UnknownJob, match="no job named 'nope'"):
        master.submit_nowait("nope", job_id="x")
    with pytest.raises(InvalidJobRequest, match=r"^params.seconds: expected a number, got 'soon'$"):
        master.submit_nowait("sleep", job_id="x", params={"seconds": "soon"})
    with pytest.raises(
        InvalidJobRequest, match=r"params\.colour: job 'sleep' takes no such parameter"
    ):
        master.submit_nowait("sleep", job_id="x", params={"colour": "red"})
    with pytest.raises(InvalidJobRequest, match="timeout_seconds"):
        master.submit_nowait("echo", job_id="x", timeout_seconds=-1)
    with pytest.raises(JobNotFound):
        master.get("x")
    assert master.statistics().jobs.accepted == 0


async def test_duplicate_ids_and_attach(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    master = await started_master(master_tg, gate)
    master.submit_nowait("gate", job_id="same", params={"tag": "first"})
    with pytest.raises(JobAlreadyExists, match="already RUNNING"):
        master.submit_nowait("gate", job_id="same")
    with pytest.raises(JobAlreadyExists, match="exists for job 'gate'"):
        await master.run_and_wait("echo", job_id="same")
    async with anyio.create_task_group() as tg:
        results: list[str] = []

        async def attach() -> None:
            results.append((await master.run_and_wait("gate", job_id="same")).result())

        tg.start_soon(attach)
        await eventually(lambda: gate.entered == 1)
        gate.event.set()
    assert results == ["first"]
    assert gate.entered == 1  # attached, not started twice
    # a finished id is not run again while the worker remembers it
    with pytest.raises(JobAlreadyExists, match="already ran SUCCEEDED"):
        master.submit_nowait("gate", job_id="same")


async def test_drain_lets_jobs_finish_then_cancels_the_rest(gate: Gate) -> None:
    async with anyio.create_task_group() as tg:
        master = await started_master(tg, gate, core_size=1, max_size=1, queue_capacity=1)
        master.submit_nowait("sleep", job_id="quick", params={"seconds": "0.01"})
        master.submit_nowait("gate", job_id="stuck")
        master.begin_drain(0.2)
        assert master.status() is PodStatus.DRAINING
        with pytest.raises(Draining):
            master.submit_nowait("echo", job_id="late")
        with anyio.fail_after(5):
            await master.wait_stopped()
    assert master.get("quick").state is JobState.SUCCEEDED
    stuck = master.get("stuck")
    assert (stuck.state, stuck.error) == (
        JobState.CANCELLED,
        "worker shut down before the job finished",
    )
    assert master.limiter.borrowed_tokens == 0


async def test_cancel_all_and_outer_cancellation_return_every_token(gate: Gate) -> None:
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            master = await started_master(tg, gate, core_size=2, max_size=2, queue_capacity=3)
            for i in range(5):
                master.submit_nowait("gate", job_id=f"j{i}")
            await eventually(lambda: gate.entered == 2)
            outer.cancel()
    assert master.limiter.borrowed_tokens == 0
    states = {master.get(f"j{i}").state for i in range(5)}
    assert states == {JobState.CANCELLED}


async def test_history_is_bounded(master_tg: anyio.abc.TaskGroup, gate: Gate) -> None:
    master = await started_master(master_tg, gate, history_size=3)
    for i in range(5):
        await master.run_and_wait("echo", job_id=f"h{i}")
    with pytest.raises(JobNotFound):
        master.get("h0")
    assert [r.id for r in master.jobs()] == ["h4", "h3", "h2"]


async def test_a_deep_queue_of_quick_jobs_drains_in_a_few_loop_turns(gate: Gate) -> None:
    """A finished job's task runs the next queued one itself, not one job per token per turn."""
    async with anyio.create_task_group() as tg:
        master = await started_master(tg, gate, core_size=2, max_size=2, queue_capacity=1000)
        for i in range(1000):
            master.submit_nowait("echo", job_id=f"q{i}")
        turns = 0
        with anyio.fail_after(10):
            while master.statistics().jobs.succeeded < 1000:
                await anyio.lowlevel.checkpoint()
                turns += 1
        assert turns < 100, f"{turns} turns of the loop for 1000 queued jobs"
        assert master.limiter.borrowed_tokens == 0
        tg.cancel_scope.cancel()


async def test_request_fields_are_bounded_before_anything_is_looked_up(
    master_tg: anyio.abc.TaskGroup, gate: Gate
) -> None:
    master = await started_master(master_tg, gate)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(name="echo", job_id="x" * 257), "id: must be printable and at most 256 characters"),
        (dict(name="e" * 129, job_id="n"), "name: at most 128 characters"),
        (dict(name="echo", job_id="p", params={str(i): "" for i in range(65)}),
         "params: at most 64 entries"),
        (dict(name="echo", job_id="k", params={"k" * 129: ""}),
         "params: keys must be printable and at most 128 characters"),
        (dict(name="echo", job_id="v", params={"big": "x" * (64 * 1024 + 1)}),
         "params.big: at most 65536 bytes"),
    ]  # fmt: skip
    for kwargs, reason in cases:
        with pytest.raises(InvalidJobRequest) as info:
            master.submit_nowait(**kwargs)
        assert str(info.value) == reason
    with pytest.raises(InvalidJobRequest, match=r"^id: at most 256 characters$"):
        master.get("x" * 1_000_000)
    with pytest.raises(JobNotFound) as missing:
        master.get("y" * 200)
    assert str(missing.value) == f"no job with id {'y' * 64!r}… (200 characters)"


async def test_results_and_history_are_bounded_in_bytes(
    master_tg: anyio.abc.TaskGroup, gate: Gate
) -> None:
    master = await started_master(
        master_tg, gate, max_result_bytes=10_000, history_max_bytes=100_000
    )
    too_big = await master.run_and_wait("echo", job_id="big", params={"v": "x" * 20_000})
    assert too_big.state is JobState.FAILED
    assert too_big.error == "result is 20008 bytes of JSON, over worker.max_result_bytes (10000)"
    for i in range(20):  # ~9 KB of parameters and result each: about 10 fit in 100 KB
        await master.run_and_wait("echo", job_id=f"h{i}", params={"v": "x" * 4_000})
    remembered = [r.id for r in master.jobs()]
    assert remembered[0] == "h19"
    assert 5 <= len(remembered) <= 12, remembered
    with pytest.raises(JobNotFound):
        master.get("h0")
