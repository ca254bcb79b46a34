"""The stores' interfaces: what the roles need from shared state, apart from how it is kept.

Each has a Redis implementation in `app.stores.redis` and an in-memory twin in
`app.stores.memory`; one contract suite (tests/test_stores_contract.py) runs both.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Protocol

import anyio
import anyio.abc
import msgspec

from app.errors import CorruptRecord
from app.fleet.batch_job import BatchJob, LostJob, RunOutcome, decode_job
from app.fleet.job_index import IndexedJob, IndexPosition
from app.fleet.job_state import JobState
from app.fleet.role_info import Registration
from app.fleet.schedules import PendingTick, ScheduleCursor, ScheduleSpec, TickDecision


class PodRegistry(Protocol):
    """A key-value store with expiry: the I/O edge behind ApplicationInfoReportJob."""

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        """Set `key` to `value`, to expire after `ttl_seconds` (each put renews both)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value, or None when the key is gone."""
        ...

    async def delete(self, key: str) -> None:
        """Drop `key` (fine when it is not there)."""
        ...

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of `keys`, in order (None for a key that is gone)."""
        ...

    async def keys(self, prefix: str) -> list[str]:
        """Every live key that starts with `prefix` (unordered)."""
        ...


class RoleRegistry(Protocol):
    """Records with expiry, listed per role through a small index (never a scan of the store):
    where orchestrators and trigger replicas say they are up (`app.fleet.role_info`).

    Each member's record expires `ttl_seconds` after its last `put`; `members` lists the ones
    still there. An index entry whose record expired is left out, and dropped by a later `put`.
    """

    async def put(
        self, role: str, member: str, value: bytes, *, ttl_seconds: float, now: float
    ) -> None:
        """Write `member`'s record of `role` for `ttl_seconds` (each put renews it); `now` is
        the wall time, which dates the index entry."""
        ...

    async def remove(self, role: str, member: str) -> None:
        """Drop `member`'s record and index entry (fine when they are not there)."""
        ...

    async def members(self, role: str) -> list[Registration]:
        """The live members of `role`, by member name."""
        ...


class SubmitResult(enum.Enum):
    """How `JobStore.submit` went."""

    CREATED = "CREATED"
    EXISTS = "EXISTS"
    QUEUE_FULL = "QUEUE_FULL"


class WriteResult(enum.IntEnum):
    """How a fenced `JobStore.write` went."""

    WRITTEN = 1
    SUPERSEDED = 0  # another attempt holds a newer token
    MISSING = -1
    ALREADY_FINISHED = -2


class Taken(msgspec.Struct, frozen=True, kw_only=True):
    """A job as a dispatcher takes it (`JobStore.take`).

    `unverified`: the record as submitted, which the job's queue entry carried (`read_new`):
    taken from that copy without a read, as a job never dispatched (fence 0, no cancel). The
    first write must `expect` it: one refused says the copy was out of date (the job was
    cancelled, or Redis lost or went back), and the job is taken again from the store."""

    job: BatchJob
    fence: int
    cancel_requested: bool
    unverified: bytes | None = None


class FreshCopies:
    """The records fresh queue entries carried (`read_new`), by job id, until their first
    `take`: at most `kept` (the oldest goes: an entry read but never taken must not keep its
    copy for good, and a job without one is read from the store)."""

    def __init__(self, kept: int = 4096) -> None:
        self._copies: dict[str, bytes] = {}
        self._kept = kept

    def keep(self, job_id: str, raw: bytes) -> None:
        """Keep the copy `raw` for the job's first take."""
        if len(self._copies) >= self._kept:
            del self._copies[next(iter(self._copies))]
        self._copies[job_id] = raw

    def take(self, job_id: str) -> Taken | None:
        """The job as its kept copy says, unverified (see `Taken`), once; None when there is
        none, or when it is not that of a job never dispatched (then the store is read)."""
        raw = self._copies.pop(job_id, None)
        if raw is None:
            return None
        try:
            job = decode_job(raw)
        except msgspec.DecodeError:
            return None
        if job.job_id != job_id or job.state is not JobState.PENDING or job.attempts:
            return None
        return Taken(job=job, fence=0, cancel_requested=False, unverified=raw)

    def clear(self) -> None:
        """Forget every copy."""
        self._copies.clear()


#: A run's end, as a worker records it: (job id, the fencing token it ran under, how it ended).
RecordedRun = tuple[str, int, RunOutcome]

#: A queue entry: (entry id, job id). Entry ids order the queue; a job id may be queued once.
QueueEntry = tuple[str, str]


class Delivered(msgspec.Struct, frozen=True, kw_only=True):
    """The queue entry a submit delivered to its orchestrator (`JobStore.submit(deliver_to=)`),
    and whether the submit made the job's first attempt there too (`dispatched`)."""

    entry_id: str
    job_id: str
    dispatched: bool = False


class Quarantined(msgspec.Struct, frozen=True, kw_only=True):
    """A queue entry set aside because its job could not be driven, and why."""

    quarantine_id: str  # its place in the quarantine (ordered as the entries were set aside)
    entry_id: str
    job_id: str  # "" when the entry named none
    kind: str  # a BadDataKind value
    reason: str


class JobStore(Protocol):
    """The fleet's job records, their fencing tokens, and the queue the orchestrators share.

    The queue is a consumer group: an entry read by one consumer is pending for it until acked;
    an entry whose consumer stopped refreshing it for `min_idle_ms` can be claimed by another.
    A record is written only by the holder of the job's newest fencing token, and never after
    the job has finished; a finished record is kept for the retention, then expires.

    Every method raises `app.errors.StoreUnavailable` while the store cannot serve (the call may
    work later), `app.errors.StoreBusy` when this process waited too long for a connection to
    it (load: the call may work a moment later), and the queue's methods
    `app.errors.QueueGone` when the consumer group is gone (the store lost its data:
    `ensure_group` makes it again).
    """

    async def ensure_group(self) -> bool:
        """Create the queue and its consumer group if they are not there yet; True if it did."""
        ...

    async def submit(
        self,
        job: BatchJob,
        *,
        bound: int,
        deliver_to: str = "",
        dispatched: BatchJob | None = None,
    ) -> tuple[SubmitResult, BatchJob | None, int, Delivered | None]:
        """Create the record, queue the job and add it to the job index (by `submitted_at`),
        atomically, unless its id exists or its type has `bound` unfinished jobs. Returns
        (result, the existing record for EXISTS, the unfinished count for QUEUE_FULL, the entry
        delivered).

        `deliver_to` (a consumer): in the same step, the oldest entry nobody has read (this
        job's, unless others wait before it) is delivered to that consumer as `read_new` would,
        and returned (its first `take` reads nothing, as after `read_new`): the orchestrator that
        takes a Submit with a free slot drives the job without a read of the queue.

        `dispatched` (with `deliver_to`): the job as its first attempt makes it (DISPATCHED,
        `fencing_token` 1). When the entry delivered is this job's own, the record is written so
        and the fence set to 1 in the same step (`Delivered.dispatched`): the DISPATCHED write
        and its round trip are saved. Otherwise (or when a fence is there already: left over,
        or junk, which the dispatcher's write then meets) nothing of it is written."""
        ...

    async def get(self, job_id: str) -> BatchJob | None:
        """The record, or None when there is none (never submitted, or expired).

        Here and below, a job's record or fencing token that does not read (junk) raises
        `CorruptRecord`, said once (by key) and counted by the store's `BadData`.
        """
        ...

    async def fence(self, job_id: str) -> int:
        """The job's newest fencing token (0 before the first)."""
        ...

    async def next_token(self, job_id: str) -> int:
        """A new fencing token: from now on, holders of older ones are refused."""
        ...

    async def take(self, job_id: str) -> Taken | None:
        """What a dispatcher reads as it takes a job, at once (one round trip on Redis): the
        record, its fencing token and whether a cancel was asked for; None when there is no
        record. CorruptRecord as `get`, then `fence`, raise it.

        The first take of a job whose queue entry `read_new` just handed out, with the record
        as submitted, reads nothing: it answers that copy, `unverified` (see `Taken`)."""
        ...

    async def write(
        self,
        job: BatchJob,
        token: int,
        *,
        ack: str = "",
        advance: bool = False,
        expect: bytes | None = None,
    ) -> WriteResult:
        """Store `job` (its `fencing_token` set to `token`) if `token` is the newest and the
        stored job has not finished; a finished job's record starts its retention and no longer
        counts against its type's bound. Wakes `JobEvents` waiters.

        `ack`: the job's queue entry, acknowledged and dropped (as `ack` does) in the same step
        when this write, a final one, is made; a write that is not made, or not final, leaves
        it.

        `advance`: the write also takes the next token, `token + 1`, in the same step (a
        dispatch: `next_token` and the write in one round trip), and the job is stored under
        it (its `fencing_token` set so). Made again after a lost reply, it answers WRITTEN
        when the store holds exactly that record under that token already.

        `expect`: the write is made only if the stored record is exactly these bytes (a taken
        copy's `unverified`); SUPERSEDED otherwise."""
        ...

    async def restore_fence(self, job_id: str, token: int) -> bool:
        """Raise the job's fence back to `token` if it is below it; True if it was.

        Tokens only grow, so a fence below a token its holder took means the store went back in
        time (Redis restarted without its last second of writes). The holder, the only one with
        a token that high, takes its place back instead of being refused as superseded.
        """
        ...

    async def request_cancel(self, job_id: str, *, error: str, now: float) -> BatchJob | None:
        """Ask for the job to be cancelled; the record as it is after, or None when there is none.

        Marks the request (seen by `cancel_requested`) unless the job has finished. A job that is
        PENDING (queued, or between attempts) ends CANCELLED here with `error` at `now`, under a
        new fencing token, so that a dispatcher holding it is refused from then on. A job on a
        worker is left to its holder, which ends it once the worker has stopped it; waiters on
        the job are woken either way.
        """
        ...

    async def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for (kept for the retention)."""
        ...

    async def record_outcomes(self, outcomes: Sequence[RecordedRun]) -> list[bool]:
        """Keep how each run ended (job id, the fencing token it started under, its outcome; the
        worker calls this), for the retention, in one step (one round trip on Redis); the first
        outcome for a token stays. For each, True when it was kept."""
        ...

    async def outcomes(self, job_id: str, tokens: Sequence[int]) -> dict[int, RunOutcome]:
        """The recorded outcomes of the runs started under `tokens` (a token without one, or
        with one that does not decode, is left out)."""
        ...

    async def queued_count(self, job_type: str) -> int:
        """Unfinished jobs of `job_type` (what the per-type bound counts)."""
        ...

    async def report_lost(self, lost: LostJob) -> bool:
        """Note a job whose record vanished while it was in hand (the store lost it), for the
        operators' check, and drop what is left of it (its fencing token). Nothing is noted
        when the record is there after all; True when it was noted. The newest 10,000 are kept.
        """
        ...

    async def lost_jobs(self, *, count: int) -> list[LostJob]:
        """The `count` newest lost-job reports, newest first."""
        ...

    async def read_new(self, consumer: str, *, count: int, block_ms: int) -> list[QueueEntry]:
        """Up to `count` entries no consumer has read yet, now pending for `consumer`; waits up
        to `block_ms` for one when there are none (an empty list then; 0 waits until one
        comes, as Redis's BLOCK 0 does). An entry that names no job is quarantined instead."""
        ...

    async def claim_idle(self, consumer: str, *, min_idle_ms: int, count: int) -> list[QueueEntry]:
        """Up to `count` pending entries that no consumer has refreshed for `min_idle_ms`: now
        pending for `consumer` (their consumer stopped). An entry outlives its job's record: one
        whose record has expired is handed out all the same, for the taker to quarantine. An
        entry that names no job is quarantined instead."""
        ...

    async def quarantine(self, entry_id: str, problem: CorruptRecord, *, now: float) -> bool:
        """Set aside the entry of a job that cannot be driven (`problem` says why): the entry
        moves to the quarantine with the reason, and is acked.

        A job whose fencing token is junk while its record reads ends FAILED here (`now`, the
        error `quarantined: <problem>`): no holder could write it any more. What is left of the
        job (record, fence, cancel flag) is kept for the retention, then expires. False, and
        nothing done, when the item was mended (or a record came) since it was read: read again.
        """
        ...

    async def quarantined(self, *, count: int = 100) -> list[Quarantined]:
        """The last `count` entries set aside, oldest first."""
        ...

    async def keep_alive(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries `consumer` is working on, so that nobody claims them."""
        ...

    async def ack(self, entry_id: str) -> None:
        """The entry's job has ended: acknowledge and drop the entry."""
        ...

    async def holds_entry(self, entry_id: str) -> bool:
        """Whether the queue still holds the entry (read or not, pending or not). An entry read
        whose job has no record and that is gone too was forgotten by the store with its job."""
        ...

    async def remove_idle_consumers(self, *, min_idle_ms: int, keep: str) -> list[str]:
        """Remove from the group the consumers other than `keep` that hold no entry and have not
        read, claimed or refreshed for `min_idle_ms` (orchestrators that stopped: each leaves
        its name behind for good otherwise); their names. A live one that is removed comes
        back with its next read."""
        ...

    async def index_page(
        self, *, after: IndexPosition | None, since: float, until: float, count: int
    ) -> list[IndexedJob]:
        """Up to `count` entries of the job index (every created job, by `submitted_at`; see
        `submit`), newest first: submitted in [`since`, `until`) and past `after`, each with
        its job's record.

        The record is None when it is gone (expired: the entry waits for `trim_index`), and when
        the entry names no job or its record does not read: such junk is said once and counted
        by the store's `BadData`, and skipped. `CorruptIndex` when the index is not an index.
        """
        ...

    async def trim_index(self, *, before: float, count: int, skip: int = 0) -> tuple[int, int]:
        """Look at up to `count` of the oldest index entries submitted before `before`, past the
        first `skip` of them, and drop those whose record is gone (a job still recorded stays
        listed, however old). Returns (entries looked at, entries dropped); (0, 0) when the
        index is junk."""
        ...


class JobEvents(Protocol):
    """Wakes waiters when a job's record changes (or a cancel is asked for). May miss a change
    (a reconnect): waiters bound their wait and re-read the record."""

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver changes until cancelled; ready once listening."""
        ...

    async def wait_changed(self, job_id: str) -> None:
        """Return after the job's next change."""
        ...

    def subscribed(self, job_id: str) -> AbstractAsyncContextManager[None]:
        """The job's changes reach this process's waiters while inside (from its entry on: on
        Redis, a subscription to the job's channel, confirmed before it returns). Hold it
        around a whole wait that reads and watches in turn."""
        ...

    def watching(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """An event set on the job's next change from now on (enter it, read the record, then
        wait on it: a change made meanwhile is not missed, as it is with `wait_changed`). Only
        inside `subscribed(job_id)` do changes arrive."""
        ...

    def watching_cancel(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """An event set when a cancel of the job is asked for from now on (its other changes
        leave it be; no subscription needed: every process hears every cancel request). May
        miss one, as any event: bound the wait and read the flag."""
        ...

    def watching_end(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """As `watching`, set only by a change that ends the job (a write of a finished state,
        or a change that does not say its state). Only inside `subscribed(job_id)`."""
        ...


# --- the trigger tier -----------------------------------------------------------------------------


class PutMode(enum.Enum):
    """What `ScheduleStore.put` may do."""

    CREATE = "CREATE"  # only a new name
    UPDATE = "UPDATE"  # only a name there already
    UPSERT = "UPSERT"


class PutResult(enum.Enum):
    """How `ScheduleStore.put` went."""

    WRITTEN = "WRITTEN"
    EXISTS = "EXISTS"  # CREATE of a name there already
    MISSING = "MISSING"  # UPDATE of a name not there
    CONFLICT = "CONFLICT"  # the stored version is not the one expected


class DecideResult(enum.Enum):
    """How `ScheduleStore.decide` went."""

    DONE = "DONE"
    LEASE_LOST = "LEASE_LOST"  # another replica holds the schedule's lease
    CONFLICT = "CONFLICT"  # the cursor moved on: another replica decided these ticks


class ScheduleStore(Protocol):
    """The trigger tier's shared state: schedules, per-schedule leases and cursors, replicas, and
    the decision ledger.

    A schedule's lease says which replica works it (any replica may take a free one); its cursor
    says up to which nominal tick decisions are made. `decide` advances the cursor and writes the
    ledger records in one atomic step, only for the lease holder and only from the cursor it
    read, so each tick is decided once however many replicas try. The ledger keeps at most
    `ledger_size` records per schedule, none older than `ledger_retention_seconds` (by tick).
    """

    async def put(
        self, spec: ScheduleSpec, *, mode: PutMode, expected_version: int = 0
    ) -> tuple[PutResult, ScheduleSpec | None]:
        """Store `spec` with the next version (ignoring its own), as `mode` allows, and when
        `expected_version` (unless 0) is the stored one. Returns (result, the stored spec: the
        one written, or the one there for EXISTS and CONFLICT)."""
        ...

    async def get(self, name: str) -> ScheduleSpec | None:
        """The schedule, or None when there is none (or its record does not decode)."""
        ...

    async def all(self) -> list[ScheduleSpec]:
        """Every schedule, by name (records that do not decode are left out)."""
        ...

    async def delete(self, name: str) -> bool:
        """Drop the schedule, its cursor and its lease; its ledger expires after the retention.
        True when it was there."""
        ...

    async def acquire(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Take the schedule's lease for `ttl_seconds` when it is free (or renew it when
        `owner` holds it). True when `owner` holds it now."""
        ...

    async def renew(self, names: Sequence[str], owner: str, ttl_seconds: float) -> list[bool]:
        """Extend `owner`'s leases; for each name, whether `owner` still held it."""
        ...

    async def release(self, name: str, owner: str) -> None:
        """Give the lease up, if `owner` holds it."""
        ...

    async def owners(self, names: Sequence[str]) -> list[str | None]:
        """Who holds each schedule's lease (None: nobody)."""
        ...

    async def heartbeat(self, replica: str, *, now: float, ttl_seconds: float) -> None:
        """Say that `replica` is up until `now + ttl_seconds` (wall time)."""
        ...

    async def replicas(self, *, now: float) -> list[str]:
        """The replicas up at `now` (wall time), sorted."""
        ...

    async def leave(self, replica: str) -> None:
        """`replica` is going away."""
        ...

    async def cursor(self, name: str) -> ScheduleCursor:
        """How far the schedule's ticks are decided (an empty cursor when none are)."""
        ...

    async def set_pending(self, name: str, owner: str, pending: PendingTick) -> bool:
        """Note the tick `owner` is submitting, if it holds the lease (or the lease is free) and
        the cursor is still just before that tick's decision. True when noted."""
        ...

    async def decide(
        self,
        name: str,
        owner: str,
        *,
        expected: float | None,
        decisions: Sequence[TickDecision],
        last_job_id: str = "",
        now: float,
        ttl_seconds: float = 0.0,
    ) -> DecideResult:
        """Write `decisions` (oldest first) to the ledger and move the cursor to the last one's
        tick, clearing the pending tick and setting `last_job_id` when given, in one atomic step:
        only when nobody else holds the lease and the cursor is at `expected`. A free lease is
        taken for `ttl_seconds` (unless 0). `now` (wall time) dates the retention."""
        ...

    async def set_last_job(self, name: str, job_id: str) -> None:
        """Make `job_id` the schedule's last run (a run triggered by hand counts for overlap)."""
        ...

    async def add_decision(
        self, decision: TickDecision, *, unless_ran: bool, now: float
    ) -> TickDecision | None:
        """Add a record outside the cursor (a run by hand, a backfill). With `unless_ran`, it
        replaces the tick's record unless that one ran (fired, moved, backfilled): then nothing
        is written and that record comes back. None when written."""
        ...

    async def decisions(
        self,
        name: str,
        *,
        start: float = -math.inf,
        end: float = math.inf,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[TickDecision]:
        """Ledger records with `start <= tick <= end`, newest (or oldest) first, at most `limit`
        (records that do not decode are left out)."""
        ...
