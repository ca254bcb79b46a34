"""`trigger.TriggerService` on grpclib: schedules, runs by hand, the ledger and its answers.

Any replica answers any call: schedules and the ledger live in the store, and a change is seen
by the replica working the schedule at its next step (at once when it is this replica). Errors
are one line naming the field: INVALID_ARGUMENT for a bad schedule or time, NOT_FOUND for an
unknown name, ALREADY_EXISTS, FAILED_PRECONDITION for a change to a schedule the config owns,
ABORTED for a stale `version`, UNAVAILABLE (with a retry-after) while Redis or the orchestrator
cannot serve, or while this replica drains.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.core.clock import Clock, utc_iso
from app.errors import StoreBusy, StoreUnavailable, shown
from app.fleet.schedules import (
    MAX_SCHEDULE_NAME,
    SCHEDULE_NAME,
    InvalidSchedule,
    ScheduleSource,
    ScheduleSpec,
    TickDecision,
    TickKind,
    local_label,
    trigger_for,
)
from app.grpc.status import retry_later
from app.pb import trigger as pb
from app.stores.abc import PutMode, PutResult, ScheduleStore
from app.trigger.by_hand import DEFAULT_BACKFILL, MAX_BACKFILL, backfill, trigger_now
from app.trigger.explain import explain, sentence
from app.trigger.orchestrator_client import CallFailed, OrchestratorClient
from app.trigger.replica import TriggerReplica
from app.trigger.specs import GIVEN, parse_time, spec_from_fields
from app.trigger.ticks import after_for, next_tick

T = TypeVar("T")

#: How long a run by hand, or each fire time of a backfill, may wait for the orchestrator.
BY_HAND_SECONDS = 10.0
STORE_RETRY_SECONDS = 1.0
MAX_NEXT_FIRE_TIMES = 20


def _invalid(field: str, problem: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, f"{field}: {problem}")


def decision_message(d: TickDecision, zone: str = "UTC") -> pb.Decision:
    """The wire form of a ledger record, with its sentence."""
    return pb.Decision(
        schedule=d.schedule,
        tick=d.tick_text or local_label(d.tick, zone),
        kind=d.kind.value,
        cause=d.cause.value,
        reason=d.reason,
        job_id=d.job_id,
        existing=d.existing,
        late_seconds=d.late_seconds,
        jitter_seconds=d.jitter_seconds,
        blocking_job=d.blocking_job,
        blocking_state=d.blocking_state,
        attempts=d.attempts,
        count=d.count,
        first_tick="" if d.first_tick is None else local_label(d.first_tick, zone),
        decided_at=utc_iso(d.decided_at),
        replica=d.replica,
        previous=d.previous,
        sentence=sentence(d, zone),
    )


def schedule_message(spec: ScheduleSpec) -> pb.Schedule:
    """The wire form of a schedule (times as RFC 3339 in UTC)."""
    return pb.Schedule(
        name=spec.name,
        cron=spec.cron,
        interval_seconds=spec.interval_seconds,
        interval_start=utc_iso(spec.interval_start) if spec.interval_seconds else "",
        time_zone=spec.zone_name,
        dst_skipped=spec.dst_skipped.value,
        dst_repeated=spec.dst_repeated.value,
        job_type=spec.job_type,
        params=dict(spec.params),
        overlap=spec.overlap.value,
        misfire_grace_seconds=spec.misfire_grace_seconds,
        jitter_seconds=spec.jitter_seconds,
        deadline_seconds=spec.deadline_seconds,
        timeout_seconds=spec.timeout_seconds,
        priority=spec.priority,
        retry_on_failure=spec.retry_on_failure,
        max_attempts=spec.max_attempts,
        paused=spec.paused,
        paused_at=utc_iso(spec.paused_at),
        pause_note=spec.pause_note,
        source=spec.source.value,
        created_at=utc_iso(spec.created_at),
        updated_at=utc_iso(spec.updated_at),
        version=spec.version,
        description=spec.describe(),
    )


def fields_of(message: pb.Schedule) -> dict[str, Any]:
    """The fields a person gives, from a wire `Schedule`."""
    return {name: getattr(message, name) for name in GIVEN}


class TriggerService(pb.TriggerServiceBase):
    """The trigger tier's RPCs, on the shared store; runs by hand go to the orchestrator."""

    def __init__(
        self,
        store: ScheduleStore,
        client: OrchestratorClient,
        replica: TriggerReplica,
        *,
        clock: Clock,
        min_grace: float,
        ledger_size: int,
        ledger_retention_seconds: float,
    ) -> None:
        self._store = store
        self._client = client
        self._replica = replica
        self._clock = clock
        self._min_grace = min_grace
        self._ledger_size = ledger_size
        self._retention = ledger_retention_seconds
        self.draining = False

    # --- helpers ----------------------------------------------------------------------------------

    async def _store_call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except StoreUnavailable as exc:
            raise retry_later(
                Status.UNAVAILABLE, f"the schedule store is unavailable: {exc}", STORE_RETRY_SECONDS
            ) from None
        except StoreBusy as exc:  # load, not an outage
            raise retry_later(
                Status.RESOURCE_EXHAUSTED, f"trigger busy: {exc}", STORE_RETRY_SECONDS
            ) from None

    def _writable(self) -> None:
        if self.draining:
            raise GRPCError(Status.UNAVAILABLE, "this trigger replica is draining; ask another")

    @staticmethod
    def _name(name: str) -> str:
        # bounded first: a megabyte name never reaches the store or a reason
        if not name or len(name) > MAX_SCHEDULE_NAME or not SCHEDULE_NAME.match(name):
            raise _invalid(
                "name", f"letters, digits and _.- only, 1 to {MAX_SCHEDULE_NAME} characters"
            )
        return name

    async def _get(self, name: str) -> ScheduleSpec:
        spec = await self._store_call(lambda: self._store.get(self._name(name)))
        if spec is None:
            raise GRPCError(Status.NOT_FOUND, f"no schedule named {shown(name)}")
        return spec

    def _time(self, text: str, spec: ScheduleSpec | None, field: str) -> float:
        try:
            return parse_time(text, zone_name=spec.zone_name if spec else "UTC", field=field,
                              now=self._clock.timestamp())  # fmt: skip
        except InvalidSchedule as exc:
            raise _invalid(exc.field, exc.problem) from None

    def _spec(self, message: pb.Schedule, previous: ScheduleSpec | None = None) -> ScheduleSpec:
        try:
            return spec_from_fields(
                fields_of(message), now=self._clock.timestamp(), source=ScheduleSource.RUNTIME,
                min_grace=self._min_grace, previous=previous,
            )  # fmt: skip
        except InvalidSchedule as exc:
            raise _invalid(exc.field, exc.problem) from None

    @staticmethod
    def _owned_by_runtime(spec: ScheduleSpec, what: str) -> None:
        if spec.source is ScheduleSource.CONFIG:
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"schedule {spec.name!r} is declared in the config, which owns it: {what} it there",
            )

    async def _change(
        self, name: str, change: Callable[[ScheduleSpec], ScheduleSpec]
    ) -> ScheduleSpec:
        """Apply `change` to the stored schedule, again if it changed meanwhile."""
        for _ in range(5):
            current = await self._get(name)
            result, stored = await self._store_call(
                lambda current=current: self._store.put(  # type: ignore[misc]
                    change(current), mode=PutMode.UPDATE, expected_version=current.version
                )
            )
            if result is PutResult.WRITTEN and stored is not None:
                self._replica.wake(name)
                return stored
            if result is PutResult.MISSING:
                raise GRPCError(Status.NOT_FOUND, f"no schedule named {shown(name)}")
        raise GRPCError(Status.ABORTED, f"schedule {name!r} keeps changing; try again")

    # --- schedules --------------------------------------------------------------------------------

    async def create_schedule(self, message: pb.Schedule) -> pb.Schedule:
        """Store a new schedule; the replicas take it up within a scan."""
        self._writable()
        spec = self._spec(message)
        result, stored = await self._store_call(lambda: self._store.put(spec, mode=PutMode.CREATE))
        if result is not PutResult.WRITTEN or stored is None:
            source = f" (from the {stored.source.value})" if stored is not None else ""
            raise GRPCError(Status.ALREADY_EXISTS, f"schedule {spec.name!r} exists{source}")
        self._replica.wake(spec.name)
        return schedule_message(stored)

    async def update_schedule(self, message: pb.Schedule) -> pb.Schedule:
        """Replace the definition; pause state, creation time and (unless its fire times
        change) its place in time are kept."""
        self._writable()
        current = await self._get(message.name)
        self._owned_by_runtime(current, "change")
        if message.version and message.version != current.version:
            raise GRPCError(
                Status.ABORTED,
                f"version: the schedule is at version {current.version}, not {message.version}",
            )
        spec = self._spec(message, previous=current)
        result, stored = await self._store_call(
            lambda: self._store.put(spec, mode=PutMode.UPDATE, expected_version=current.version)
        )
        if result is PutResult.MISSING:
            raise GRPCError(Status.NOT_FOUND, f"no schedule named {shown(message.name)}")
        if result is not PutResult.WRITTEN or stored is None:
            raise GRPCError(Status.ABORTED, "version: the schedule changed meanwhile; read again")
        self._replica.wake(spec.name)
        return schedule_message(stored)

    async def delete_schedule(self, message: pb.ScheduleRequest) -> pb.DeleteScheduleResponse:
        """Delete it (its ledger is kept for the retention)."""
        self._writable()
        current = await self._get(message.name)
        self._owned_by_runtime(current, "delete")
        deleted = await self._store_call(lambda: self._store.delete(current.name))
        self._replica.wake(current.name)
        return pb.DeleteScheduleResponse(deleted=deleted)

    async def pause_schedule(self, message: pb.PauseScheduleRequest) -> pb.Schedule:
        """Pause it (a schedule of the config too: pausing is an operation, not a definition)."""
        self._writable()
        if len(message.note) > 1024:
            raise _invalid("note", "at most 1024 characters")
        now = self._clock.timestamp()

        def pause(spec: ScheduleSpec) -> ScheduleSpec:
            return msgspec.structs.replace(
                spec, paused=True, paused_at=spec.paused_at if spec.paused else now,
                pause_note=message.note, updated_at=now,
            )  # fmt: skip

        return schedule_message(await self._change(message.name, pause))

    async def resume_schedule(self, message: pb.ScheduleRequest) -> pb.Schedule:
        """Resume it: the next fire time runs; those missed while paused stay missed."""
        self._writable()
        now = self._clock.timestamp()

        def resume(spec: ScheduleSpec) -> ScheduleSpec:
            return msgspec.structs.replace(
                spec, paused=False, paused_at=None, pause_note="", updated_at=now
            )

        return schedule_message(await self._change(message.name, resume))

    # --- runs by hand -----------------------------------------------------------------------------

    def _orchestrator_failed(self, failure: CallFailed) -> GRPCError:
        message = f"the orchestrator did not take the job: {failure.reason}"
        if failure.retry_after is not None:
            return retry_later(Status.UNAVAILABLE, message, failure.retry_after)
        status = Status.UNAVAILABLE if failure.retryable else Status.FAILED_PRECONDITION
        return GRPCError(status, message)

    async def trigger_schedule(self, message: pb.ScheduleRequest) -> pb.TriggerScheduleResponse:
        """Submit a run now (its own job id) and record it."""
        self._writable()
        spec = await self._get(message.name)
        try:
            answer, record = await self._store_call(
                lambda: trigger_now(
                    spec, store=self._store, client=self._client, clock=self._clock,
                    replica=self._replica.replica_id, within=BY_HAND_SECONDS,
                )
            )  # fmt: skip
        except CallFailed as failure:
            raise self._orchestrator_failed(failure) from None
        return pb.TriggerScheduleResponse(
            job_id=answer.job_id, decision=decision_message(record, spec.zone_name)
        )

    async def backfill_schedule(self, message: pb.BackfillRequest) -> pb.BackfillResponse:
        """Submit the past fire times in the window that did not run, oldest first."""
        self._writable()
        spec = await self._get(message.name)
        if not message.start:
            raise _invalid("start", "must not be empty")
        start = self._time(message.start, spec, "start")
        end = self._time(message.end, spec, "end") if message.end else self._clock.timestamp()
        if end < start:
            raise _invalid("end", "must not be before start")
        if message.max_ticks > MAX_BACKFILL:
            raise _invalid("max_ticks", f"must be at most {MAX_BACKFILL}")
        result = await self._store_call(
            lambda: backfill(
                spec, start=start, end=end, limit=message.max_ticks or DEFAULT_BACKFILL,
                store=self._store, client=self._client, clock=self._clock,
                replica=self._replica.replica_id, within=BY_HAND_SECONDS,
            )
        )  # fmt: skip
        return pb.BackfillResponse(
            submitted=[decision_message(d, spec.zone_name) for d in result.submitted],
            already_ran=result.already_ran,
            error=result.error,
            next_start="" if result.next_start is None else local_label(
                result.next_start, spec.zone_name
            ),
        )  # fmt: skip

    # --- reading ----------------------------------------------------------------------------------

    async def _status(self, spec: ScheduleSpec, owner: str | None, count: int) -> pb.ScheduleStatus:
        cursor = await self._store.cursor(spec.name)
        last = await self._store.decisions(spec.name, limit=1)
        trigger = trigger_for(spec)
        upcoming: list[str] = []
        after = max(after_for(spec, cursor), self._clock.timestamp())
        while len(upcoming) < count:
            tick = next_tick(trigger, after)
            if tick is None:
                break
            after = tick.timestamp
            if tick.runs:
                upcoming.append(tick.at.isoformat())
        pending = cursor.pending
        return pb.ScheduleStatus(
            schedule=schedule_message(spec),
            next_fire_times=upcoming,
            last_decision=decision_message(last[0], spec.zone_name) if last else None,
            owner=owner or "",
            decided_up_to="" if cursor.tick is None else local_label(cursor.tick, spec.zone_name),
            pending="" if pending is None else local_label(pending.tick, spec.zone_name),
            pending_replica="" if pending is None else pending.replica,
            pending_error="" if pending is None else pending.last_error,
        )

    async def list_schedules(self, message: pb.ListSchedulesRequest) -> pb.ListSchedulesResponse:
        """Every schedule with its next fire times, last decision and owner; the replicas."""
        if message.next_fire_times > MAX_NEXT_FIRE_TIMES:
            raise _invalid("next_fire_times", f"must be at most {MAX_NEXT_FIRE_TIMES}")
        count = message.next_fire_times or 3

        async def read() -> pb.ListSchedulesResponse:
            specs = await self._store.all()
            owners = await self._store.owners([s.name for s in specs])
            statuses = [await self._status(s, o, count) for s, o in zip(specs, owners, strict=True)]
            replicas = await self._store.replicas(now=self._clock.timestamp())
            return pb.ListSchedulesResponse(schedules=statuses, replicas=replicas)

        return await self._store_call(read)

    async def get_schedule(self, message: pb.ScheduleRequest) -> pb.ScheduleStatus:
        """One schedule with its next fire times, last decision and owner."""
        spec = await self._get(message.name)

        async def read() -> pb.ScheduleStatus:
            (owner,) = await self._store.owners([spec.name])
            return await self._status(spec, owner, 5)

        return await self._store_call(read)

    async def list_decisions(self, message: pb.ListDecisionsRequest) -> pb.ListDecisionsResponse:
        """The ledger, newest first (a deleted schedule's too, while it is kept)."""
        name = self._name(message.name)
        if message.limit > 1000:
            raise _invalid("limit", "must be at most 1000")
        spec = await self._store_call(lambda: self._store.get(name))
        end = self._time(message.before, spec, "before") if message.before else math.inf
        found = await self._store_call(
            lambda: self._store.decisions(name, end=end, limit=message.limit or 20)
        )
        zone = spec.zone_name if spec else "UTC"
        return pb.ListDecisionsResponse(decisions=[decision_message(d, zone) for d in found])

    async def explain(self, message: pb.ExplainRequest) -> pb.Explanation:
        """Why it did (not) run at `at` (or its latest decision), in a sentence."""
        name = self._name(message.name)
        spec = await self._store_call(lambda: self._store.get(name))
        at = self._time(message.at, spec, "at") if message.at else None

        async def read() -> tuple[Any, TickDecision | None, TickDecision | None]:
            cursor = await self._store.cursor(name)
            end = math.inf if at is None else at + 1.0
            found = await self._store.decisions(name, end=end, limit=50)
            nominal = [d for d in found if d.kind is not TickKind.TRIGGERED]
            if at is not None:
                exact = [d for d in nominal if abs(d.tick - at) < 1.0]
                nominal = exact or [d for d in nominal if d.tick <= at]
            before = nominal[0] if nominal else None
            floor = before.tick if before is not None else -math.inf
            manual = next(
                (d for d in found if d.kind is TickKind.TRIGGERED and d.tick > floor
                 and (at is None or d.tick <= at + 1.0)),
                None,
            )  # fmt: skip
            return cursor, before, manual

        cursor, before, manual = await self._store_call(read)
        if spec is None and before is None and manual is None:
            raise GRPCError(Status.NOT_FOUND, f"no schedule named {shown(name)}, and no decisions")
        if at is None and manual is not None:
            before = manual  # the latest decision is the run by hand
        text = explain(
            name, at=at, now=self._clock.timestamp(), spec=spec,
            trigger=trigger_for(spec) if spec is not None else None, cursor=cursor,
            before=before, manual=manual if at is not None else None,
            ledger_size=self._ledger_size, retention_seconds=self._retention,
        )  # fmt: skip
        zone = spec.zone_name if spec else "UTC"
        return pb.Explanation(
            sentence=text, decision=decision_message(before, zone) if before else None
        )
