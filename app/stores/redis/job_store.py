"""The orchestrators' shared state in Redis: job records, fencing tokens, the stream, events.

Keys (prefixes configurable):

| key | what |
|---|---|
| `wpm-job:<id>` | the BatchJob as JSON; EX retention once it ends |
| `wpm-job:<id>:fence` | the fencing token: INCR per attempt; only its holder may write |
| `wpm-job:<id>:cancel` | set when a cancel was asked for |
| `wpm-job-queued:<type>` | unfinished jobs of that type (the per-type bound) |
| `wpm-jobs:stream` | job ids, consumer group `orchestrators`; acked and deleted at the end |
| `wpm-jobs:lost` | jobs whose record vanished while in hand (Redis lost them), the newest 10,000 |
| `wpm-job-events:<id>` | pub/sub channel: the record after each change |

Every write goes through a Lua script that checks the fencing token, so a late result from a
superseded attempt is refused and never overwrites the job's outcome.

Every method raises `StoreUnavailable` while Redis cannot serve (down, loading, failing over) and
`QueueGone` when the consumer group is not there (Redis lost its data), instead of redis-py's
errors, so that callers outside this package can tell an outage from a bug.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from app.errors import QueueGone, StoreUnavailable
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
from app.fleet.job_state import FINISHED, JobState
from app.stores.abc import SubmitResult, WriteResult
from app.stores.redis.client import is_nogroup, is_unavailable

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def translated(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """`method` with redis-py's "not now" errors raised as `StoreUnavailable`, and NOGROUP as
    `QueueGone` (the one-line reason kept; the original chained)."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            if is_nogroup(exc):
                raise QueueGone(f"the job queue's consumer group is gone ({exc})") from exc
            if is_unavailable(exc):
                raise StoreUnavailable(f"Redis unreachable ({type(exc).__name__}: {exc})") from exc
            raise

    return call


_FINISHED_NAMES = "{" + ",".join(f"'{s.value}'" for s in FINISHED) + "}"

# KEYS: record, counter, stream   ARGV: json, bound, job_id
_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
local queued = tonumber(redis.call('GET', KEYS[2]) or '0')
if queued >= tonumber(ARGV[2]) then return {2, tostring(queued)} end
redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1])
local id = redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[3])
return {1, id}
"""

# KEYS: record, fence, counter, channel, cancel   ARGV: json, token, final (0/1), retention
# (a missing record first: when Redis lost it, it lost its fence too, and that is no takeover)
_WRITE = f"""
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) ~= fence then return 0 end
local finished = {{}}
for _, name in ipairs({_FINISHED_NAMES}) do finished[name] = true end
if finished[cjson.decode(current)['state']] then return -2 end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  redis.call('DECR', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[5], ARGV[4])
end
redis.call('PUBLISH', KEYS[4], ARGV[1])
return 1
"""


# KEYS: record, fence, counter, channel, cancel
# ARGV: the record as read, the fence as read, the cancelled record, retention
_CANCEL = f"""
local current = redis.call('GET', KEYS[1])
if not current then return {{-1}} end
local finished = {{}}
for _, name in ipairs({_FINISHED_NAMES}) do finished[name] = true end
local state = cjson.decode(current)['state']
if finished[state] then return {{-2, current}} end
redis.call('SET', KEYS[5], 1, 'EX', ARGV[4])
if state ~= 'PENDING' then
  redis.call('PUBLISH', KEYS[4], current)
  return {{0, current}}
end
if current ~= ARGV[1] or tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[2]) then
  return {{3}}
end
redis.call('SET', KEYS[2], tonumber(ARGV[2]) + 1)
redis.call('SET', KEYS[1], ARGV[3])
redis.call('DECR', KEYS[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', KEYS[4], ARGV[3])
return {{1, ARGV[3]}}
"""
# a PENDING job changing under a cancel is retried this often before the cancel gives up on it
_CANCEL_TRIES = 10

# KEYS: fence   ARGV: token
_RESTORE_FENCE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# KEYS: record, fence, lost stream   ARGV: job id, report JSON, max length
_REPORT_LOST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'job_id', ARGV[1], 'lost', ARGV[2])
return 1
"""
#: Lost-job reports kept (about: the stream is trimmed approximately).
LOST_KEPT = 10_000


def events_channel(job_prefix: str, job_id: str) -> str:
    """The pub/sub channel of a job's changes: `<prefix>-events:<id>`."""
    return f"{job_prefix}-events:{job_id}"


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
        lost_key: str = "wpm-jobs:lost",
    ) -> None:
        self._redis = client
        self._prefix = job_prefix
        self.stream_key = stream_key
        self.group = group
        self.lost_key = lost_key
        self._retention = retention_seconds
        self._submit = client.register_script(_SUBMIT)
        self._write = client.register_script(_WRITE)
        self._cancel = client.register_script(_CANCEL)
        self._report_lost = client.register_script(_REPORT_LOST)
        self._restore_fence = client.register_script(_RESTORE_FENCE)

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
        self, job: BatchJob, *, bound: int
    ) -> tuple[SubmitResult, BatchJob | None, int]:
        """Create the record and queue it, atomically, unless the id exists or the type is full.

        Returns (result, the existing job for EXISTS, the queued count for QUEUE_FULL).
        """
        keys = self._keys(job)
        status, payload = await self._submit(
            keys=[keys[0], keys[2], self.stream_key], args=[encode_job(job), bound, job.job_id]
        )
        if status == 0:
            return SubmitResult.EXISTS, decode_job(payload), 0
        if status == 2:
            return SubmitResult.QUEUE_FULL, None, int(payload)
        return SubmitResult.CREATED, None, 0

    @translated
    async def get(self, job_id: str) -> BatchJob | None:
        """The record, or None when there is none (never submitted, or expired)."""
        raw = await self._redis.get(self.record_key(job_id))
        return None if raw is None else decode_job(raw)

    @translated
    async def fence(self, job_id: str) -> int:
        """The job's newest fencing token (0 before the first)."""
        return int(await self._redis.get(f"{self.record_key(job_id)}:fence") or 0)

    @translated
    async def next_token(self, job_id: str) -> int:
        """A new fencing token: from now on, holders of older ones are refused."""
        return int(await self._redis.incr(f"{self.record_key(job_id)}:fence"))

    @translated
    async def write(self, job: BatchJob, token: int) -> WriteResult:
        """Store `job` if `token` is still the job's fencing token and the job has not ended."""
        job.fencing_token = token
        final = "1" if job.state.finished else "0"
        result = await self._write(
            keys=self._keys(job), args=[encode_job(job), token, final, self._retention]
        )
        return WriteResult(int(result))

    @translated
    async def restore_fence(self, job_id: str, token: int) -> bool:
        """See `JobStore.restore_fence`: one script compares and sets `<record>:fence`."""
        key = f"{self.record_key(job_id)}:fence"
        return bool(await self._restore_fence(keys=[key], args=[token]))

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
                raw, fence_raw = await pipe.execute()
            if raw is None:
                return None
            job = decode_job(raw)
            if job.state.finished:
                return job
            fence = int(fence_raw or 0)
            cancelled = msgspec.structs.replace(
                job, state=JobState.CANCELLED, error=error, finished_at=now, fencing_token=fence + 1
            )
            reply = await self._cancel(
                keys=self._keys(job), args=[raw, fence, encode_job(cancelled), self._retention]
            )
            if reply[0] == -1:
                return None
            if reply[0] != 3:  # 3: it changed since read; read again
                return decode_job(reply[1])
        return job

    @translated
    async def record_outcome(self, job_id: str, token: int, outcome: RunOutcome) -> bool:
        """`SET <record>:run:<token> <outcome> NX EX <retention>`."""
        key = f"{self.record_key(job_id)}:run:{token}"
        return bool(
            await self._redis.set(key, encode_outcome(outcome), nx=True, ex=self._retention)
        )

    @translated
    async def outcomes(self, job_id: str, tokens: Sequence[int]) -> dict[int, RunOutcome]:
        """One MGET of the tokens' outcome keys; one that does not decode is logged and left out."""
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
                log.warning("ignoring %s:run:%d: not a run outcome (%s)", base, token, exc)
        return found

    @translated
    async def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for (the `:cancel` key, kept for the retention)."""
        return bool(await self._redis.exists(f"{self.record_key(job_id)}:cancel"))

    @translated
    async def queued_count(self, job_type: str) -> int:
        """Unfinished jobs of `job_type`: the `<prefix>-queued:<type>` counter."""
        return int(await self._redis.get(f"{self._prefix}-queued:{job_type}") or 0)

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
    async def read_new(self, consumer: str, *, count: int, block_ms: int) -> list[tuple[str, str]]:
        """New entries for this consumer: (entry id, job id)."""
        reply: Any = await self._redis.xreadgroup(
            self.group, consumer, {self.stream_key: ">"}, count=count, block=block_ms
        )
        return [entry(e) for _, entries in reply or [] for e in entries]

    @translated
    async def claim_idle(
        self, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[tuple[str, str]]:
        """Entries another consumer has held idle for `min_idle_ms` (it died): now ours."""
        reply: Any = await self._redis.xautoclaim(
            self.stream_key, self.group, consumer, min_idle_time=min_idle_ms, start_id="0-0",
            count=count,
        )  # fmt: skip
        return [entry(e) for e in reply[1] if e and e[1]]

    @translated
    async def keep_alive(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries we are working on, so that nobody claims them."""
        if entry_ids:
            await self._redis.xclaim(
                self.stream_key, self.group, consumer, min_idle_time=0,
                message_ids=list(entry_ids), justid=True,
            )  # fmt: skip

    @translated
    async def ack(self, entry_id: str) -> None:
        """The job has ended: acknowledge and drop its entry (the stream holds open work only)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream_key, self.group, entry_id)
            pipe.xdel(self.stream_key, entry_id)
            await pipe.execute()


def entry(entry: tuple[bytes | str, dict[bytes | str, bytes | str]]) -> tuple[str, str]:
    """A stream entry as (entry id, job id), from bytes or str replies; "" when it has no job id."""
    entry_id, fields = entry
    job_id = fields.get(b"job_id", fields.get("job_id", b""))
    return text(entry_id), text(job_id)


def text(value: bytes | str) -> str:
    """`value` as str (bytes decoded as UTF-8)."""
    return value.decode() if isinstance(value, bytes) else value
