"""Trigger replicas in one process on virtual time: trio's MockClock, the in-memory store and
orchestrator twins (tests/trigger_twins.py). Days of ticks in milliseconds; replicas killed as
SIGKILL would (their scope cancelled, nothing of them runs again) at random moments and at every
call of a tick in turn; each fire time must be submitted once and decided once.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec
import pytest
import trio.testing
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.core.clock import LoopClock
from app.fleet.schedules import (
    ScheduleSource,
    ScheduleSpec,
    TickCause,
    TickDecision,
    TickKind,
    tick_job_id,
    trigger_for,
)
from app.pb import trigger as pb
from app.scheduling.decisions import Overlap
from app.stores.abc import PutMode
from app.stores.memory import MemoryScheduleStore
from app.trigger.service import TriggerService
from app.trigger.ticks import ticks_between
from tests.helpers import eventually
from tests.trigger_twins import (
    T0,
    FakeJob,
    FakeOrchestrator,
    Gate,
    GatedClient,
    GatedStore,
    ReplicaSet,
    ledger,
)

pytestmark = pytest.mark.anyio
T = TypeVar("T")

START = T0.timestamp()


@pytest.fixture
def anyio_backend() -> Any:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@dataclass
class World:
    store: MemoryScheduleStore
    orchestrator: FakeOrchestrator
    clock: LoopClock
    replicas: ReplicaSet
    tg: anyio.abc.TaskGroup

    async def add(self, name: str = "s", **fields: Any) -> ScheduleSpec:
        fields.setdefault("job_type", "echo")
        if "cron" not in fields:
            fields.setdefault("interval_seconds", 10.0)
        fields.setdefault("misfire_grace_seconds", 10.0)
        now = self.clock.timestamp()
        spec = ScheduleSpec(name=name, created_at=now, updated_at=now, since=now, **fields)
        _, stored = await self.store.put(spec, mode=PutMode.CREATE)
        assert stored is not None
        for handle in self.replicas.live():
            handle.replica.wake()
        return stored

    async def run_until(self, wall: float) -> None:
        await anyio.sleep(max(0.0, wall - self.clock.timestamp()))

    def service(self) -> TriggerService:
        (handle, *_) = self.replicas.live()
        return TriggerService(
            self.store, self.orchestrator, handle.replica, clock=self.clock,
            min_grace=2 * self.replicas.lease_seconds, ledger_size=100_000,
            ledger_retention_seconds=30 * 86_400,
        )  # fmt: skip


@pytest.fixture
async def world() -> AsyncIterator[World]:
    store = MemoryScheduleStore(ledger_size=100_000)
    orchestrator = FakeOrchestrator()
    clock = LoopClock(T0)
    async with anyio.create_task_group() as tg:
        replicas = ReplicaSet(tg, store, orchestrator, clock)
        yield World(store, orchestrator, clock, replicas, tg)
        replicas.stop_all()


def nominal(spec: ScheduleSpec, until: float) -> list[float]:
    """The schedule's fire times from its start up to `until`."""
    return [t.timestamp for t in ticks_between(trigger_for(spec), spec.since, until,
                                                limit=1_000_000) if t.runs]  # fmt: skip


async def decided(world: World, spec: ScheduleSpec) -> list[TickDecision]:
    return await ledger(world.store, spec.name)


async def assert_each_tick_once(world: World, spec: ScheduleSpec) -> list[TickDecision]:
    """One decision per fire time up to the cursor, each fired, each one job submitted once."""
    records = await decided(world, spec)
    upto = (await world.store.cursor(spec.name)).tick
    assert upto is not None
    assert [r.tick for r in records] == nominal(spec, upto)
    assert Counter(r.kind for r in records) == {TickKind.FIRED: len(records)}, [
        (r.tick_text, r.kind, r.reason) for r in records if r.kind is not TickKind.FIRED
    ]
    jobs = {j for j in world.orchestrator.jobs if j.startswith(f"{spec.name}@")}
    assert jobs == {r.job_id for r in records}
    assert all(r.job_id == tick_job_id(spec.name, r.tick) for r in records)
    return records


# --- one replica ----------------------------------------------------------------------------------


async def test_a_day_of_ticks_each_submitted_once(world: World) -> None:
    world.replicas.lease_seconds = 15.0  # fewer scans: a day of them costs real time
    await world.replicas.start()
    minute = await world.add("minutely", cron="* * * * *", misfire_grace_seconds=30.0)
    fast = await world.add("fast", interval_seconds=45.0, misfire_grace_seconds=30.0)
    await world.run_until(START + 86_400 + 1)
    records = await assert_each_tick_once(world, minute)
    assert len(records) == 1440
    assert len(await assert_each_tick_once(world, fast)) == 86_400 // 45
    assert max(r.late_seconds for r in records) < 0.01  # on time, to the virtual millisecond
    stats = world.replicas.handles[0].replica.statistics()
    assert stats.decided["fired"] == len(await decided(world, fast)) + 1440
    assert stats.owned == 2
    # each job names its schedule, for the orchestrator to record (ListJobs filters on it)
    named = world.orchestrator.schedules
    assert {named[tick_job_id(minute.name, r.tick)] for r in records} == {"minutely"}
    assert set(named.values()) == {"minutely", "fast"}


async def test_the_orchestrator_down_longer_than_the_grace_gives_missed_with_the_reason(
    world: World,
) -> None:
    await world.replicas.start()
    spec = await world.add(interval_seconds=5.0, misfire_grace_seconds=10.0)
    await world.run_until(START + 21)
    world.orchestrator.down = True
    await world.run_until(START + 61)
    world.orchestrator.down = False
    await world.run_until(START + 100)
    by_tick = {r.tick - START: r for r in await decided(world, spec)}
    assert sorted(by_tick) == [float(t) for t in range(5, 100, 5)]
    missed = sorted(t for t, r in by_tick.items() if r.kind is TickKind.MISSED)
    # down from 21 to 61: 25..50 gave up after their grace; 55 and 60 were still in theirs
    assert missed == [25.0, 30.0, 35.0, 40.0, 45.0, 50.0]
    record = by_tick[25.0]
    assert record.cause is TickCause.UNREACHABLE
    assert record.grace_seconds == 10.0
    assert "the last: unreachable: ConnectionRefusedError" in record.reason
    assert 10.0 <= record.late_seconds < 10.5
    assert record.attempts >= 3
    late = by_tick[55.0]
    assert (late.kind, late.existing) == (TickKind.FIRED, False)
    assert 6.0 <= late.late_seconds < 10.0
    stats = world.replicas.handles[0].replica.statistics()
    assert stats.missed["unreachable"] == 6


async def test_resource_exhausted_is_retried_after_the_hint(world: World) -> None:
    await world.replicas.start()
    spec = await world.add(interval_seconds=60.0, misfire_grace_seconds=30.0)
    world.orchestrator.retry_after = 4.0
    await world.run_until(START + 69)
    world.orchestrator.retry_after = None
    await world.run_until(START + 80)
    (record,) = await decided(world, spec)
    assert record.kind is TickKind.FIRED
    times = world.orchestrator.submit_times
    assert len(times) == 4  # at 60, 64, 68 (full), 72 (taken)
    assert all(b - a >= 4.0 for a, b in itertools.pairwise(times))
    assert 12.0 <= record.late_seconds < 12.1


async def test_a_hint_past_the_grace_is_not_waited_out_beyond_it(world: World) -> None:
    await world.replicas.start()
    spec = await world.add(interval_seconds=60.0, misfire_grace_seconds=30.0)
    world.orchestrator.retry_after = 45.0
    await world.run_until(START + 100)
    (record,) = await decided(world, spec)
    assert (record.kind, record.cause) == (TickKind.MISSED, TickCause.UNREACHABLE)
    assert len(world.orchestrator.submit_times) == 1  # no call before the hint's time
    assert "RESOURCE_EXHAUSTED" in record.reason
    assert 30.0 <= record.late_seconds < 30.1


async def test_a_refusal_is_final_and_recorded(world: World) -> None:
    await world.replicas.start()
    spec = await world.add(interval_seconds=60.0)
    world.orchestrator.refuse = "INVALID_ARGUMENT: params.n: expected an integer, got 'x'"
    await world.run_until(START + 61)
    (record,) = await decided(world, spec)
    assert (record.kind, record.cause) == (TickKind.MISSED, TickCause.REFUSED)
    assert record.reason == (
        "the orchestrator refused it: INVALID_ARGUMENT: params.n: expected an integer, got 'x'"
    )
    assert len(world.orchestrator.submit_times) == 1


async def test_a_tick_whose_job_exists_with_other_params_counts_as_run(world: World) -> None:
    """The schedule's params changed after its tick's job was first submitted: the orchestrator
    refuses the resubmit (ALREADY_EXISTS), and the trigger takes that job as the tick's run,
    says so, and neither misses the tick nor submits it again."""
    await world.replicas.start()
    spec = await world.add(params={"n": "2"}, interval_seconds=60.0)
    first = tick_job_id(spec.name, START + 60)
    world.orchestrator.jobs[first] = FakeJob(first, 0.0, 0.0, params={"n": "1"})
    await world.run_until(START + 121)
    records = await decided(world, spec)
    assert [(r.kind, r.job_id, r.existing) for r in records] == [
        (TickKind.FIRED, first, True),
        (TickKind.FIRED, tick_job_id(spec.name, START + 120), False),
    ]
    earlier = (f"its job was submitted earlier with other params (job {first!r} exists with"
               " other params: params.n was '1', now '2')")  # fmt: skip
    assert records[0].reason == earlier
    assert world.orchestrator.submits[first] == 1
    assert world.orchestrator.jobs[records[1].job_id].params == {"n": "2"}
    why = await world.service().explain(pb.ExplainRequest(name="s", at="2026-03-01T00:01:00Z"))
    assert why.sentence.startswith(f"s ran for 2026-03-01T00:01:00+00:00: job {first}")
    assert earlier in why.sentence


async def test_params_changed_between_a_tick_s_submit_and_its_retry_lose_no_tick(
    world: World,
) -> None:
    """Replica A submits tick 10 and is killed before the answer reaches it; the schedule's
    params change; replica B takes the tick over, finds its job (the first submission's), and
    records it as run. The next tick runs with the new params."""

    class KilledAfterSubmit(Gate):
        async def through(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
            result = await call()
            if name == "submit":
                await self._die(name)
            return result

    gate = KilledAfterSubmit()
    gate.victim = anyio.CancelScope()
    spec = await world.add(params={"n": "1"})
    await world.replicas.start(
        store=GatedStore(world.store, gate), client=GatedClient(world.orchestrator, gate),
        name="a", scope=gate.victim,
    )  # fmt: skip
    await world.run_until(START + 11)
    assert gate.killed_in == "submit"
    ten = tick_job_id(spec.name, START + 10)
    assert world.orchestrator.jobs[ten].params == {"n": "1"}
    await world.store.put(
        msgspec.structs.replace(spec, params={"n": "2"}), mode=PutMode.UPDATE,
        expected_version=spec.version,
    )  # fmt: skip
    await world.replicas.start(name="b")
    await world.run_until(START + 25)
    records = await decided(world, spec)
    assert [(r.tick - START, r.kind, r.existing) for r in records] == [
        (10.0, TickKind.FIRED, True), (20.0, TickKind.FIRED, False),
    ]  # fmt: skip
    assert world.orchestrator.submits[ten] == 1
    assert world.orchestrator.jobs[records[1].job_id].params == {"n": "2"}


# --- overlap, judged on the orchestrator ----------------------------------------------------------


async def test_overlap_forbid_across_replicas_names_the_job_still_running(world: World) -> None:
    world.orchestrator.job_seconds = 25.0
    first = await world.replicas.start()
    await world.replicas.start()
    spec = await world.add(interval_seconds=10.0, overlap=Overlap.FORBID)
    await world.run_until(START + 15)
    owner = next(h for h in world.replicas.live() if h.replica.owned())
    world.replicas.kill(owner)  # the other one judges against the orchestrator, not memory
    await world.run_until(START + 61)
    records = {r.tick - START: r for r in await decided(world, spec)}
    kinds = {t: (r.kind, r.blocking_job) for t, r in records.items()}
    assert kinds == {
        10.0: (TickKind.FIRED, ""),
        20.0: (TickKind.SKIPPED, spec.name + "@2026-03-01T00:00:10Z"),
        30.0: (TickKind.SKIPPED, spec.name + "@2026-03-01T00:00:10Z"),
        40.0: (TickKind.FIRED, ""),
        50.0: (TickKind.SKIPPED, spec.name + "@2026-03-01T00:00:40Z"),
        60.0: (TickKind.SKIPPED, spec.name + "@2026-03-01T00:00:40Z"),
    }
    assert records[20.0].blocking_state == "RUNNING"
    assert records[20.0].cause is TickCause.OVERLAP
    assert len(world.orchestrator.jobs) == 2
    assert first in world.replicas.handles


async def test_overlap_replace_cancels_the_previous_job(world: World) -> None:
    world.orchestrator.job_seconds = 25.0
    await world.replicas.start()
    spec = await world.add(interval_seconds=10.0, overlap=Overlap.REPLACE)
    await world.run_until(START + 21)
    first, second = await decided(world, spec)
    assert (second.kind, second.blocking_job) == (TickKind.FIRED, first.job_id)
    assert world.orchestrator.cancelled == [first.job_id]


async def test_overlap_allow_runs_every_tick(world: World) -> None:
    world.orchestrator.job_seconds = 25.0
    await world.replicas.start()
    spec = await world.add(interval_seconds=10.0, overlap=Overlap.ALLOW)
    await world.run_until(START + 51)
    await assert_each_tick_once(world, spec)


# --- high availability ----------------------------------------------------------------------------


async def test_replicas_killed_at_random_lose_and_repeat_no_tick(world: World) -> None:
    rng = random.Random(11)
    world.orchestrator.latency = (0.0, 0.4)  # kills land in the middle of calls too
    for _ in range(3):
        await world.replicas.start()
    specs = [
        await world.add("every-second", interval_seconds=1.0, misfire_grace_seconds=8.0),
        await world.add("every-7s", interval_seconds=7.0),
        await world.add("minutely", cron="* * * * *", misfire_grace_seconds=30.0),
        await world.add("odd", cron="*/13 * * * * *", misfire_grace_seconds=20.0),
    ]
    end = START + 3600
    while world.clock.timestamp() < end:
        await anyio.sleep(rng.uniform(1.0, 20.0))
        live = world.replicas.live()
        victim = rng.choice(live)
        world.replicas.kill(victim)
        if len(live) == 1 or rng.random() < 0.7:
            await anyio.sleep(rng.uniform(0.0, 3.0))
            await world.replicas.start()
    await world.run_until(end + 30)
    total = existing = 0
    for spec in specs:
        records = await assert_each_tick_once(world, spec)
        total += len(records)
        existing += sum(r.existing for r in records)
        assert max(r.late_seconds for r in records) < spec.misfire_grace_seconds
    assert world.replicas.kills >= 250
    assert total >= 3600 + 514 + 60 + 276
    # a replica that took a tick over found its job (`existing`), or submitted it again and the
    # orchestrator answered with the job there (one job each, as checked above)
    repeated = sum(n - 1 for n in world.orchestrator.submits.values())
    assert existing + repeated > 0  # the kills did land between taking a tick and recording it
    print(f"\n{world.replicas.kills} kills, {total} ticks each decided once and one job each;"
          f" {existing} taken over with their job found, {repeated} submits repeated")  # fmt: skip


@pytest.mark.parametrize("after", [False, True], ids=["before-the-call", "after-the-call"])
async def test_a_replica_killed_at_each_call_of_a_tick_loses_nothing(
    world: World, after: bool
) -> None:
    """Kill replica A at its n-th call (store or orchestrator) for every n up to the end of
    its first tick, before the call reaches the other side or after (the answer lost); replica
    B, started then, finishes the tick: one decision, one job."""

    async def one_round(kill_at: int | None) -> tuple[Gate, MemoryScheduleStore, FakeOrchestrator]:
        store = MemoryScheduleStore()
        orchestrator = FakeOrchestrator()
        clock = LoopClock(T0)  # each round on the grid: its first tick 10 s after it starts
        gate = Gate()
        gate.kill_at, gate.after = kill_at, after
        async with anyio.create_task_group() as tg:
            replicas = ReplicaSet(tg, store, orchestrator, clock)
            now = clock.timestamp()
            spec = ScheduleSpec(
                name="s", job_type="echo", interval_seconds=10.0, misfire_grace_seconds=10.0,
                since=now, created_at=now,
            )  # fmt: skip
            await store.put(spec, mode=PutMode.CREATE)
            scope = anyio.CancelScope()
            gate.victim = scope
            await replicas.start(
                store=GatedStore(store, gate), client=GatedClient(orchestrator, gate),
                name="a", scope=scope,
            )  # fmt: skip
            await anyio.sleep(12)  # the first tick is due at +10
            await replicas.start(name="b")
            await anyio.sleep(25)
            replicas.stop_all()
        records = await ledger(store, "s")
        assert [r.tick for r in records][:2] == [now + 10, now + 20], (kill_at, gate.killed_in)
        assert all(r.kind is TickKind.FIRED for r in records), (kill_at, gate.killed_in, records)
        assert {r.job_id for r in records} == set(orchestrator.jobs)
        return gate, store, orchestrator

    dry, _, _ = await one_round(None)
    last = dry.names.index("decide") + 1  # A's calls up to the first tick's decision
    killed_in = set()
    for n in range(1, last + 2):
        gate, store, orchestrator = await one_round(n)
        killed_in.add(gate.killed_in)
        if gate.killed_in == "submit" and after:
            (first, *_) = await ledger(store, "s")
            assert first.existing  # B found the job A's lost answer was about
            assert orchestrator.submits[first.job_id] == 1
    assert {"set_pending", "submit", "decide", "acquire"} <= killed_in


async def test_a_drained_replica_hands_its_schedules_over_at_once(world: World) -> None:
    first = await world.replicas.start(name="a")
    spec = await world.add(interval_seconds=10.0)
    await world.run_until(START + 11)
    assert first.replica.owned() == ["s"]
    second = await world.replicas.start(name="b")
    first.replica.begin_drain()
    with anyio.fail_after(1.0):  # well inside a lease (2 s): released, then taken
        await first.replica.wait_stopped()
    await eventually(lambda: second.replica.owned() == ["s"], within=1.0)
    assert await world.store.replicas(now=world.clock.timestamp()) == ["b"]
    await world.run_until(START + 41)
    await assert_each_tick_once(world, spec)


async def test_a_returning_replica_gets_its_share_back(world: World) -> None:
    first = await world.replicas.start(name="a")
    specs = [await world.add(f"s{i}", interval_seconds=60.0) for i in range(12)]
    await world.run_until(START + 5)
    assert len(first.replica.owned()) == 12
    second = await world.replicas.start(name="b")
    await world.run_until(START + 200)
    assert 0 < len(second.replica.owned()) < 12
    assert len(first.replica.owned()) + len(second.replica.owned()) == 12
    for spec in specs:
        await assert_each_tick_once(world, spec)


async def test_no_replica_for_a_week_then_one_records_the_misses_compactly(world: World) -> None:
    spec = await world.add(interval_seconds=60.0, misfire_grace_seconds=30.0)
    await world.run_until(START + 7 * 86_400)
    world.replicas.ledger_limit = 50
    await world.replicas.start()
    await world.run_until(START + 7 * 86_400 + 1)
    records = await decided(world, spec)
    missed = [r for r in records if r.kind is TickKind.MISSED]
    assert len(missed) == 50
    assert sum(r.count for r in missed) == 7 * 1440 - 1  # every fire time but the last
    assert {r.cause for r in missed} == {TickCause.NO_REPLICA}
    assert records[-1].kind is TickKind.FIRED  # the last was within its grace


async def test_dst_moves_a_nightly_run_and_the_ledger_says_so(world: World) -> None:
    world.replicas.lease_seconds = 600.0  # three days of scans cost real time
    world.clock.step(datetime_of("2026-03-07T00:00:00-05:00") - world.clock.timestamp())
    await world.replicas.start()
    spec = await world.add("nightly", cron="30 2 * * *", time_zone="America/New_York",
                           misfire_grace_seconds=60.0)  # fmt: skip
    await world.run_until(datetime_of("2026-03-10T00:00:00-04:00"))
    records = await decided(world, spec)
    assert [(r.tick_text, r.kind) for r in records] == [
        ("2026-03-07T02:30:00-05:00", TickKind.FIRED),
        ("2026-03-08T03:00:00-04:00", TickKind.MOVED),
        ("2026-03-09T02:30:00-04:00", TickKind.FIRED),
    ]
    answer = await world.service().explain(pb.ExplainRequest(name="nightly", at="2026-03-08T02:30"))
    assert "DST moved it" in answer.sentence
    assert "2026-03-08 02:30:00 does not exist in America/New_York" in answer.sentence


def datetime_of(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


# --- the API, in process --------------------------------------------------------------------------


def schedule(name: str = "api", **fields: Any) -> pb.Schedule:
    fields.setdefault("job_type", "echo")
    fields.setdefault("interval_seconds", 10.0)
    fields.setdefault("misfire_grace_seconds", 10.0)
    return pb.Schedule(name=name, **fields)


async def test_create_refuses_a_bad_field_by_name(world: World) -> None:
    await world.replicas.start()
    service = world.service()
    for bad, words in (
        (schedule(cron="61 * * * *", interval_seconds=0), "cron: '61 * * * *': minute"),
        (schedule(overlap="maybe"), "overlap: must be 'forbid' or 'allow' or 'replace'"),
        (schedule(time_zone="Nowhere/Land"), "time_zone:"),
        (schedule(misfire_grace_seconds=1), "misfire_grace_seconds: must be at least 4s"),
        (schedule(name="a b"), "name: letters, digits"),
    ):
        with pytest.raises(GRPCError) as caught:
            await service.create_schedule(bad)
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert caught.value.message is not None
        assert caught.value.message.startswith(words), caught.value.message
    await service.create_schedule(schedule())
    with pytest.raises(GRPCError) as caught:
        await service.create_schedule(schedule())
    assert caught.value.status is Status.ALREADY_EXISTS
    for call, words in (
        (service.get_schedule(pb.ScheduleRequest(name="x" * 1_000_000)), "name: letters"),
        (service.explain(pb.ExplainRequest(name="api", at="y" * 1_000_000)), "at: expected"),
        (service.list_decisions(pb.ListDecisionsRequest(name="api", limit=5000)), "limit: "),
        (service.pause_schedule(pb.PauseScheduleRequest(name="api", note="n" * 2000)), "note:"),
    ):
        with pytest.raises(GRPCError) as caught:
            await call
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert (caught.value.message or "").startswith(words)
        assert len(caught.value.message or "") < 200  # one line, the value not echoed whole


async def test_update_pause_resume_and_what_the_config_owns(world: World) -> None:
    await world.replicas.start()
    service = world.service()
    created = await service.create_schedule(schedule())
    await world.run_until(START + 21)
    paused = await service.pause_schedule(pb.PauseScheduleRequest(name="api", note="deploy"))
    assert paused.paused
    await world.run_until(START + 41)
    await service.resume_schedule(pb.ScheduleRequest(name="api"))
    await world.run_until(START + 51)
    records = await ledger(world.store, "api")
    assert [(r.tick - START, r.kind, r.cause) for r in records] == [
        (10.0, TickKind.FIRED, TickCause.NONE), (20.0, TickKind.FIRED, TickCause.NONE),
        (30.0, TickKind.MISSED, TickCause.PAUSED), (40.0, TickKind.MISSED, TickCause.PAUSED),
        (50.0, TickKind.FIRED, TickCause.NONE),
    ]  # fmt: skip
    assert records[2].reason == "paused since 2026-03-01T00:00:21+00:00: deploy"
    stale = schedule(params={"a": "1"}, version=created.version)
    with pytest.raises(GRPCError) as caught:
        await service.update_schedule(stale)
    assert caught.value.status is Status.ABORTED
    updated = await service.update_schedule(schedule(params={"a": "1"}))
    assert (updated.params, updated.created_at) == ({"a": "1"}, created.created_at)
    now = world.clock.timestamp()
    owned = ScheduleSpec(name="cfg", job_type="echo", interval_seconds=60, since=now,
                         source=ScheduleSource.CONFIG)  # fmt: skip
    await world.store.put(owned, mode=PutMode.CREATE)
    for call in (
        service.update_schedule(schedule("cfg")),
        service.delete_schedule(pb.ScheduleRequest(name="cfg")),
    ):
        with pytest.raises(GRPCError) as caught:
            await call
        assert caught.value.status is Status.FAILED_PRECONDITION
        assert "declared in the config" in (caught.value.message or "")
    assert (await service.pause_schedule(pb.PauseScheduleRequest(name="cfg"))).paused
    deleted = await service.delete_schedule(pb.ScheduleRequest(name="api"))
    assert deleted.deleted
    with pytest.raises(GRPCError) as caught:
        await service.get_schedule(pb.ScheduleRequest(name="api"))
    assert caught.value.status is Status.NOT_FOUND
    # the ledger outlives the schedule for `why`
    gone = await service.explain(pb.ExplainRequest(name="api"))
    assert gone.sentence.startswith("api ran for 2026-03-01T00:00:50+00:00")


async def test_trigger_now_runs_at_once_and_counts_for_overlap(world: World) -> None:
    world.orchestrator.job_seconds = 15.0
    await world.replicas.start()
    service = world.service()
    await service.create_schedule(schedule(overlap="forbid"))
    await world.run_until(START + 5)
    answer = await service.trigger_schedule(pb.ScheduleRequest(name="api"))
    assert answer.job_id == "api@manual-2026-03-01T00:00:05Z"
    assert world.orchestrator.schedules[answer.job_id] == "api"  # a run by hand is its run too
    assert answer.decision is not None
    assert answer.decision.kind == "triggered"
    await world.run_until(START + 11)
    records = await ledger(world.store, "api")
    assert [(r.kind, r.blocking_job) for r in records] == [
        (TickKind.TRIGGERED, ""), (TickKind.SKIPPED, answer.job_id),
    ]  # fmt: skip
    why = await service.explain(pb.ExplainRequest(name="api", at="2026-03-01T00:00:10Z"))
    assert why.sentence.startswith("api did not run at 2026-03-01T00:00:10+00:00: its overlap")
    world.orchestrator.down = True
    with pytest.raises(GRPCError) as caught:
        await service.trigger_schedule(pb.ScheduleRequest(name="api"))
    assert caught.value.status is Status.UNAVAILABLE
    assert "ConnectionRefusedError" in (caught.value.message or "")


async def test_backfill_submits_each_missed_fire_time_once_oldest_first(world: World) -> None:
    handle = await world.replicas.start()
    service = world.service()
    await service.create_schedule(schedule())
    await world.run_until(START + 21)
    world.orchestrator.down = True
    await world.run_until(START + 75)  # 30..60 missed (each after its grace); 70 late
    world.orchestrator.down = False
    await world.run_until(START + 95)
    before = [(r.tick - START, r.kind) for r in await ledger(world.store, "api")]
    assert before[2:6] == [(t, TickKind.MISSED) for t in (30.0, 40.0, 50.0, 60.0)]
    first = await service.backfill_schedule(
        pb.BackfillRequest(name="api", start="2026-03-01T00:00:00Z", max_ticks=4)
    )
    assert [d.tick for d in first.submitted] == [
        "2026-03-01T00:00:30+00:00", "2026-03-01T00:00:40+00:00",
    ]  # fmt: skip
    assert first.already_ran == 2  # 10 and 20 ran; the cap of 4 fire times stopped at 40
    assert first.next_start == "2026-03-01T00:00:50+00:00"
    assert first.submitted[0].previous.startswith("api did not run at 2026-03-01T00:00:30")
    rest = await service.backfill_schedule(pb.BackfillRequest(name="api", start=first.next_start))
    assert [d.tick for d in rest.submitted] == [
        "2026-03-01T00:00:50+00:00", "2026-03-01T00:01:00+00:00",
    ]  # fmt: skip
    again = await service.backfill_schedule(
        pb.BackfillRequest(name="api", start="2026-03-01T00:00:00Z")
    )
    assert (len(again.submitted), again.error) == (0, "")
    records = await ledger(world.store, "api")
    assert [r.kind for r in records[:9]] == [TickKind.FIRED] * 2 + [TickKind.BACKFILLED] * 4 + [
        TickKind.FIRED
    ] * 3
    assert world.orchestrator.submits["api@2026-03-01T00:00:30Z"] >= 1
    assert {r.job_id for r in records} == set(world.orchestrator.jobs)
    assert handle.replica.statistics().decided["missed"] == 4
    with pytest.raises(GRPCError) as caught:
        await service.backfill_schedule(pb.BackfillRequest(name="api", start="yesterday"))
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert (caught.value.message or "").startswith("start: expected an ISO 8601 time")


async def test_a_backfill_takes_a_job_submitted_with_other_params_as_the_run(
    world: World,
) -> None:
    await world.replicas.start()
    service = world.service()
    await service.create_schedule(schedule(params={"n": "1"}))
    world.orchestrator.down = True
    await world.run_until(START + 35)  # 10 and 20 missed past their grace
    world.orchestrator.down = False
    # the tick at 10 did reach the orchestrator (its answer was lost), before a change
    ten = tick_job_id("api", START + 10)
    world.orchestrator.jobs[ten] = FakeJob(ten, 0.0, 0.0, params={"n": "0"})
    await service.update_schedule(schedule(params={"n": "2"}))
    done = await service.backfill_schedule(
        pb.BackfillRequest(name="api", start="2026-03-01T00:00:00Z", end="2026-03-01T00:00:20Z")
    )
    assert done.error == ""
    assert [(d.job_id, d.existing) for d in done.submitted] == [
        (ten, True), (tick_job_id("api", START + 20), False),
    ]  # fmt: skip
    assert done.submitted[0].reason == (
        f"its job was submitted earlier with other params (job {ten!r} exists with other"
        " params: params.n was '0', now '2')"
    )
    assert world.orchestrator.jobs[done.submitted[1].job_id].params == {"n": "2"}


async def test_list_shows_next_fire_times_owner_and_last_decision(world: World) -> None:
    handle = await world.replicas.start(name="only")
    service = world.service()
    await service.create_schedule(schedule())
    await world.run_until(START + 11)
    listing = await service.list_schedules(pb.ListSchedulesRequest(next_fire_times=2))
    (status,) = listing.schedules
    assert status.owner == "only" == handle.replica.replica_id
    assert status.next_fire_times == ["2026-03-01T00:00:20+00:00", "2026-03-01T00:00:30+00:00"]
    assert status.last_decision is not None
    assert status.last_decision.sentence.startswith("api ran for 2026-03-01T00:00:10+00:00")
    assert status.decided_up_to == "2026-03-01T00:00:10+00:00"
    assert listing.replicas == ["only"]
    assert status.schedule is not None
    assert (status.schedule.description, status.schedule.misfire_grace_seconds) == (
        "every 10s",
        10.0,
    )
