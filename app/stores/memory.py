"""In-memory twins of the stores, on the loop clock: for the core's tests on asyncio and trio.

They keep the contract of `app.stores.abc` exactly (the contract suite runs them beside the
Redis implementations) in one process's memory. Expiry follows `anyio.current_time()`, so
trio's MockClock moves it; waits are Events, never polling.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from app.errors import BadDataKind, CorruptIndex, CorruptRecord, QueueGone
from app.fleet.batch_job import (
    BatchJob,
    LostJob,
    RunOutcome,
    decode_job,
    decode_outcome,
    encode_job,
    encode_outcome,
)
from app.fleet.job_index import IndexedJob, IndexPosition, range_start
from app.fleet.job_state import FINISHED, JobState
from app.fleet.role_info import Registration
from app.fleet.schedules import (
    RAN,
    PendingTick,
    ScheduleCursor,
    ScheduleSpec,
    TickDecision,
    decode_decision,
    decode_spec,
    encode_record,
)
from app.stores.abc import (
    DecideResult,
    Delivered,
    FreshCopies,
    PutMode,
    PutResult,
    Quarantined,
    QueueEntry,
    RecordedRun,
    SubmitResult,
    Taken,
    WriteResult,
)
from app.stores.bad_data import (
    FENCE_ACTION,
    OUTCOME_ACTION,
    RECORD_ACTION,
    BadData,
    index_member_id,
    is_int,
    not_a,
    readable,
    record_problem,
)
from app.stores.waits import CANCEL_REQUESTED, JobWaiters

V = TypeVar("V")


def _now_or_none() -> float | None:
    try:
        return anyio.current_time()
    except RuntimeError:  # no event loop (a repr in a traceback): count everything
        return None


class _Keys(Generic[V]):
    """Values with Redis's expiry rules: SET clears the TTL, EXPIRE needs a live key."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[V, float]] = {}

    def count(self) -> int:
        now = _now_or_none()
        return sum(1 for _, expires in self._data.values() if now is None or expires > now)

    def get(self, key: str) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= anyio.current_time():
            del self._data[key]
            return None
        return item[0]

    def set(self, key: str, value: V, ttl: float | None = None) -> None:
        self._data[key] = (value, math.inf if ttl is None else anyio.current_time() + ttl)

    def keep_ttl(self, key: str, value: V) -> None:
        """Replace the value of a live key and keep its expiry (INCR), else SET it."""
        if self.get(key) is None:
            self.set(key, value)
        else:
            self._data[key] = (value, self._data[key][1])

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def live_keys(self) -> list[str]:
        return [k for k in list(self._data) if self.get(k) is not None]

    def expire(self, key: str, ttl: float) -> None:
        if self.get(key) is not None:
            self._data[key] = (self._data[key][0], anyio.current_time() + ttl)

    def ttl(self, key: str) -> float | None:
        """Seconds a live key has left (None: no expiry, or no key), as PTTL tells."""
        if self.get(key) is None:
            return None
        left = self._data[key][1] - anyio.current_time()
        return None if math.isinf(left) else left


class MemoryPodRegistry:
    """The same contract in one process's memory, on the loop clock (for core tests on trio)."""

    def __init__(self) -> None:
        self._data: _Keys[bytes] = _Keys()

    def __repr__(self) -> str:
        return f"<MemoryPodRegistry keys={self._data.count()}>"

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        """Set `key` to a copy of `value` for `ttl_seconds` (0: no expiry)."""
        self._data.set(key, bytes(value), ttl_seconds or None)

    async def get(self, key: str) -> bytes | None:
        """The value, or None when the key is gone."""
        return self._data.get(key)

    async def delete(self, key: str) -> None:
        """Drop `key` (fine when it is not there)."""
        self._data.delete(key)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of `keys`, in order (None for a key that is gone)."""
        return [self._data.get(k) for k in keys]

    async def keys(self, prefix: str) -> list[str]:
        """Every live key that starts with `prefix`."""
        return sorted(k for k in self._data.live_keys() if k.startswith(prefix))


class MemoryRoleRegistry:
    """`RoleRegistry` in memory, on the loop clock (expiry) like MemoryPodRegistry."""

    def __init__(self, *, prefix: str = "wpm-roles") -> None:
        self._prefix = prefix
        self._data: _Keys[bytes] = _Keys()
        self._index: dict[str, dict[str, float]] = {}  # role -> member -> until (wall time)

    def __repr__(self) -> str:
        return f"<MemoryRoleRegistry {self._prefix} records={self._data.count()}>"

    def key(self, role: str, member: str) -> str:
        """The record's key, as Redis names it."""
        return f"{self._prefix}:{role}:{member}"

    async def put(
        self, role: str, member: str, value: bytes, *, ttl_seconds: float, now: float
    ) -> None:
        """Write the record for `ttl_seconds`; drop index entries expired a TTL ago."""
        await anyio.lowlevel.checkpoint()
        self._data.set(self.key(role, member), bytes(value), ttl_seconds)
        index = self._index.setdefault(role, {})
        index[member] = now + ttl_seconds
        for gone in [m for m, until in index.items() if until < now - ttl_seconds]:
            del index[gone]

    async def remove(self, role: str, member: str) -> None:
        """Drop the record and its index entry."""
        await anyio.lowlevel.checkpoint()
        self._data.delete(self.key(role, member))
        self._index.get(role, {}).pop(member, None)

    async def members(self, role: str) -> list[Registration]:
        """The members whose record is still there, by name."""
        await anyio.lowlevel.checkpoint()
        found = []
        for member in sorted(self._index.get(role, {})):
            key = self.key(role, member)
            value = self._data.get(key)
            if value is not None:
                found.append(Registration(
                    key=key, member=member, value=value, ttl_left_seconds=self._data.ttl(key),
                ))  # fmt: skip
        return found


class _Pending(msgspec.Struct):
    consumer: str
    delivered_at: float  # loop time; idle time counts from here


class MemoryJobStoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What a MemoryJobStore holds (for tests and reprs)."""

    records: int
    queue: int
    unread: int
    pending: int


class MemoryJobStore:
    """`JobStore` in memory: `RedisJobStore`'s scripts, one synchronous step per call.

    Records and fencing tokens are kept encoded, as Redis keeps them (so callers never share a
    mutable object with the store, and a test can plant junk as it would in Redis). Each call
    is one checkpoint, then its whole effect with no await in it (as a Lua script is atomic).
    Queue entry ids are `0-<n>`, valid Redis stream ids in the same order.
    """

    def __init__(
        self,
        *,
        retention_seconds: int = 86_400,
        bad_data: BadData | None = None,
        quarantine_maxlen: int = 10_000,
    ) -> None:
        self._retention = retention_seconds
        self.bad_data = bad_data or BadData()
        self._records: _Keys[bytes] = _Keys()
        self._fences: _Keys[bytes] = _Keys()  # ASCII integers, as Redis keeps them
        self._cancels: _Keys[bool] = _Keys()
        self._outcomes: _Keys[bytes] = _Keys()  # `<job id>:<token>` -> RunOutcome JSON
        self._queued: dict[str, int] = {}
        self._group = False
        self._entries: dict[int, str] = {}  # the stream: entry number -> job id, in id order
        self._entry_records: dict[int, bytes] = {}  # unread entries' records, as submitted
        self._fresh = FreshCopies()  # read with their entries, until taken
        self._unread: deque[int] = deque()  # after the group's last delivered entry
        self._last_entry = 0
        # the group's pending entries; inserted in delivery order, which is id order
        self._pending: dict[int, _Pending] = {}
        self._consumers: dict[str, float] = {}  # the group's consumers: when each last came
        self._arrived: anyio.Event | None = None  # made by a blocked reader, set by submit
        self._listeners: list[Callable[..., None]] = []  # MemoryJobEvents' wake-ups
        self._quarantine: deque[Quarantined] = deque(maxlen=quarantine_maxlen)
        self._quarantined = 0
        self._lost: deque[LostJob] = deque(maxlen=10_000)
        # the job index, member -> score, as a ZSET (members are bytes there: junk can be too)
        self._index: dict[bytes, float] = {}
        self._index_junk = False  # the index's key holds another type (planted by a test)

    def forget_everything(self) -> None:
        """Lose every record, token, outcome and the queue with its group, as a Redis that
        restarted empty (for tests). Entry ids go on growing, as a new stream's would."""
        self._records, self._fences = _Keys(), _Keys()
        self._cancels, self._outcomes = _Keys(), _Keys()
        self._queued.clear()
        self._group = False
        self._entries.clear()
        self._entry_records.clear()
        self._fresh.clear()
        self._unread.clear()
        self._pending.clear()
        self._consumers.clear()
        self._quarantine.clear()
        self._lost.clear()
        self._index.clear()
        self._index_junk = False

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<MemoryJobStore records={s.records} queue={s.queue}"
            f" unread={s.unread} pending={s.pending}>"
        )

    def statistics(self) -> MemoryJobStoreStatistics:
        """Live records, and the queue's entries: all, not read yet, read and not acked."""
        return MemoryJobStoreStatistics(
            records=self._records.count(),
            queue=len(self._entries),
            unread=sum(1 for n in self._unread if n in self._entries),
            pending=len(self._pending),
        )

    def _publish(self, job_id: str, *, cancel: bool = False, state: str | None = None) -> None:
        # `state`: what the change made the job, as a Redis write publishes it
        for wake in self._listeners:
            wake(job_id, cancel=cancel, state=state)

    # --- junk (as RedisJobStore meets it) ---------------------------------------------------------

    def _bad_record(self, job_id: str, raw: bytes) -> CorruptRecord:
        error = CorruptRecord(BadDataKind.JOB_RECORD, job_id, job_id, record_problem(raw))
        self.bad_data.found(error.kind, error.key, error.problem, RECORD_ACTION)
        return error

    def _decode(self, job_id: str, raw: bytes) -> BatchJob:
        try:
            job = decode_job(raw)
        except msgspec.DecodeError:
            raise self._bad_record(job_id, raw) from None
        if job.job_id != job_id:
            raise self._bad_record(job_id, raw)
        return job

    def _fence(self, job_id: str) -> int:
        raw = self._fences.get(job_id)
        if raw is None:
            return 0
        if not is_int(raw):
            error = CorruptRecord(
                BadDataKind.FENCING_TOKEN, job_id, f"{job_id}:fence", not_a(raw, "an integer")
            )
            self.bad_data.found(error.kind, error.key, error.problem, FENCE_ACTION)
            raise error
        return int(raw)

    def _set_fence(self, job_id: str, token: int, ttl: float | None = None) -> None:
        self._fences.set(job_id, str(token).encode(), ttl)

    # --- records ----------------------------------------------------------------------------------

    async def ensure_group(self) -> bool:
        """Create the consumer group (it reads the queue from its start) unless it is there."""
        await anyio.lowlevel.checkpoint()
        created, self._group = not self._group, True
        return created

    async def submit(
        self,
        job: BatchJob,
        *,
        bound: int,
        deliver_to: str = "",
        dispatched: BatchJob | None = None,
    ) -> tuple[SubmitResult, BatchJob | None, int, Delivered | None]:
        """Create the record and queue the job unless its id exists or its type is full; the
        oldest unread entry delivered to `deliver_to` when given."""
        await anyio.lowlevel.checkpoint()
        existing = self._records.get(job.job_id)
        if existing is not None:
            return SubmitResult.EXISTS, self._decode(job.job_id, existing), 0, None
        queued = self._queued.get(job.job_type, 0)
        if queued >= bound:
            return SubmitResult.QUEUE_FULL, None, queued, None
        self._queued[job.job_type] = queued + 1
        record = encode_job(job)
        self._records.set(job.job_id, record)
        if self._index_junk:
            self._index_is_junk()
        else:
            self._index[job.job_id.encode()] = job.submitted_at
        self._last_entry += 1
        self._entries[self._last_entry] = job.job_id
        self._entry_records[self._last_entry] = record  # as the Redis entry carries it
        self._unread.append(self._last_entry)
        delivery = None
        if deliver_to and self._group:  # no group (Redis lost it): no delivery, as in Redis
            self._consumers[deliver_to] = anyio.current_time()
            for entry_id, job_id in self._deliver_new(deliver_to, 1):
                # its own entry: the first attempt made in the same step, unless a fence is
                # there already (left over, or junk: the dispatcher's write meets it)
                made = False
                if dispatched is not None and job_id == job.job_id and not self._fences.get(job_id):
                    self._records.set(job_id, encode_job(dispatched))
                    self._set_fence(job_id, 1)
                    self._fresh.take(job_id)  # the copy is not the record any more
                    made = True
                delivery = Delivered(entry_id=entry_id, job_id=job_id, dispatched=made)
        if self._unread and self._arrived is not None:  # an entry left unread wakes a read
            self._arrived.set()
            self._arrived = None
        return SubmitResult.CREATED, None, 0, delivery

    async def get(self, job_id: str) -> BatchJob | None:
        """The record (a fresh copy), or None when there is none."""
        await anyio.lowlevel.checkpoint()
        raw = self._records.get(job_id)
        return None if raw is None else self._decode(job_id, raw)

    async def take(self, job_id: str) -> Taken | None:
        """The record, its fencing token and whether a cancel was asked for, at once; the
        copy a fresh entry carried, unverified, on the first take after `read_new`."""
        await anyio.lowlevel.checkpoint()
        if (taken := self._fresh.take(job_id)) is not None:
            return taken  # the entry's copy, unverified: read nothing
        raw = self._records.get(job_id)
        if raw is None:
            return None
        job = self._decode(job_id, raw)
        return Taken(job=job, fence=self._fence(job_id),
                     cancel_requested=self._cancels.get(job_id) is not None)  # fmt: skip

    async def fence(self, job_id: str) -> int:
        """The job's newest fencing token (0 before the first)."""
        await anyio.lowlevel.checkpoint()
        return self._fence(job_id)

    async def next_token(self, job_id: str) -> int:
        """A new fencing token: from now on, holders of older ones are refused."""
        await anyio.lowlevel.checkpoint()
        token = self._fence(job_id) + 1
        self._fences.keep_ttl(job_id, str(token).encode())
        return token

    async def write(
        self,
        job: BatchJob,
        token: int,
        *,
        ack: str = "",
        advance: bool = False,
        expect: bytes | None = None,
    ) -> WriteResult:
        """Store `job` if `token` is the newest and the stored job has not finished (and is
        `expect`, when given); a final write acks the entry `ack` too; `advance` takes the next
        token with it."""
        # as RedisJobStore does: the caller's record carries the token it is stored under
        job.fencing_token = token + 1 if advance else token
        await anyio.lowlevel.checkpoint()
        current = self._records.get(job.job_id)
        if current is None:  # first: a record Redis lost has lost its fence too
            return WriteResult.MISSING
        fence = self._fence(job.job_id)
        record = encode_job(job)
        if advance and fence == token + 1 and current == record:
            return WriteResult.WRITTEN  # made already: a call repeated after its reply was lost
        if token != fence or (expect is not None and current != expect):
            return WriteResult.SUPERSEDED
        state = _stored_state(current)
        if state is None:
            raise self._bad_record(job.job_id, current)
        if state in _FINISHED_NAMES:
            return WriteResult.ALREADY_FINISHED
        if advance:
            self._fences.keep_ttl(job.job_id, str(token + 1).encode())
        self._records.set(job.job_id, record)
        if job.state.finished:
            self._queued[job.job_type] = max(0, self._queued.get(job.job_type, 0) - 1)
            for keys in (self._records, self._fences, self._cancels):
                keys.expire(job.job_id, self._retention)
            if ack:
                self._ack_now(ack)
        self._publish(job.job_id, state=job.state.value)
        return WriteResult.WRITTEN

    async def restore_fence(self, job_id: str, token: int) -> bool:
        """Raise the fence back to `token` if it is below it."""
        await anyio.lowlevel.checkpoint()
        if self._fence(job_id) >= token:
            return False
        self._set_fence(job_id, token)
        return True

    async def request_cancel(self, job_id: str, *, error: str, now: float) -> BatchJob | None:
        """Ask for the job to be cancelled; a PENDING one ends CANCELLED here under a new token.

        See `JobStore.request_cancel`; the record as it is after, or None when there is none.
        """
        await anyio.lowlevel.checkpoint()
        raw = self._records.get(job_id)
        if raw is None:
            return None
        job = self._decode(job_id, raw)
        if job.state.finished:
            return job
        token = self._fence(job_id) + 1  # junk raises before anything changes, as in Redis
        self._cancels.set(job_id, True, self._retention)
        if job.state is not JobState.PENDING:
            # its holder stops it; waiters re-read meanwhile
            self._publish(job_id, cancel=True, state=CANCEL_REQUESTED)
            return job
        cancelled = msgspec.structs.replace(
            job, state=JobState.CANCELLED, error=error, finished_at=now, fencing_token=token
        )
        self._set_fence(job_id, token, self._retention)
        self._records.set(job_id, encode_job(cancelled), self._retention)
        self._queued[job.job_type] = max(0, self._queued.get(job.job_type, 0) - 1)
        self._publish(job_id, state=cancelled.state.value)
        return cancelled

    async def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for (kept for the retention)."""
        await anyio.lowlevel.checkpoint()
        return self._cancels.get(job_id) is not None

    async def record_outcomes(self, outcomes: Sequence[RecordedRun]) -> list[bool]:
        """Keep each outcome under its token unless one is kept already (SET NX EX each)."""
        await anyio.lowlevel.checkpoint()
        kept: list[bool] = []
        for job_id, token, outcome in outcomes:
            key = f"{job_id}:{token}"
            kept.append(self._outcomes.get(key) is None)
            if kept[-1]:
                self._outcomes.set(key, encode_outcome(outcome), self._retention)
        return kept

    async def outcomes(self, job_id: str, tokens: Sequence[int]) -> dict[int, RunOutcome]:
        """The kept outcomes of `tokens`."""
        await anyio.lowlevel.checkpoint()
        found: dict[int, RunOutcome] = {}
        for token in tokens:
            raw = self._outcomes.get(f"{job_id}:{token}")
            if raw is None:
                continue
            try:
                found[token] = decode_outcome(raw)
            except msgspec.DecodeError as exc:
                self.bad_data.found(BadDataKind.RUN_OUTCOME, f"{job_id}:run:{token}",
                                    f"not a run's end ({exc})", OUTCOME_ACTION)  # fmt: skip
        return found

    async def queued_count(self, job_type: str) -> int:
        """Unfinished jobs of `job_type` (what the per-type bound counts)."""
        await anyio.lowlevel.checkpoint()
        return self._queued.get(job_type, 0)

    async def report_lost(self, lost: LostJob) -> bool:
        """Note the lost job (the newest 10,000 kept) and drop its token, unless its record is
        there after all."""
        await anyio.lowlevel.checkpoint()
        if self._records.get(lost.job_id) is not None:
            return False
        self._fences.delete(lost.job_id)
        self._lost.append(lost)
        return True

    async def lost_jobs(self, *, count: int) -> list[LostJob]:
        """The `count` newest lost-job reports, newest first."""
        await anyio.lowlevel.checkpoint()
        return list(reversed(self._lost))[:count]

    # --- the queue --------------------------------------------------------------------------------

    def _check_group(self) -> None:
        if not self._group:  # Redis answers NOGROUP
            raise QueueGone("the job queue's consumer group is gone")

    def _deliver_new(self, consumer: str, count: int) -> list[QueueEntry]:
        taken: list[QueueEntry] = []
        now = anyio.current_time()
        while self._unread and len(taken) < count:
            number = self._unread.popleft()
            job_id = self._entries.get(number)
            record = self._entry_records.pop(number, None)
            if job_id is not None:  # else acked (deleted) before anyone read it
                self._pending[number] = _Pending(consumer, now)
                taken.append((f"0-{number}", job_id))
                if record is not None:
                    self._fresh.keep(job_id, record)
        return taken

    async def read_new(self, consumer: str, *, count: int, block_ms: int) -> list[QueueEntry]:
        """Up to `count` entries nobody has read, now pending for `consumer`.

        Waits up to `block_ms` (0: until one comes, as Redis's BLOCK 0) when there are none;
        a submit wakes the wait.
        """
        await anyio.lowlevel.checkpoint()
        self._check_group()
        self._consumers[consumer] = anyio.current_time()
        deadline = anyio.current_time() + block_ms / 1000 if block_ms else math.inf
        while not (taken := self._deliver_new(consumer, count)):
            if anyio.current_time() >= deadline:
                break
            if self._arrived is None:
                self._arrived = anyio.Event()
            arrived = self._arrived
            # another reader may take what arrives first: then wait on, as Redis keeps it blocked
            with anyio.move_on_after(deadline - anyio.current_time()):
                await arrived.wait()
        return taken

    async def claim_idle(self, consumer: str, *, min_idle_ms: int, count: int) -> list[QueueEntry]:
        """XAUTOCLAIM from the start: up to `count` pending entries idle `min_idle_ms` or more.

        They become `consumer`'s, their idle time reset. As in Redis 7, at most `count * 10`
        pending entries are looked at.
        """
        await anyio.lowlevel.checkpoint()
        self._check_group()
        now = anyio.current_time()
        self._consumers[consumer] = now
        claimed: list[QueueEntry] = []
        for number, pending in list(self._pending.items())[: count * 10]:
            if len(claimed) == count:
                break
            if (now - pending.delivered_at) * 1000 >= min_idle_ms:
                self._pending[number] = _Pending(consumer, now)
                claimed.append((f"0-{number}", self._entries[number]))
        return claimed

    async def quarantine(self, entry_id: str, problem: CorruptRecord, *, now: float) -> bool:
        """See `JobStore.quarantine`: the entry moves to the quarantine (bounded) and is acked; a
        job whose fencing token is junk and whose record reads ends FAILED."""
        await anyio.lowlevel.checkpoint()
        job_id = problem.job_id
        self.bad_data.found(
            problem.kind, problem.key, problem.problem, f"queue entry {entry_id} quarantined"
        )
        raw = self._records.get(job_id)
        if problem.kind is BadDataKind.FENCING_TOKEN:
            fence = self._fences.get(job_id)
            if fence is None or is_int(fence):
                return False  # mended meanwhile: read again
            job = None if raw is None or not readable(job_id, raw) else decode_job(raw)
            if job is not None and not job.state.finished:
                failed = msgspec.structs.replace(
                    job, state=JobState.FAILED, error=f"quarantined: {problem.problem}",
                    finished_at=now,
                )  # fmt: skip
                self._records.set(job_id, encode_job(failed))
                self._queued[job.job_type] = max(0, self._queued.get(job.job_type, 0) - 1)
                self._publish(job_id, state=failed.state.value)
        elif raw is not None and readable(job_id, raw):
            return False  # mended meanwhile, or a record came: read it again
        self._quarantine.append(
            Quarantined(
                quarantine_id=f"0-{self._quarantined + 1}",
                entry_id=entry_id, job_id=job_id, kind=problem.kind.value,
                reason=problem.problem,
            )
        )  # fmt: skip
        self._quarantined += 1
        number = _entry_number(entry_id)
        self._pending.pop(number, None)
        self._entries.pop(number, None)
        for keys in (self._records, self._fences, self._cancels):
            keys.expire(job_id, self._retention)
        self.bad_data.quarantined(problem.kind)
        return True

    async def quarantined(self, *, count: int = 100) -> list[Quarantined]:
        """The last `count` entries set aside, oldest first."""
        await anyio.lowlevel.checkpoint()
        return list(self._quarantine)[-count:] if count > 0 else []

    async def keep_alive(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """XCLAIM with min-idle 0: pending entries among `entry_ids` are `consumer`'s, idle 0."""
        if not entry_ids:
            return  # RedisJobStore makes no call
        await anyio.lowlevel.checkpoint()
        self._check_group()
        now = anyio.current_time()
        self._consumers[consumer] = now
        for entry_id in entry_ids:
            number = _entry_number(entry_id)
            if number in self._pending:
                self._pending[number] = _Pending(consumer, now)

    async def remove_idle_consumers(self, *, min_idle_ms: int, keep: str) -> list[str]:
        """XINFO CONSUMERS + XGROUP DELCONSUMER of those holding nothing, idle that long."""
        await anyio.lowlevel.checkpoint()
        self._check_group()
        now = anyio.current_time()
        holding = {pending.consumer for pending in self._pending.values()}
        removed = [
            name for name, seen in self._consumers.items()
            if name != keep and name not in holding and (now - seen) * 1000 >= min_idle_ms
        ]  # fmt: skip
        for name in removed:
            del self._consumers[name]
        return removed

    async def ack(self, entry_id: str) -> None:
        """Acknowledge and drop the entry (XACK and XDEL): nobody reads or claims it again."""
        await anyio.lowlevel.checkpoint()
        self._ack_now(entry_id)

    async def holds_entry(self, entry_id: str) -> bool:
        """Whether the stream holds the entry (XRANGE of its id)."""
        await anyio.lowlevel.checkpoint()
        return _entry_number(entry_id) in self._entries

    def _ack_now(self, entry_id: str) -> None:
        number = _entry_number(entry_id)
        self._pending.pop(number, None)
        self._entries.pop(number, None)

    # --- the job index ----------------------------------------------------------------------------

    def _index_is_junk(self) -> CorruptIndex:
        self.bad_data.found(BadDataKind.JOB_INDEX, "index", "not a sorted set",
                            "jobs are not indexed, and listing them answers DATA_LOSS, until"
                            " it is deleted")  # fmt: skip
        return CorruptIndex("job index: unreadable: not a sorted set")

    async def index_page(
        self, *, after: IndexPosition | None, since: float, until: float, count: int
    ) -> list[IndexedJob]:
        """ZREVRANGEBYSCORE (ties by member, descending) and the records of the entries."""
        await anyio.lowlevel.checkpoint()
        if self._index_junk:
            raise self._index_is_junk()
        top, included, skip = range_start(after, until)
        chosen = sorted(
            ((score, member) for member, score in self._index.items()
             if since <= score and (score < top or (included and score == top))),
            reverse=True,
        )[skip : skip + count]  # fmt: skip
        page: list[IndexedJob] = []
        for score, member in chosen:
            job: BatchJob | None = None
            job_id = index_member_id(member)
            if job_id is None:
                self.bad_data.found(BadDataKind.JOB_INDEX, f"index member {member!r}",
                                    "not a job id", "skipped")  # fmt: skip
            elif (raw := self._records.get(job_id)) is not None:
                with contextlib.suppress(CorruptRecord):  # said and counted by _decode
                    job = self._decode(job_id, raw)
            page.append(IndexedJob(score=score, job=job))
        return page

    async def trim_index(self, *, before: float, count: int, skip: int = 0) -> tuple[int, int]:
        """Drop the oldest entries (up to `count` looked at, past `skip`) before `before` whose
        record is gone."""
        await anyio.lowlevel.checkpoint()
        if self._index_junk:
            self._index_is_junk()
            return 0, 0
        oldest = sorted((score, member) for member, score in self._index.items()
                        if score < before)[skip : skip + count]  # fmt: skip
        removed = 0
        for _, member in oldest:
            job_id = index_member_id(member)
            if job_id is None or self._records.get(job_id) is None:
                del self._index[member]
                removed += 1
        return len(oldest), removed


_FINISHED_NAMES = frozenset(s.value for s in FINISHED)


def _stored_state(raw: bytes) -> str | None:
    """The state of a stored record as the Redis scripts read it (a JSON object whose `state`,
    PENDING when absent, is a string); None when it does not read that far."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(value, dict):
        return None
    state = value.get("state", JobState.PENDING.value)
    return state if isinstance(state, str) else None


def _entry_number(entry_id: str) -> int:
    """The n of `0-<n>`; -1 (no entry) for an id this store did not hand out."""
    ms, _, seq = entry_id.partition("-")
    return int(seq) if ms == "0" and seq.isdigit() else -1


class MemoryJobEvents:
    """`JobEvents` for a `MemoryJobStore`: the store wakes it on every write and cancel request.

    Nothing is missed, and waiters are woken whether or not `run` is going.
    """

    def __init__(self, store: MemoryJobStore) -> None:
        self._waiters = JobWaiters()
        self._running = False
        store._listeners.append(self._waiters.wake)

    def __repr__(self) -> str:
        state = "RUNNING" if self._running else "IDLE"
        return (
            f"<MemoryJobEvents waiters={self._waiters.tasks()} jobs={len(self._waiters)} {state}>"
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Report ready and wait to be cancelled (the store delivers the changes)."""
        self._running = True
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            self._running = False

    async def wait_changed(self, job_id: str) -> None:
        """Return after the job's next write or cancel request."""
        await self._waiters.wait(job_id)

    def subscribed(self, job_id: str) -> AbstractAsyncContextManager[None]:
        """See `JobEvents.subscribed`: every change reaches the waiters here anyway."""
        return _nothing_to_subscribe()

    def watching(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching`."""
        return self._waiters.watching(job_id)

    def watching_cancel(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching_cancel`."""
        return self._waiters.watching_cancel(job_id)

    def watching_end(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching_end`."""
        return self._waiters.watching_end(job_id)


@contextlib.asynccontextmanager
async def _nothing_to_subscribe() -> AsyncIterator[None]:
    await anyio.lowlevel.checkpoint()
    yield


class MemoryScheduleStore:
    """`ScheduleStore` in memory: `RedisScheduleStore`'s scripts, one synchronous step per call.

    Leases and the ledger's expiry follow the loop clock (trio's MockClock moves them);
    heartbeats and the retention use the wall times the callers pass, as on Redis.
    """

    def __init__(self, *, ledger_size: int = 1000, ledger_retention_seconds: float = 30 * 86_400):
        self._ledger_size = ledger_size
        self._retention = ledger_retention_seconds
        self._specs: dict[str, bytes] = {}
        self._leases: _Keys[str] = _Keys()
        self._cursors: dict[str, ScheduleCursor] = {}
        self._ledgers: _Keys[list[tuple[float, bytes]]] = _Keys()
        self._replicas: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<MemoryScheduleStore schedules={len(self._specs)} leases={self._leases.count()}>"

    async def put(
        self, spec: ScheduleSpec, *, mode: PutMode, expected_version: int = 0
    ) -> tuple[PutResult, ScheduleSpec | None]:
        """Store `spec` with the next version, as `mode` allows (see `ScheduleStore.put`)."""
        await anyio.lowlevel.checkpoint()
        raw = self._specs.get(spec.name)
        current = None if raw is None else decode_spec(raw)
        if current is not None and mode is PutMode.CREATE:
            return PutResult.EXISTS, current
        if current is None and mode is PutMode.UPDATE:
            return PutResult.MISSING, None
        version = 0 if current is None else current.version
        if expected_version and expected_version != version:
            return PutResult.CONFLICT, current
        stored = msgspec.structs.replace(spec, version=version + 1)
        self._specs[spec.name] = encode_record(stored)
        return PutResult.WRITTEN, stored

    async def get(self, name: str) -> ScheduleSpec | None:
        """The schedule (a fresh copy), or None."""
        await anyio.lowlevel.checkpoint()
        raw = self._specs.get(name)
        return None if raw is None else decode_spec(raw)

    async def all(self) -> list[ScheduleSpec]:
        """Every schedule, by name."""
        await anyio.lowlevel.checkpoint()
        return [decode_spec(self._specs[name]) for name in sorted(self._specs)]

    async def delete(self, name: str) -> bool:
        """Drop the schedule, its cursor and its lease (the ledger expires by itself)."""
        await anyio.lowlevel.checkpoint()
        self._leases.delete(name)
        self._cursors.pop(name, None)
        return self._specs.pop(name, None) is not None

    async def acquire(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Take the lease when free, renew it when `owner`'s."""
        await anyio.lowlevel.checkpoint()
        holder = self._leases.get(name)
        if holder is not None and holder != owner:
            return False
        self._leases.set(name, owner, ttl_seconds)
        return True

    async def renew(self, names: Sequence[str], owner: str, ttl_seconds: float) -> list[bool]:
        """Extend each of `owner`'s leases; whether each was still `owner`'s."""
        await anyio.lowlevel.checkpoint()
        held = []
        for name in names:
            mine = self._leases.get(name) == owner
            if mine:
                self._leases.set(name, owner, ttl_seconds)
            held.append(mine)
        return held

    async def release(self, name: str, owner: str) -> None:
        """Give the lease up if `owner` holds it."""
        await anyio.lowlevel.checkpoint()
        if self._leases.get(name) == owner:
            self._leases.delete(name)

    async def owners(self, names: Sequence[str]) -> list[str | None]:
        """Each lease's holder."""
        await anyio.lowlevel.checkpoint()
        return [self._leases.get(name) for name in names]

    async def heartbeat(self, replica: str, *, now: float, ttl_seconds: float) -> None:
        """`replica` is up until `now + ttl_seconds`."""
        await anyio.lowlevel.checkpoint()
        self._replicas[replica] = now + ttl_seconds

    async def replicas(self, *, now: float) -> list[str]:
        """The replicas up at `now`."""
        await anyio.lowlevel.checkpoint()
        for replica, until in list(self._replicas.items()):
            if until <= now:
                del self._replicas[replica]
        return sorted(self._replicas)

    async def leave(self, replica: str) -> None:
        """`replica` is going away."""
        await anyio.lowlevel.checkpoint()
        self._replicas.pop(replica, None)

    async def cursor(self, name: str) -> ScheduleCursor:
        """The schedule's cursor (empty when none)."""
        await anyio.lowlevel.checkpoint()
        return self._cursors.get(name) or ScheduleCursor()

    def _may_write(self, name: str, owner: str) -> bool:
        holder = self._leases.get(name)
        return holder is None or holder == owner

    async def set_pending(self, name: str, owner: str, pending: PendingTick) -> bool:
        """Note the tick being submitted (lease and cursor permitting)."""
        await anyio.lowlevel.checkpoint()
        cursor = self._cursors.get(name) or ScheduleCursor()
        if not self._may_write(name, owner) or (
            cursor.tick is not None and cursor.tick >= pending.tick
        ):
            return False
        self._cursors[name] = msgspec.structs.replace(cursor, pending=pending)
        return True

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
        """Write the records and move the cursor, atomically (see `ScheduleStore.decide`)."""
        await anyio.lowlevel.checkpoint()
        if not self._may_write(name, owner):
            return DecideResult.LEASE_LOST
        cursor = self._cursors.get(name) or ScheduleCursor()
        if cursor.tick != expected:
            return DecideResult.CONFLICT
        for decision in decisions:
            self._write_record(decision, replace=True, now=now)
        self._cursors[name] = ScheduleCursor(
            tick=decisions[-1].tick if decisions else cursor.tick,
            last_job_id=last_job_id or cursor.last_job_id,
        )
        if self._leases.get(name) is None and ttl_seconds:
            self._leases.set(name, owner, ttl_seconds)
        return DecideResult.DONE

    async def set_last_job(self, name: str, job_id: str) -> None:
        """The schedule's last run is `job_id`."""
        await anyio.lowlevel.checkpoint()
        cursor = self._cursors.get(name) or ScheduleCursor()
        self._cursors[name] = msgspec.structs.replace(cursor, last_job_id=job_id)

    def _write_record(self, decision: TickDecision, *, replace: bool, now: float) -> None:
        # kept sorted by tick (records of one tick in the order written), as a ZSET is
        records = self._ledgers.get(decision.schedule) or []
        tick = decision.tick
        if replace:
            lo = bisect.bisect_left(records, tick, key=lambda r: r[0])
            hi = bisect.bisect_right(records, tick, key=lambda r: r[0])
            del records[lo:hi]
        at = bisect.bisect_right(records, tick, key=lambda r: r[0])
        records.insert(at, (tick, encode_record(decision)))
        del records[: bisect.bisect_left(records, now - self._retention, key=lambda r: r[0])]
        del records[: max(0, len(records) - self._ledger_size)]
        self._ledgers.set(decision.schedule, records, self._retention)

    async def add_decision(
        self, decision: TickDecision, *, unless_ran: bool, now: float
    ) -> TickDecision | None:
        """Add a record outside the cursor (see `ScheduleStore.add_decision`)."""
        await anyio.lowlevel.checkpoint()
        if unless_ran:
            for tick, raw in self._ledgers.get(decision.schedule) or []:
                if tick == decision.tick and (found := decode_decision(raw)).kind in RAN:
                    return found
        self._write_record(decision, replace=unless_ran, now=now)
        return None

    async def decisions(
        self,
        name: str,
        *,
        start: float = -math.inf,
        end: float = math.inf,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[TickDecision]:
        """Ledger records with `start <= tick <= end`, newest or oldest first."""
        await anyio.lowlevel.checkpoint()
        chosen = [raw for tick, raw in self._ledgers.get(name) or [] if start <= tick <= end]
        if newest_first:
            chosen.reverse()
        return [decode_decision(raw) for raw in chosen[:limit]]
