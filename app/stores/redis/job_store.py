"""The orchestrators' shared state in Redis: job records, fencing tokens, the stream, events.

Keys (prefixes configurable):

| key | what |
|---|---|
| `wpm-job:<id>` | the BatchJob as JSON; EX retention once it ends |
| `wpm-job:<id>:fence` | the fencing token: one up per attempt; only its holder may write |
| `wpm-job:<id>:cancel` | set when a cancel was asked for |
| `wpm-job-queued:<type>` | unfinished jobs of that type (the per-type bound) |
| `wpm-jobs:stream` | job ids, consumer group `orchestrators`; acked and deleted at the end |
| `wpm-jobs:stream:quarantine` | entries set aside as unusable, with the reason (MAXLEN ~) |
| `wpm-jobs:lost` | jobs whose record vanished while in hand (Redis lost them), the newest 10,000 |
| `wpm-jobs:index` | every job by submit time (ZSET of job ids), trimmed once their record is gone |
| `wpm-job-events:<id>` | pub/sub: the new state after each write; `cancel`; for its waiters |
| `wpm-job-cancels` | pub/sub: the id of a running job to cancel; for every orchestrator |

Every write goes through a Lua script that checks the fencing token, so a late result from a
superseded attempt is refused and never overwrites the job's outcome.

Junk in any of these keys (written by hand, by a bug, by another program) is met where it is
read: the item is said once and counted (`BadData`), then skipped or set aside, so that one bad
item never stops the others. A script never raises on junk: it reads with `redis.pcall` and
`pcall(cjson.decode)`, and answers with a code instead.

Every method raises `StoreUnavailable` while Redis cannot serve (down, loading, failing over),
`StoreBusy` when every connection of this process stayed in use for the whole pool wait (load,
not an outage) and `QueueGone` when the consumer group is not there (Redis lost its data),
instead of redis-py's errors, so that callers outside this package can tell an outage from load
and from a bug.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from app.errors import (
    BadDataKind,
    CorruptIndex,
    CorruptRecord,
    QueueGone,
    StoreBusy,
    StoreUnavailable,
)
from app.fleet.batch_job import (
    BatchJob,
    LostJob,
    RunOutcome,
    decode_job,
    decode_lost,
    decode_outcome,
    encode_job,
    encode_lost,
    encode_outcome,
)
from app.fleet.job_index import IndexedJob, IndexPosition, range_start
from app.fleet.job_state import FINISHED, JobState
from app.stores.abc import (
    Delivered,
    FreshCopies,
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
    show,
)
from app.stores.redis.batcher import CommandBatcher
from app.stores.redis.client import is_busy, is_nogroup, is_unavailable

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def translated(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """`method` with redis-py's "not now" errors raised as `StoreUnavailable`, a pool that stayed
    full as `StoreBusy`, and NOGROUP as `QueueGone` (the one-line reason kept; the original
    chained)."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            if is_busy(exc):
                raise StoreBusy(str(exc)) from exc
            if is_nogroup(exc):
                raise QueueGone(f"the job queue's consumer group is gone ({exc})") from exc
            if is_unavailable(exc):
                raise StoreUnavailable(f"Redis unreachable ({type(exc).__name__}: {exc})") from exc
            raise

    return call


_FINISHED_NAMES = "{" + ",".join(f"'{s.value}'" for s in FINISHED) + "}"

# Reads that never raise on junk. A value that is not a string (WRONGTYPE) comes back as false,
# which a reply carries as nil.
_READ = f"""
local finished = {{}}
for _, name in ipairs({_FINISHED_NAMES}) do finished[name] = true end
-- the integer at key (0 when there is none), or false and what is there instead
local function int_at(key)
  local raw = redis.pcall('GET', key)
  if not raw then return 0, '' end
  if type(raw) ~= 'string' then return false, false end
  if #raw > 18 or not string.match(raw, '^%-?%d+$') then return false, raw end
  return tonumber(raw), raw
end
-- the state of the record at key (nil when there is none), or false and what is there instead
-- when it is not a JSON object with a string state (the rest is for msgspec to judge)
local function state_at(key)
  local raw = redis.pcall('GET', key)
  if not raw then return nil, '' end
  if type(raw) ~= 'string' then return false, false end
  if not string.match(raw, '^%s*{{') then return false, raw end  -- cjson reads [] as {{}} too
  local ok, record = pcall(cjson.decode, raw)
  if not ok then return false, raw end
  local state = record['state']
  if state == nil then state = 'PENDING' end  -- the schema's default, as msgspec reads it
  if type(state) ~= 'string' then return false, raw end
  return state, raw
end
-- the bound counts unfinished jobs: one ended. One DECR (no read first): on a junk counter it
-- fails, and the junk is left for the next submit; one below zero (started again) goes.
local function count_down(key)
  local queued = redis.pcall('DECR', key)
  if type(queued) == 'number' and queued < 0 then redis.call('DEL', key) end
end
"""

# KEYS: record, counter, stream, index, fence
# ARGV: json, bound, job_id, submitted_at, group, consumer to deliver to ('': none), the record
#       as its first attempt makes it ('': none)
# {0, record} exists; {2, count} full; {3} its record is not a string value;
# {1, entry id, 1 when the counter was junk, 1 when the index is junk (the job goes on,
#  unindexed), the XREADGROUP reply of the delivery (nil: none), 1 when the first attempt was
#  made, the counter's junk (nil: not a string value; last, since a nil ends a Lua array)}
# The common case costs no read: the count goes up (INCR answers it) and the record is made
# with SET NX; a full type or a known id undoes the count (DECR) and then reads what is there.
# A junk counter (INCR refuses it, leaving it as it is) takes the careful path.
_SUBMIT = f"""{_READ}
local function known()
  local existing = redis.pcall('GET', KEYS[1])
  if type(existing) == 'table' then return {{3}} end
  if existing then return {{0, existing}} end
  return nil
end
local bound = tonumber(ARGV[2])
local junk, raw = 0, nil
local queued = redis.pcall('INCR', KEYS[2])
if type(queued) ~= 'number' then
  local there = known()
  if there then return there end
  -- the counter is junk: start it again (the bound is a safety valve, not a ledger)
  local _, junk_raw = int_at(KEYS[2])
  raw, junk = junk_raw, 1
  redis.call('DEL', KEYS[2])
  if bound <= 0 then return {{2, '0'}} end
  redis.call('INCR', KEYS[2])
elseif queued > bound then
  redis.call('DECR', KEYS[2])
  return known() or {{2, tostring(queued - 1)}}
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('DECR', KEYS[2])  -- the id is known: not one more unfinished job
  return known() or {{3}}
end
-- the entry carries the record as submitted: its first taker reads nothing more (see take)
local id = redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[3], 'record', ARGV[1])
local indexed = redis.pcall('ZADD', KEYS[4], ARGV[4], ARGV[3])
local index_junk = 0
if type(indexed) == 'table' and indexed['err'] then index_junk = 1 end
-- the submitting orchestrator takes the oldest unread entry (this one, unless others wait) as
-- its read would: best effort (no group, Redis lost it: no delivery; its readers recreate it)
local delivered, dispatched = false, 0
if ARGV[6] ~= '' then
  local got = redis.pcall('XREADGROUP', 'GROUP', ARGV[5], ARGV[6], 'COUNT', 1,
                          'STREAMS', KEYS[3], '>')
  if type(got) == 'table' and not got['err'] then
    delivered = got
    -- its own entry: the first attempt is made here too (no DISPATCHED write after), unless
    -- a fence is there already (left over, or junk: the dispatcher's write meets it)
    if ARGV[7] ~= '' and got[1][2][1][1] == id and redis.call('SET', KEYS[5], 1, 'NX') then
      redis.call('SET', KEYS[1], ARGV[7])
      dispatched = 1
    end
  end
end
return {{1, id, junk, index_junk, delivered, dispatched, raw}}
"""

# KEYS: record, fence, counter, channel, cancel, stream
# ARGV: json, token, final (0/1), retention, entry id to ack with a final write ('': none), group,
#       the new state (published), the new token to set the fence to ('': none; a dispatch),
#       the record expected there ('': any; a fresh entry's copy, unverified)
# (a missing record first: when Redis lost it, it lost its fence too, and that is no takeover)
# A final write acks and drops the job's queue entry in the same step (no GET, MULTI, EXEC
# after it).
_WRITE = f"""{_READ}
local state, current = state_at(KEYS[1])
if state == nil then return {{-1}} end
local fence, fence_raw = int_at(KEYS[2])
if not fence then return {{-3, fence_raw}} end
-- made already (a call repeated after its reply was lost): the same record under the new token
if ARGV[8] ~= '' and fence == tonumber(ARGV[8]) and current == ARGV[1] then return {{1}} end
if tonumber(ARGV[2]) ~= fence then return {{0}} end
if ARGV[9] ~= '' and current ~= ARGV[9] then return {{0}} end
if not state then return {{-4, current}} end
if finished[state] then return {{-2}} end
if ARGV[8] ~= '' then redis.call('SET', KEYS[2], ARGV[8], 'KEEPTTL') end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
  count_down(KEYS[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[5], ARGV[4])
  if ARGV[5] ~= '' then
    redis.call('XACK', KEYS[6], ARGV[6], ARGV[5])
    redis.call('XDEL', KEYS[6], ARGV[5])
  end
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[4], ARGV[7])
return {{1}}
"""

# KEYS: record, fence, counter, channel, cancel, cancels channel
# ARGV: the record as read, the fence as read, the cancelled record, retention, job id
# {-3, fence} or {-4, record} when that does not read
_CANCEL = f"""{_READ}
local state, current = state_at(KEYS[1])
if state == nil then return {{-1}} end
if not state then return {{-4, current}} end
if finished[state] then return {{-2, current}} end
redis.call('SET', KEYS[5], 1, 'EX', ARGV[4])
if state ~= 'PENDING' then
  redis.call('PUBLISH', KEYS[4], 'cancel')  -- waits.CANCEL_REQUESTED: for who waits on the job
  redis.call('PUBLISH', KEYS[6], ARGV[5])  -- every orchestrator listens: its holder stops it
  return {{0, current}}
end
local fence, fence_raw = int_at(KEYS[2])
if not fence then return {{-3, fence_raw}} end
if current ~= ARGV[1] or fence ~= tonumber(ARGV[2]) then
  return {{3}}
end
redis.call('SET', KEYS[2], tonumber(ARGV[2]) + 1)
redis.call('SET', KEYS[1], ARGV[3])
count_down(KEYS[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', KEYS[4], 'CANCELLED')
return {{1, ARGV[3]}}
"""
# a PENDING job changing under a cancel is retried this often before the cancel gives up on it
_CANCEL_TRIES = 10

# KEYS: fence   ARGV: token   -> {1} raised, {0} not below, {-3, fence} when that does not read
_RESTORE_FENCE = f"""{_READ}
local fence, raw = int_at(KEYS[1])
if not fence then return {{-3, raw}} end
if fence >= tonumber(ARGV[1]) then return {{0}} end
redis.call('SET', KEYS[1], ARGV[1])
return {{1}}
"""

# KEYS: record, fence, lost stream   ARGV: job id, report JSON, max length
# (junk in the lost stream's key must not fail the caller: the note is dropped then)
_REPORT_LOST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'job_id', ARGV[1], 'lost', ARGV[2])
return 1
"""
#: Lost-job reports kept (about: the stream is trimmed approximately).
LOST_KEPT = 10_000

# KEYS: stream, quarantine, record, fence, counter, channel, cancel
# ARGV: group, entry id, job id, kind, reason, maxlen, record as read, failed record, retention
# 0 (nothing done) when the item was mended since it was read; 1, or 2 when the quarantine
# key is junk itself (the entry is acked and dropped)
_QUARANTINE = f"""{_READ}
if ARGV[7] ~= '' and redis.pcall('GET', KEYS[3]) ~= ARGV[7] then return 0 end
if ARGV[4] == 'fencing_token' and int_at(KEYS[4]) then return 0 end  -- mended meanwhile
if ARGV[8] ~= '' then
  -- the fence is junk but the record reads: the job ends here (no holder can write it now)
  redis.call('SET', KEYS[3], ARGV[8])
  count_down(KEYS[5])
  redis.call('PUBLISH', KEYS[6], 'FAILED')
end
-- junk in the quarantine key itself must not keep the entry in the queue: it is dropped then
local kept = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
                         'entry', ARGV[2], 'job_id', ARGV[3], 'kind', ARGV[4], 'reason', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
-- what is left of the job is kept for the retention, as a finished job's, then expires
for i = 3, 4 do redis.call('EXPIRE', KEYS[i], ARGV[9]) end
redis.call('EXPIRE', KEYS[7], ARGV[9])
if type(kept) == 'table' then return 2 end
return 1
"""
#: The quarantine stream keeps about this many entries (MAXLEN ~).
QUARANTINE_MAXLEN = 10_000


def events_channel(job_prefix: str, job_id: str) -> str:
    """The pub/sub channel of a job's changes: `<prefix>-events:<id>`. Only processes with a
    waiter on the job subscribe to it (`RedisJobEvents.subscribed`)."""
    return f"{job_prefix}-events:{job_id}"


def cancels_channel(job_prefix: str) -> str:
    """The pub/sub channel of cancel requests of jobs on a worker (the message: the job id),
    which every orchestrator listens to: `<prefix>-cancels`. Cancels are rare; a job's holder,
    whichever it is, hears its own."""
    return f"{job_prefix}-cancels"


class RedisJobStore:
    """`JobStore` on one Redis (or Valkey) server: records, fencing, the stream, events."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        job_prefix: str = "wpm-job",
        stream_key: str = "wpm-jobs:stream",
        group: str = "orchestrators",
        retention_seconds: int = 86_400,
        bad_data: BadData | None = None,
        quarantine_maxlen: int = QUARANTINE_MAXLEN,
        lost_key: str = "wpm-jobs:lost",
        index_key: str = "wpm-jobs:index",
        batcher: CommandBatcher | None = None,
    ) -> None:
        self._redis = client
        # the hot path's commands (submit, take, write): in pipelines while its senders run
        # (the orchestrator runs them), each alone otherwise
        self.batcher = batcher or CommandBatcher(client)
        self._prefix = job_prefix
        self.stream_key = stream_key
        self.quarantine_key = f"{stream_key}:quarantine"
        self.group = group
        self.lost_key = lost_key
        self.index_key = index_key
        self._retention = retention_seconds
        self.bad_data = bad_data or BadData()
        self._quarantine_maxlen = quarantine_maxlen
        self._fresh = FreshCopies()  # records fresh queue entries carried, until taken
        self._submit = client.register_script(_SUBMIT)
        self._write = client.register_script(_WRITE)
        self._cancel = client.register_script(_CANCEL)
        self._report_lost = client.register_script(_REPORT_LOST)
        self._restore_fence = client.register_script(_RESTORE_FENCE)
        self._quarantine = client.register_script(_QUARANTINE)
        self._remove_consumers = client.register_script(_REMOVE_IDLE_CONSUMERS)
        self._trim_index = client.register_script(_TRIM_INDEX)

    def __repr__(self) -> str:
        return f"<RedisJobStore {self.stream_key} group={self.group}>"

    # --- keys -------------------------------------------------------------------------------------

    def record_key(self, job_id: str) -> str:
        """The key of a job's record, `<prefix>:<id>` (its fence and cancel keys add a suffix)."""
        return f"{self._prefix}:{job_id}"

    def _keys(self, job: BatchJob) -> list[str]:
        base = self.record_key(job.job_id)
        return [
            base,
            f"{base}:fence",
            f"{self._prefix}-queued:{job.job_type}",
            events_channel(self._prefix, job.job_id),
            f"{base}:cancel",
        ]

    # --- junk -------------------------------------------------------------------------------------

    def _bad_record(self, job_id: str, raw: bytes | str | None) -> CorruptRecord:
        """The error for a record that does not read (`raw` None: not a string value); said once."""
        return self._said(BadDataKind.JOB_RECORD, job_id, self.record_key(job_id),
                          record_problem(raw), RECORD_ACTION)  # fmt: skip

    def _bad_fence(self, job_id: str, raw: bytes | str | None) -> CorruptRecord:
        """The error for a fencing token that is not an integer; said once."""
        key = f"{self.record_key(job_id)}:fence"
        return self._said(BadDataKind.FENCING_TOKEN, job_id, key, not_a(raw, "an integer"),
                          FENCE_ACTION)  # fmt: skip

    def _said(
        self, kind: BadDataKind, job_id: str, key: str, detail: str, action: str
    ) -> CorruptRecord:
        error = CorruptRecord(kind, job_id, key, detail)
        self.bad_data.found(kind, key, error.problem, action)
        return error

    def _decode(self, job_id: str, raw: bytes | str) -> BatchJob:
        """The record of `job_id` from what its key holds, or CorruptRecord."""
        try:
            job = decode_job(raw)
        except msgspec.DecodeError:
            raise self._bad_record(job_id, raw) from None
        if job.job_id != job_id:
            raise self._bad_record(job_id, raw)
        return job

    # --- records ----------------------------------------------------------------------------------

    @translated
    async def ensure_group(self) -> bool:
        """Create the stream and the consumer group if they are not there yet; True if it did.

        The group reads the stream from its start, so entries added before it (submits after
        Redis came back empty) are delivered."""
        try:
            await self._redis.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    @translated
    async def submit(
        self,
        job: BatchJob,
        *,
        bound: int,
        deliver_to: str = "",
        dispatched: BatchJob | None = None,
    ) -> tuple[SubmitResult, BatchJob | None, int, Delivered | None]:
        """Create the record and queue it, atomically, unless the id exists or the type is full
        (and deliver the oldest unread entry to `deliver_to`, and make the first attempt when it
        is this job's own, in the same script: see `JobStore.submit`).

        Returns (result, the existing job for EXISTS, the queued count for QUEUE_FULL, the
        entry delivered); CorruptRecord when the id's existing record does not read. A junk
        counter of the type is started again from 0.
        """
        keys = self._keys(job)
        reply = await self.batcher.script(
            self._submit,
            [keys[0], keys[2], self.stream_key, self.index_key, keys[1]],
            [encode_job(job), bound, job.job_id, repr(job.submitted_at), self.group, deliver_to,
             encode_job(dispatched) if dispatched is not None and deliver_to else b""],
        )  # fmt: skip
        status = reply[0]
        if status == 3:
            raise self._bad_record(job.job_id, None)
        if status == 0:
            return SubmitResult.EXISTS, self._decode(job.job_id, reply[1]), 0, None
        if status == 2:
            return SubmitResult.QUEUE_FULL, None, int(reply[1]), None
        if reply[2]:
            self.bad_data.found(BadDataKind.QUEUED_COUNTER, keys[2],
                                not_a(reply[6] if len(reply) > 6 else None, "an integer"),
                                "reset to 0")  # fmt: skip
        if reply[3]:
            self._index_is_junk()
        delivered = None
        if reply[4]:
            # a script's XREADGROUP reply, as Redis sends it: fields as a flat list
            entries = ((e[0], _pairs(e[1])) for _, es in reply[4] for e in es)
            made = bool(reply[5])
            usable = await self._usable(entries, fresh=not made)
            if usable:
                delivered = Delivered(entry_id=usable[0][0], job_id=usable[0][1], dispatched=made)
        return SubmitResult.CREATED, None, 0, delivered

    @translated
    async def get(self, job_id: str) -> BatchJob | None:
        """The record, or None when there is none (never submitted, or expired); CorruptRecord
        when it does not read."""
        try:
            raw = await self._redis.get(self.record_key(job_id))
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            raise self._bad_record(job_id, None) from None
        return None if raw is None else self._decode(job_id, raw)

    @translated
    async def take(self, job_id: str) -> Taken | None:
        """See `JobStore.take`: GET of the record and its fence and EXISTS of its cancel key,
        in one pipeline (one round trip; not a transaction: each is read as `get`, `fence` and
        `cancel_requested` would)."""
        if (taken := self._fresh.take(job_id)) is not None:
            return taken
        key = self.record_key(job_id)
        raw, fence_raw, cancel = await self.batcher.execute(
            ("GET", key), ("GET", f"{key}:fence"), ("EXISTS", f"{key}:cancel")
        )
        if isinstance(raw, ResponseError):
            raise self._bad_record(job_id, None) if _wrong_type(raw) else raw
        if raw is None:
            return None
        job = self._decode(job_id, raw)
        if isinstance(fence_raw, ResponseError):
            raise self._bad_fence(job_id, None) if _wrong_type(fence_raw) else fence_raw
        if fence_raw is not None and not is_int(fence_raw):
            raise self._bad_fence(job_id, fence_raw)
        if isinstance(cancel, Exception):
            raise cancel
        return Taken(job=job, fence=int(fence_raw or 0), cancel_requested=bool(cancel))

    @translated
    async def fence(self, job_id: str) -> int:
        """The job's newest fencing token (0 before the first); CorruptRecord when it is junk."""
        try:
            raw = await self._redis.get(f"{self.record_key(job_id)}:fence")
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            raise self._bad_fence(job_id, None) from None
        if raw is None:
            return 0
        if not is_int(raw):
            raise self._bad_fence(job_id, raw)
        return int(raw)

    @translated
    async def next_token(self, job_id: str) -> int:
        """A new fencing token: from now on, holders of older ones are refused."""
        try:
            return int(await self._redis.incr(f"{self.record_key(job_id)}:fence"))
        except ResponseError:
            await self.fence(job_id)  # junk: raises CorruptRecord saying what is there
            raise

    @translated
    async def write(
        self,
        job: BatchJob,
        token: int,
        *,
        ack: str = "",
        advance: bool = False,
        expect: bytes | None = None,
    ) -> WriteResult:
        """Store `job` if `token` is still the job's fencing token and the job has not ended
        (and the record is `expect`, when given); a final write that is made also acks and
        drops the queue entry `ack`, and `advance` sets the fence to `token + 1` (one script).
        CorruptRecord when the stored record or fencing token does not read."""
        job.fencing_token = token + 1 if advance else token
        final = "1" if job.state.finished else "0"
        reply = await self.batcher.script(
            self._write,
            [*self._keys(job), self.stream_key],
            [encode_job(job), token, final, self._retention, ack if final == "1" else "",
             self.group, job.state.value, job.fencing_token if advance else "", expect or b""],
        )  # fmt: skip
        if reply[0] == -3:
            raise self._bad_fence(job.job_id, reply[1])
        if reply[0] == -4:
            raise self._bad_record(job.job_id, reply[1])
        return WriteResult(int(reply[0]))

    @translated
    async def restore_fence(self, job_id: str, token: int) -> bool:
        """See `JobStore.restore_fence`: one script compares and sets `<record>:fence`;
        CorruptRecord when the fence is junk."""
        key = f"{self.record_key(job_id)}:fence"
        reply = await self._restore_fence(keys=[key], args=[token])
        if reply[0] == -3:
            raise self._bad_fence(job_id, reply[1])
        return bool(reply[0] == 1)

    @translated
    async def request_cancel(self, job_id: str, *, error: str, now: float) -> BatchJob | None:
        """See `JobStore.request_cancel`: one script marks the request and, for a PENDING job,
        ends it under a new token if neither the record nor the fence changed since read."""
        key = self.record_key(job_id)
        job: BatchJob | None = None
        for _ in range(_CANCEL_TRIES):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.get(f"{key}:fence")
                raw, fence_raw = await pipe.execute(raise_on_error=False)
            if isinstance(raw, ResponseError):
                raise self._bad_record(job_id, None) if _wrong_type(raw) else raw
            if raw is None:
                return None
            job = self._decode(job_id, raw)
            if job.state.finished:
                return job
            if isinstance(fence_raw, ResponseError):
                raise self._bad_fence(job_id, None) if _wrong_type(fence_raw) else fence_raw
            if fence_raw is not None and not is_int(fence_raw):
                raise self._bad_fence(job_id, fence_raw)
            fence = int(fence_raw or 0)
            cancelled = msgspec.structs.replace(
                job, state=JobState.CANCELLED, error=error, finished_at=now, fencing_token=fence + 1
            )
            reply = await self._cancel(
                keys=[*self._keys(job), cancels_channel(self._prefix)],
                args=[raw, fence, encode_job(cancelled), self._retention, job_id],
            )
            if reply[0] == -1:
                return None
            if reply[0] == -3:
                raise self._bad_fence(job_id, reply[1])
            if reply[0] == -4:
                raise self._bad_record(job_id, reply[1])
            if reply[0] != 3:  # 3: it changed since read; read again
                return self._decode(job_id, reply[1])
        return job

    @translated
    async def record_outcomes(self, outcomes: Sequence[RecordedRun]) -> list[bool]:
        """`SET <record>:run:<token> <outcome> NX EX <retention>` of each, in one pipeline."""
        replies = await self.batcher.execute(*(
            ("SET", f"{self.record_key(job_id)}:run:{token}", encode_outcome(outcome), "NX",
             "EX", self._retention)
            for job_id, token, outcome in outcomes
        ))  # fmt: skip
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [bool(reply) for reply in replies]

    @translated
    async def outcomes(self, job_id: str, tokens: Sequence[int]) -> dict[int, RunOutcome]:
        """One MGET of the tokens' outcome keys; one that does not decode is said once and left
        out (the run's worker is asked again)."""
        if not tokens:
            return {}
        base = self.record_key(job_id)
        values = await self._redis.mget([f"{base}:run:{t}" for t in tokens])
        found: dict[int, RunOutcome] = {}
        for token, raw in zip(tokens, values, strict=True):
            if raw is None:
                continue
            try:
                found[token] = decode_outcome(raw)
            except msgspec.DecodeError as exc:
                self.bad_data.found(
                    BadDataKind.RUN_OUTCOME, f"{base}:run:{token}", f"not a run's end ({exc})",
                    OUTCOME_ACTION,
                )  # fmt: skip
        return found

    @translated
    async def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for (the `:cancel` key, kept for the retention)."""
        return bool(await self._redis.exists(f"{self.record_key(job_id)}:cancel"))

    @translated
    async def queued_count(self, job_type: str) -> int:
        """Unfinished jobs of `job_type`: the `<prefix>-queued:<type>` counter (junk reads as 0,
        what the next submit starts it again from)."""
        key = f"{self._prefix}-queued:{job_type}"
        try:
            raw = await self._redis.get(key)
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            raw = None
            self.bad_data.found(BadDataKind.QUEUED_COUNTER, key, not_a(None, "an integer"),
                                "read as 0")  # fmt: skip
        if raw is not None and not is_int(raw):
            self.bad_data.found(BadDataKind.QUEUED_COUNTER, key, not_a(raw, "an integer"),
                                "read as 0")  # fmt: skip
            return 0
        return int(raw or 0)

    @translated
    async def report_lost(self, lost: LostJob) -> bool:
        """XADD to the lost-job stream (trimmed to about `LOST_KEPT`) and DEL the job's fence,
        in one script, unless its record is there after all."""
        key = self.record_key(lost.job_id)
        noted = await self._report_lost(
            keys=[key, f"{key}:fence", self.lost_key],
            args=[lost.job_id, encode_lost(lost), LOST_KEPT],
        )
        return bool(noted)

    @translated
    async def lost_jobs(self, *, count: int) -> list[LostJob]:
        """XREVRANGE of the lost-job stream; a report that does not decode is logged and skipped."""
        reply: Any = await self._redis.xrevrange(self.lost_key, count=count)
        found: list[LostJob] = []
        for entry_id, fields in reply:
            raw = fields.get(b"lost", fields.get("lost", b""))
            try:
                found.append(decode_lost(raw))
            except msgspec.DecodeError as exc:
                log.warning("ignoring %s %s: not a lost-job report (%s)", self.lost_key,
                            text(entry_id), exc)  # fmt: skip
        return found

    # --- the stream -------------------------------------------------------------------------------

    @translated
    async def read_new(self, consumer: str, *, count: int, block_ms: int) -> list[QueueEntry]:
        """New entries for this consumer: (entry id, job id). One that names no job (no job_id
        field, or not UTF-8) goes to quarantine instead."""
        reply: Any = await self._redis.xreadgroup(
            self.group, consumer, {self.stream_key: ">"}, count=count, block=block_ms
        )
        return await self._usable((e for _, entries in reply or [] for e in entries), fresh=True)

    @translated
    async def claim_idle(self, consumer: str, *, min_idle_ms: int, count: int) -> list[QueueEntry]:
        """Entries another consumer has held idle for `min_idle_ms` (it died): now ours. One
        that names no job goes to quarantine instead."""
        reply: Any = await self._redis.xautoclaim(
            self.stream_key, self.group, consumer, min_idle_time=min_idle_ms, start_id="0-0",
            count=count,
        )  # fmt: skip
        return await self._usable(reply[1])

    async def _usable(
        self, entries: Iterable[Sequence[Any]], *, fresh: bool = False
    ) -> list[QueueEntry]:
        """The entries that name a job, as (entry id, job id); the others are set aside, each
        on its own, so that one poison entry never holds up the rest. `fresh` (first
        deliveries): the records they carry are kept for their `take`."""
        usable: list[QueueEntry] = []
        unusable: list[tuple[str, dict[Any, Any], str]] = []
        for entry_id, fields, *_ in entries:
            if entry_id is None or not fields:
                continue  # deleted meanwhile (XAUTOCLAIM on Redis 6.2 answers nil for it)
            job_id, problem = _job_id_of(fields)
            if problem:
                unusable.append((text(entry_id), fields, problem))
                continue
            usable.append((text(entry_id), job_id))
            if fresh and isinstance(record := fields.get(b"record"), bytes):
                self._fresh.keep(job_id, record)
        for entry_id, fields, problem in unusable:
            await self._set_aside(entry_id, fields, problem)
        return usable

    async def _set_aside(self, entry_id: str, fields: dict[Any, Any], problem: str) -> None:
        """Move an entry that names no job to the quarantine stream, with its fields as they
        were (names prefixed `original.`), and ack it."""
        kind = BadDataKind.STREAM_ENTRY
        self.bad_data.found(kind, f"queue entry {entry_id}", problem,
                            f"moved to {self.quarantine_key}")  # fmt: skip
        record: dict[Any, Any] = {"entry": entry_id, "job_id": "", "kind": kind.value,
                                  "reason": problem}  # fmt: skip
        for name, value in fields.items():
            record[b"original." + (name if isinstance(name, bytes) else name.encode())] = value
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.quarantine_key, record, maxlen=self._quarantine_maxlen, approximate=True)
            pipe.xack(self.stream_key, self.group, entry_id)
            pipe.xdel(self.stream_key, entry_id)
            try:
                await pipe.execute()
            except ResponseError as exc:
                if not _wrong_type(exc):
                    raise
                # EXEC does not roll back: the entry is acked and dropped all the same
                self._quarantine_is_junk()
                return
        self.bad_data.quarantined(kind)

    @translated
    async def quarantine(self, entry_id: str, problem: CorruptRecord, *, now: float) -> bool:
        """See `JobStore.quarantine`: one script moves the entry, acks it, and (a junk fencing
        token, a record that reads) ends the job FAILED, if the record did not change since."""
        job_id = problem.job_id
        key = self.record_key(job_id)
        moved = f"moved to {self.quarantine_key}"
        if problem.kind is not BadDataKind.STREAM_ENTRY:
            moved = f"its queue entry {entry_id} {moved}"
        self.bad_data.found(problem.kind, problem.key, problem.problem, moved)
        as_read: bytes | str = b""
        failed, job_type = b"", ""
        try:
            raw = await self._redis.get(key)
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            raw = None  # not a string value: junk still, and nothing to compare
        if raw is not None:
            if problem.kind is not BadDataKind.FENCING_TOKEN and readable(job_id, raw):
                return False  # mended meanwhile, or a record came: read it again
            as_read = raw
        if problem.kind is BadDataKind.FENCING_TOKEN and as_read:
            try:
                job = decode_job(as_read)
            except msgspec.DecodeError:
                pass  # the record is junk too: kept as it is, for the retention
            else:
                job_type = job.job_type
                if not job.state.finished:
                    failed = encode_job(msgspec.structs.replace(
                        job, state=JobState.FAILED, error=f"quarantined: {problem.problem}",
                        finished_at=now,
                    ))  # fmt: skip
        keys = [self.stream_key, self.quarantine_key, key, f"{key}:fence",
                f"{self._prefix}-queued:{job_type}", events_channel(self._prefix, job_id),
                f"{key}:cancel"]  # fmt: skip
        args = [self.group, entry_id, job_id, problem.kind.value, problem.problem,
                self._quarantine_maxlen, as_read, failed, self._retention]  # fmt: skip
        done = await self._quarantine(keys=keys, args=args)
        if done == 2:
            self._quarantine_is_junk()
        elif done:
            self.bad_data.quarantined(problem.kind)
        return bool(done)

    def _quarantine_is_junk(self) -> None:
        self.bad_data.found(BadDataKind.STREAM_ENTRY, self.quarantine_key, "not a stream",
                            "entries set aside are acked and dropped, not kept")  # fmt: skip

    @translated
    async def quarantined(self, *, count: int = 100) -> list[Quarantined]:
        """The last `count` entries set aside, oldest first."""
        reply: Any = await self._redis.xrevrange(self.quarantine_key, count=count)
        found = []
        for entry_id, fields in reversed(reply):
            f = {text(k, lenient=True): text(v, lenient=True) for k, v in fields.items()}
            found.append(
                Quarantined(
                    quarantine_id=text(entry_id), entry_id=f.get("entry", ""),
                    job_id=f.get("job_id", ""), kind=f.get("kind", ""),
                    reason=f.get("reason", ""),
                )
            )  # fmt: skip
        return found

    @translated
    async def keep_alive(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries we are working on, so that nobody claims them."""
        if entry_ids:
            await self._redis.xclaim(
                self.stream_key, self.group, consumer, min_idle_time=0,
                message_ids=list(entry_ids), justid=True,
            )  # fmt: skip

    @translated
    async def remove_idle_consumers(self, *, min_idle_ms: int, keep: str) -> list[str]:
        """Drop the consumers (but `keep`) that hold no entry and were idle `min_idle_ms`."""
        removed: Any = await self._remove_consumers(
            keys=[self.stream_key], args=[self.group, min_idle_ms, keep]
        )
        return [name.decode(errors="replace") for name in removed]

    @translated
    async def ack(self, entry_id: str) -> None:
        """The job has ended: acknowledge and drop its entry (the stream holds open work only)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream_key, self.group, entry_id)
            pipe.xdel(self.stream_key, entry_id)
            await pipe.execute()

    @translated
    async def holds_entry(self, entry_id: str) -> bool:
        """XRANGE of the entry's id alone: whether the stream holds it."""
        return bool(await self._redis.xrange(self.stream_key, entry_id, entry_id, count=1))

    # --- the job index ----------------------------------------------------------------------------

    def _index_is_junk(self) -> CorruptIndex:
        self.bad_data.found(BadDataKind.JOB_INDEX, self.index_key, "not a sorted set",
                            "jobs are not indexed, and listing them answers DATA_LOSS, until"
                            " it is deleted")  # fmt: skip
        return CorruptIndex(f"job index {self.index_key}: unreadable: not a sorted set")

    def _index_member(self, member: bytes) -> str | None:
        """The job id an index member names, or None (said once) when it names none."""
        job_id = index_member_id(member)
        if job_id is None:
            key = f"{self.index_key} member {show(member)}"
            self.bad_data.found(BadDataKind.JOB_INDEX, key, "not a job id", "skipped")
        return job_id

    @translated
    async def index_page(
        self, *, after: IndexPosition | None, since: float, until: float, count: int
    ) -> list[IndexedJob]:
        """See `JobStore.index_page`: one ZREVRANGEBYSCORE, then one MGET of the records."""
        top, included, skip = range_start(after, until)
        try:
            reply: Any = await self._redis.zrevrangebyscore(
                self.index_key, _score(top, included), _score(since, True), start=skip,
                num=count, withscores=True,
            )  # fmt: skip
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            raise self._index_is_junk() from None
        ids = [self._index_member(member) for member, _ in reply]
        wanted = [job_id for job_id in ids if job_id is not None]
        # a key that is not a string (another type) reads as nil here: as if it were gone
        values = await self._redis.mget([self.record_key(i) for i in wanted]) if wanted else []
        records = iter(values)
        page: list[IndexedJob] = []
        for (_, score), job_id in zip(reply, ids, strict=True):
            job: BatchJob | None = None
            raw = next(records) if job_id is not None else None
            if job_id is not None and raw is not None:
                with contextlib.suppress(CorruptRecord):  # said and counted by _decode
                    job = self._decode(job_id, raw)
            page.append(IndexedJob(score=float(score), job=job))
        return page

    @translated
    async def trim_index(self, *, before: float, count: int, skip: int = 0) -> tuple[int, int]:
        """See `JobStore.trim_index`: ZRANGEBYSCORE of the oldest, then one script that drops
        those whose record is gone and whose score did not change since (a job id submitted
        again meanwhile has a new record and a new score)."""
        try:
            reply: Any = await self._redis.zrangebyscore(
                self.index_key, "-inf", _score(before, False), start=skip, num=count,
                withscores=True,
            )  # fmt: skip
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            self._index_is_junk()
            return 0, 0
        if not reply:
            return 0, 0
        members = [member for member, _ in reply]
        prefix = self._prefix.encode()
        keys: list[Any] = [self.index_key, *(prefix + b":" + m for m in members)]
        args: list[Any] = [*members, *(repr(float(score)) for _, score in reply)]
        removed = await self._trim_index(keys=keys, args=args)
        return len(reply), int(removed)


# KEYS: stream   ARGV: group, min idle ms, the consumer to keep
# In one script: a consumer is removed only while it holds no entry (DELCONSUMER would drop its
# pending ones, whose jobs nobody could then claim).
_REMOVE_IDLE_CONSUMERS = """
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[3] and info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
"""


# KEYS: index, the record of each member   ARGV: the members, then their scores as read
# Drops the members whose record is gone and whose score is still the one read; how many.
_TRIM_INDEX = """
local n = #KEYS - 1
local members = {}
for i = 1, n do members[i] = ARGV[i] end
local scores = redis.call('ZMSCORE', KEYS[1], unpack(members))
local gone = {}
for i = 1, n do
  if scores[i] and tonumber(scores[i]) == tonumber(ARGV[n + i])
      and redis.call('EXISTS', KEYS[i + 1]) == 0 then
    table.insert(gone, members[i])
  end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
"""


def _score(value: float, included: bool) -> str:
    """A score bound as ZRANGEBYSCORE takes it: `(` before an excluded one."""
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return repr(value) if included else f"({value!r}"


def _job_id_of(fields: dict[Any, Any]) -> tuple[str, str]:
    """(job id, "") from an entry's fields, or ("", what is wrong). Other fields are ignored:
    a newer writer may add some."""
    raw = fields.get(b"job_id", fields.get("job_id"))
    if raw is None:
        return "", f"no job_id field (fields {show(b' '.join(_bytes(k) for k in fields))})"
    try:
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        return "", f"job_id {show(raw)} is not UTF-8"
    return (job_id, "") if job_id else ("", "empty job_id")


def _pairs(flat: Sequence[Any] | None) -> dict[Any, Any]:
    """A stream entry's fields from the flat list a script gets them as."""
    flat = flat or []
    return dict(zip(flat[::2], flat[1::2], strict=False))


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _wrong_type(exc: ResponseError) -> bool:
    """Whether Redis said the key holds another type (a pipeline prefixes its errors)."""
    return "WRONGTYPE" in str(exc)


def text(value: bytes | str, *, lenient: bool = False) -> str:
    """`value` as str (bytes decoded as UTF-8; `lenient`: what is not UTF-8 escaped)."""
    if isinstance(value, str):
        return value
    return value.decode("utf-8", "backslashreplace") if lenient else value.decode()
