"""In-memory stand-ins for the trigger's tests: an orchestrator, and replicas that can be killed.

`FakeOrchestrator` keeps the `OrchestratorClient` contract on the loop clock (trio's MockClock
makes it virtual): ids are idempotent (a known id with other params answers as the real
client does, with `differs`), a job runs for `job_seconds` (or its `seconds`
parameter), and it can be down, full (RESOURCE_EXHAUSTED with a retry-after) or refusing.
`ReplicaSet` starts `TriggerReplica`s on a shared `MemoryScheduleStore` and kills them as
SIGKILL would: the replica's scope is cancelled and nothing of it runs again (no drain, no
lease released).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar, cast

import anyio
import anyio.abc
import anyio.lowlevel

from app.core.clock import LoopClock
from app.fleet.batch_job import BatchJob
from app.fleet.schedules import TickDecision
from app.orchestrator.admission import reuse_problem
from app.stores.abc import ScheduleStore
from app.stores.memory import MemoryScheduleStore
from app.trigger.orchestrator_client import CallFailed, JobView, Submitted, TickJob
from app.trigger.replica import TriggerReplica

T = TypeVar("T")
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@dataclass
class FakeJob:
    job_id: str
    submitted_at: float
    seconds: float
    cancelled: bool = False
    job_type: str = "echo"
    params: dict[str, str] = field(default_factory=dict)

    def state(self) -> str:
        if self.cancelled:
            return "CANCELLED"
        return "RUNNING" if anyio.current_time() < self.submitted_at + self.seconds else "SUCCEEDED"


@dataclass
class FakeOrchestrator:
    """The orchestrator's Submit, GetJob and CancelJob, in memory."""

    job_seconds: float = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    submits: Counter[str] = field(default_factory=Counter)
    submit_times: list[float] = field(default_factory=list)
    schedules: dict[str, str] = field(default_factory=dict)  # job id -> the schedule it named
    cancelled: list[str] = field(default_factory=list)
    down: bool = False
    retry_after: float | None = None  # set: RESOURCE_EXHAUSTED with this hint
    refuse: str = ""  # set: a final refusal with this reason

    async def _half(self) -> None:
        low, high = self.latency
        await anyio.sleep(self.rng.uniform(low, high) / 2) if high else (
            await anyio.lowlevel.checkpoint()
        )

    def _check(self) -> None:
        if self.down:
            raise CallFailed(
                "unreachable: ConnectionRefusedError: [Errno 111] Connection refused",
                retryable=True,
            )

    async def submit(self, job: TickJob) -> Submitted:
        await self._half()  # the request on its way: a kill here leaves no job
        self.submits[job.job_id] += 1
        self.schedules[job.job_id] = job.schedule
        self.submit_times.append(anyio.current_time())
        self._check()
        if self.refuse:
            raise CallFailed(self.refuse, retryable=False)
        if self.retry_after is not None:
            raise CallFailed(
                "RESOURCE_EXHAUSTED: queue for job type 'echo' is full",
                retryable=True,
                retry_after=self.retry_after,
            )
        known = self.jobs.get(job.job_id)
        differs = ""
        if known is None:
            seconds = float(job.params.get("seconds", self.job_seconds))
            self.jobs[job.job_id] = FakeJob(
                job.job_id, anyio.current_time(), seconds,
                job_type=job.job_type, params=dict(job.params),
            )  # fmt: skip
        else:  # the orchestrator's ALREADY_EXISTS, as the real client answers it
            differs = (
                reuse_problem(
                    BatchJob(job_id=job.job_id, job_type=job.job_type, params=dict(job.params)),
                    BatchJob(job_id=known.job_id, job_type=known.job_type, params=known.params),
                )
                or ""
            )
        await self._half()  # the answer on its way back: a kill here loses only the answer
        return Submitted(job_id=job.job_id, state="" if differs else "PENDING",
                         existing=known is not None, differs=differs)  # fmt: skip

    async def get_job(self, job_id: str) -> JobView | None:
        await self._half()
        self._check()
        job = self.jobs.get(job_id)
        await self._half()
        if job is None:
            return None
        state = job.state()
        return JobView(job_id=job_id, state=state, unfinished=state == "RUNNING")

    async def cancel_job(self, job_id: str) -> JobView | None:
        await self._half()
        self._check()
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.state() == "RUNNING":
            job.cancelled = True
            self.cancelled.append(job_id)
        return JobView(job_id=job_id, state=job.state(), unfinished=False)


class Gate:
    """Kills a replica at its n-th store or orchestrator call: `before` it reaches the other
    side, or `after` (the call done, its answer lost)."""

    def __init__(self) -> None:
        self.calls = 0
        self.kill_at: int | None = None
        self.after = False
        self.victim: anyio.CancelScope | None = None
        self.killed_in = ""
        self.names: list[str] = []

    async def through(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        self.calls += 1
        self.names.append(name)
        if self.calls == self.kill_at and not self.after:
            return await self._die(name)
        result = await call()
        if self.calls == self.kill_at:
            return await self._die(name)
        return result

    async def _die(self, name: str) -> NoReturn:
        assert self.victim is not None
        self.killed_in = name
        self.victim.cancel()
        await anyio.sleep_forever()
        raise AssertionError("a killed replica ran on")


class GatedStore:
    """A ScheduleStore whose calls go through a Gate."""

    def __init__(self, store: ScheduleStore, gate: Gate) -> None:
        self._store, self._gate = store, gate

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._gate.through(name, lambda: method(*args, **kwargs))

        return call


class GatedClient:
    """An OrchestratorClient whose calls go through a Gate."""

    def __init__(self, client: FakeOrchestrator, gate: Gate) -> None:
        self._client, self._gate = client, gate

    async def submit(self, job: TickJob) -> Submitted:
        return await self._gate.through("submit", lambda: self._client.submit(job))

    async def get_job(self, job_id: str) -> JobView | None:
        return await self._gate.through("get_job", lambda: self._client.get_job(job_id))

    async def cancel_job(self, job_id: str) -> JobView | None:
        return await self._gate.through("cancel_job", lambda: self._client.cancel_job(job_id))


@dataclass
class Handle:
    replica: TriggerReplica
    scope: anyio.CancelScope
    alive: bool = True


class ReplicaSet:
    """Replicas on one store and one orchestrator, in `tg`; `kill` is a SIGKILL."""

    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        store: MemoryScheduleStore,
        orchestrator: FakeOrchestrator,
        clock: LoopClock,
        *,
        lease_seconds: float = 2.0,
        ledger_limit: int = 100_000,
    ) -> None:
        self.tg, self.store, self.orchestrator, self.clock = tg, store, orchestrator, clock
        self.lease_seconds = lease_seconds
        self.ledger_limit = ledger_limit
        self.handles: list[Handle] = []
        self.kills = 0

    async def start(
        self,
        *,
        store: Any = None,
        client: Any = None,
        name: str = "",
        scope: anyio.CancelScope | None = None,
    ) -> Handle:
        """A replica, started: back once it reports ready (or has died trying)."""
        replica = TriggerReplica(
            store or self.store,
            client or self.orchestrator,
            replica_id=name or f"r{len(self.handles)}",
            clock=self.clock,
            lease_seconds=self.lease_seconds,
            ledger_limit=self.ledger_limit,
            drain_grace_seconds=1.0,
        )
        handle = Handle(replica, scope or anyio.CancelScope())
        ready = anyio.Event()

        class Status:
            def started(self, value: None = None) -> None:
                ready.set()

        async def run() -> None:
            try:
                with handle.scope:
                    await replica.run(task_status=cast(Any, Status()))
            finally:
                handle.alive = False
                ready.set()

        self.tg.start_soon(run)
        await ready.wait()
        self.handles.append(handle)
        return handle

    def live(self) -> list[Handle]:
        return [h for h in self.handles if h.alive and not h.scope.cancel_called]

    def kill(self, handle: Handle) -> None:
        handle.scope.cancel()
        handle.alive = False
        self.kills += 1

    def stop_all(self) -> None:
        for handle in self.handles:
            handle.scope.cancel()


async def ledger(store: ScheduleStore, name: str) -> list[TickDecision]:
    """Every decision of `name`, oldest first."""
    return await store.decisions(name, limit=1_000_000, newest_first=False)


def wall(clock: LoopClock) -> float:
    return clock.timestamp()
