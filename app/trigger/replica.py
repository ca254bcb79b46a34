"""`TriggerReplica`: one replica of the trigger tier; any number of them share one Redis.

No leader and no configuration of who does what. Every `scan_seconds` (a third of the lease)
a replica:

1. says it is up (a heartbeat in the store's replica set);
2. renews the leases of the schedules it works; a schedule whose lease it lost (another holds
   it, or the lease ran out while the store was away) stops being worked here;
3. takes free leases: at once for the schedules it is the preferred replica of (rendezvous
   hashing over the live replicas spreads schedules across them), and for any other schedule
   that was free at its previous scan as well (its preferred replica is gone);
4. hands a schedule to its preferred replica when that one is up and the schedule's next tick
   is more than two leases away (so that a replica that comes back gets its share again).

Each schedule it holds is worked by a `ScheduleRunner` (see `app.trigger.runner`) in this
replica's task group. Exactly-once does not rest on the lease: a runner's every decision goes
through the store's `decide`, which refuses a replica whose lease is gone or whose cursor is
stale, and job ids are deterministic, so that a submit repeated by a replica that took a tick
over is absorbed by the orchestrator. The lease makes one replica do the work, normally.

A replica SIGKILLed at any point leaves its leases to run out; another replica takes each one
over within `lease_seconds + scan_seconds` and resumes from the cursor, so a tick taken but not
submitted is submitted by the next owner, within the misfire grace (which is at least two
leases). A drain (SIGTERM) stops the runners between steps (those in a step get
`drain_grace_seconds`), releases the leases at once and leaves the replica set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import anyio
import anyio.abc
import msgspec

from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.core.log_context import bind_log_fields
from app.core.outage import Outage
from app.errors import StoreBusy, StoreUnavailable
from app.fleet.schedules import TickCause, TickKind
from app.stores.abc import ScheduleStore
from app.trigger.orchestrator_client import OrchestratorClient
from app.trigger.runner import RunnerContext, ScheduleRunner, TriggerCounters

log = logging.getLogger("app.trigger")


def preferred_replica(name: str, replicas: list[str]) -> str | None:
    """The replica a schedule goes to first: highest random weight (the same on every replica
    that sees the same set)."""

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{replica}\0{name}".encode(), digest_size=8).digest()

    return max(replicas, key=weight, default=None)


class TriggerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one replica: what it holds and what its runners decided."""

    state: Lifecycle
    replica: str
    replicas: int
    schedules: int
    owned: int
    decided: dict[str, int]
    missed: dict[str, int]
    submits: int
    submit_failures: int
    existing: int
    acquired: int
    lost: int
    handed_off: int
    store_failures: int


class TriggerReplica:
    """Works its share of the schedules until drained. Create it in the event loop."""

    def __init__(
        self,
        store: ScheduleStore,
        client: OrchestratorClient,
        *,
        replica_id: str,
        clock: Clock | None = None,
        lease_seconds: float = 10.0,
        ledger_limit: int = 1000,
        drain_grace_seconds: float = 5.0,
    ) -> None:
        self._store = store
        self._clock = clock or SystemClock()
        self.replica_id = replica_id
        self._lease = lease_seconds
        self._scan = lease_seconds / 3
        self._drain_grace = drain_grace_seconds
        self._counters = TriggerCounters()
        self._outage = Outage(
            "the schedule store (Redis)", log=log, clock=self._clock, max_delay=2.0,
            meanwhile="ticks wait for it",
        )  # fmt: skip
        self._ctx = RunnerContext(
            store=store, client=client, clock=self._clock, replica=replica_id,
            lease_seconds=lease_seconds, ledger_limit=ledger_limit,
            refresh_seconds=lease_seconds, counters=self._counters, outage=self._outage,
        )  # fmt: skip
        self._runners: dict[str, ScheduleRunner] = {}
        self._held_until: dict[str, float] = {}  # loop time by which a lease runs out
        self._free_before: set[str] = set()
        self._to_release: list[str] = []
        self._replicas: list[str] = []
        self._schedules = 0
        self._state = Lifecycle.CREATED
        self._tg: anyio.abc.TaskGroup | None = None
        self._wake = anyio.Event()
        self._stopped = anyio.Event()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<TriggerReplica {s.replica} {s.state.value} owned={s.owned}/{s.schedules}"
            f" replicas={s.replicas} fired={s.decided.get('fired', 0)}"
            f" missed={sum(s.missed.values())}>"
        )

    @property
    def state(self) -> Lifecycle:
        """Where the replica is in its life."""
        return self._state

    @property
    def clock(self) -> Clock:
        """The wall clock ticks are read on."""
        return self._clock

    def owned(self) -> list[str]:
        """The schedules this replica works now, by name."""
        return sorted(self._runners)

    def statistics(self) -> TriggerStatistics:
        """Counters since start, and what the replica holds now."""
        c = self._counters
        return TriggerStatistics(
            state=self._state,
            replica=self.replica_id,
            replicas=len(self._replicas),
            schedules=self._schedules,
            owned=len(self._runners),
            decided={k.value: c.decided[k] for k in TickKind},
            missed={k.value: c.missed[k] for k in TickCause if k is not TickCause.NONE},
            submits=c.submits,
            submit_failures=c.submit_failures,
            existing=c.existing,
            acquired=c.acquired,
            lost=c.lost,
            handed_off=c.handed_off,
            store_failures=self._outage.statistics().failures,
        )

    def wake(self, name: str | None = None) -> None:
        """Look again now: at the schedules (one was created or deleted) and, if this replica
        works `name`, at that schedule (it changed)."""
        runner = self._runners.get(name) if name is not None else None
        if runner is not None:
            runner.wake()
        self._wake.set()

    # --- lifecycle --------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Scan and work schedules; ready after the first scan. Returns once drained."""
        if self._state is not Lifecycle.CREATED:
            raise RuntimeError("a TriggerReplica runs once")
        self._state = Lifecycle.STARTING
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._scan_once()
                self._state = Lifecycle.RUNNING
                task_status.started()
                while self._state is Lifecycle.RUNNING:
                    with anyio.move_on_after(self._scan):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                    if self._state is Lifecycle.RUNNING:
                        await self._scan_once()
                await self._drain()
        finally:
            self._state = Lifecycle.STOPPED
            self._tg = None
            self._stopped.set()

    def begin_drain(self) -> None:
        """Stop taking schedules; runners stop between steps; leases are released."""
        if self._state in (Lifecycle.RUNNING, Lifecycle.STARTING):
            self._state = Lifecycle.DRAINING
            self._ctx.draining = True
            self._to_release = list(self._runners)  # runners leave the dict as they stop
            for runner in self._runners.values():
                runner.wake()
            self._wake.set()

    async def wait_stopped(self) -> None:
        """Return once `run` has returned."""
        await self._stopped.wait()

    async def _drain(self) -> None:
        names = sorted({*self._to_release, *self._runners})
        runners = list(self._runners.values())
        with anyio.move_on_after(self._drain_grace):
            for runner in runners:
                await runner.stopped.wait()
        for runner in runners:
            runner.scope.cancel()
        with anyio.move_on_after(2.0, shield=True):
            try:
                for name in names:
                    await self._store.release(name, self.replica_id)
                await self._store.leave(self.replica_id)
            except (StoreUnavailable, StoreBusy) as exc:
                log.warning("drain: could not release the leases (%s); they run out", exc)
        log.info("trigger replica %s drained: %d schedule(s) released", self.replica_id,
                 len(names))  # fmt: skip

    # --- the scan ---------------------------------------------------------------------------------

    async def _scan_once(self) -> None:
        try:
            await self._scan_store()
        except StoreUnavailable as exc:
            self._outage.failed(exc)
        except StoreBusy:
            pass  # this process's connections were all busy (load): the next scan reads again
        else:
            self._outage.succeeded()
        self._drop_expired()

    async def _scan_store(self) -> None:
        store, me = self._store, self.replica_id
        started = anyio.current_time()
        now = self._clock.timestamp()
        await store.heartbeat(me, now=now, ttl_seconds=3 * self._lease)
        self._replicas = await store.replicas(now=now)
        if me not in self._replicas:
            self._replicas = sorted([*self._replicas, me])
        owned = list(self._runners)
        for name, held in zip(owned, await store.renew(owned, me, self._lease), strict=True):
            if held:
                self._held_until[name] = started + self._lease
            else:
                self._stop(name, "its lease is another replica's now")
        names = [spec.name for spec in await store.all()]
        self._schedules = len(names)
        if self._state is not Lifecycle.RUNNING and self._state is not Lifecycle.STARTING:
            return
        others = [n for n in names if n not in self._runners]
        free = {n for n, owner in zip(others, await store.owners(others), strict=True) if not owner}
        for name in sorted(free):
            mine = preferred_replica(name, self._replicas) == me or name in self._free_before
            if mine and await store.acquire(name, me, self._lease):
                self._held_until[name] = started + self._lease
                self._counters.acquired += 1
                log.info("schedule %s: working it here (replica %s)", name, me,
                         extra={"schedule": name})  # fmt: skip
                self._start(name)
        self._free_before = free
        self._hand_off()

    def _hand_off(self) -> None:
        """Give schedules that belong to another live replica back while they are quiet."""
        horizon = self._clock.timestamp() + 2 * self._lease
        for name, runner in list(self._runners.items()):
            preferred = preferred_replica(name, self._replicas)
            idle = runner.idle_until
            if preferred not in (None, self.replica_id) and idle is not None and idle > horizon:
                self._counters.handed_off += 1
                self._stop(name, f"handed to replica {preferred}", release=True)

    def _drop_expired(self) -> None:
        """Stop working schedules whose lease ran out while the store did not answer."""
        now = anyio.current_time()
        for name, until in list(self._held_until.items()):
            if until <= now and name in self._runners:
                self._stop(name, "its lease ran out while the store was away")

    def _start(self, name: str) -> None:
        assert self._tg is not None
        runner = ScheduleRunner(name, self._ctx)
        self._runners[name] = runner

        async def work() -> None:
            bind_log_fields(schedule=name)  # this task's own context: its lines are the schedule's
            try:
                await runner.run()
            finally:
                if self._runners.get(name) is runner:
                    del self._runners[name]
                    self._held_until.pop(name, None)
                    if runner.lost:
                        self._counters.lost += 1

        self._tg.start_soon(work, name=f"schedule {name}")

    def _stop(self, name: str, why: str, *, release: bool = False) -> None:
        runner = self._runners.pop(name, None)
        self._held_until.pop(name, None)
        if runner is None:
            return
        log.info("schedule %s: no longer worked here: %s", name, why, extra={"schedule": name})
        runner.scope.cancel()
        if not release or self._tg is None:
            self._counters.lost += 1
            return

        async def give_back() -> None:
            with anyio.move_on_after(self._lease):
                await runner.stopped.wait()
                with contextlib.suppress(StoreUnavailable, StoreBusy):  # else it runs out
                    await self._store.release(name, self.replica_id)

        self._tg.start_soon(give_back, name=f"release {name}")


def default_replica_id(host: str, pid: int) -> str:
    """`host:pid:xxxx`: unique per process start (a restarted process is a new replica)."""
    import secrets

    return f"{host}:{pid}:{secrets.token_hex(2)}"
