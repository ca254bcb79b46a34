"""The trigger tier's shared state in Redis: schedules, leases, cursors, replicas, the ledger.

Keys (prefix `trigger.key_prefix`, `wpm-trigger` by default):

| key | what |
|---|---|
| `<prefix>:schedules` | HASH: name → the ScheduleSpec as JSON |
| `<prefix>:replicas` | ZSET: replica id → until when it is up (wall time, epoch seconds) |
| `<prefix>:{<name>}:lease` | the replica working the schedule; PX the lease |
| `<prefix>:{<name>}:cursor` | HASH: `tick` (the last nominal tick decided), `last_job`, `pending` |
| `<prefix>:{<name>}:ledger` | ZSET: score the tick, member a TickDecision (JSON); bounded, EX |

A schedule's lease, cursor and ledger share a hash slot (the `{<name>}` tag), so the script that
decides ticks (checks the lease and the cursor, writes the ledger, moves the cursor) touches one
slot, as Redis Cluster asks. Ticks are written as Python's `repr` of the float: Redis parses it to
the same double, and the cursor compares it as a string.

Junk (a schedule or a ledger record that does not decode) is said once and left out
(`BadData`); a Redis that cannot serve raises `StoreUnavailable`, and a process whose connections
all stayed in use for the pool's wait `StoreBusy`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.errors import BadDataKind, StoreBusy, StoreUnavailable
from app.fleet.schedules import (
    RAN,
    PendingTick,
    ScheduleCursor,
    ScheduleSpec,
    TickDecision,
    decode_decision,
    decode_pending,
    decode_spec,
    encode_record,
)
from app.stores.abc import DecideResult, PutMode, PutResult
from app.stores.bad_data import BadData, show
from app.stores.redis.client import REDIS_DOWN_ERRORS
from app.stores.redis.pool import PoolExhausted

log = logging.getLogger(__name__)

_RAN_NAMES = "{" + ",".join(f"['{k.value}']=true" for k in RAN) + "}"

# KEYS: schedules   ARGV: name, version read (0: none), json
_PUT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and type(record['version']) == 'number' then
    version = record['version']
  end
end
if version ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: lease   ARGV: owner, ttl ms
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease   ARGV: owner, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease   ARGV: owner
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: lease, cursor   ARGV: owner, tick, pending json
_PENDING = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
local tick = redis.call('HGET', KEYS[2], 'tick')
if tick and tonumber(tick) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], 'pending', ARGV[3])
return 1
"""

_TRIM = """
local function trim(ledger, keep, horizon, retention)
  redis.call('ZREMRANGEBYSCORE', ledger, '-inf', '(' .. horizon)
  redis.call('ZREMRANGEBYRANK', ledger, 0, -(tonumber(keep) + 1))
  redis.call('EXPIRE', ledger, retention)
end
"""

# KEYS: lease, cursor, ledger
# ARGV: owner, expected tick ('' none), last job ('' keep), keep, horizon, retention, ttl ms,
#       new tick, n, then n pairs of (score, member)
_DECIDE = (
    _TRIM
    + """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
local tick = redis.call('HGET', KEYS[2], 'tick') or ''
if tick ~= ARGV[2] then return -1 end
local n = tonumber(ARGV[9])
for i = 0, n - 1 do
  local score, member = ARGV[10 + 2 * i], ARGV[11 + 2 * i]
  redis.call('ZREMRANGEBYSCORE', KEYS[3], score, score)
  redis.call('ZADD', KEYS[3], score, member)
end
if n > 0 then
  trim(KEYS[3], ARGV[4], ARGV[5], ARGV[6])
  redis.call('HSET', KEYS[2], 'tick', ARGV[8])
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'last_job', ARGV[3]) end
redis.call('HDEL', KEYS[2], 'pending')
if not holder and tonumber(ARGV[7]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[7])
end
return 1
"""
)

# KEYS: ledger   ARGV: score, member, unless ran (1/0), keep, horizon, retention
_ADD = (
    _TRIM
    + f"""
if ARGV[3] == '1' then
  local ran = {_RAN_NAMES}
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])) do
    local ok, record = pcall(cjson.decode, member)
    if ok and type(record) == 'table' and ran[record['kind']] then return member end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
trim(KEYS[1], ARGV[4], ARGV[5], ARGV[6])
return false
"""
)

#: What to do about a schedule record that does not read.
SCHEDULE_ACTION = "left out: no replica runs it until it is written again"
LEDGER_ACTION = "left out of the ledger's answers"


def _score(value: float) -> str:
    if value == math.inf:
        return "+inf"
    if value == -math.inf:
        return "-inf"
    return repr(float(value))


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@contextlib.asynccontextmanager
async def _available(what: str) -> AsyncIterator[None]:
    """Redis that cannot serve (down, loading, failing over) is StoreUnavailable; a pool that
    stayed full is StoreBusy."""
    try:
        yield
    except PoolExhausted as exc:
        raise StoreBusy(f"{what}: {exc}") from exc
    except REDIS_DOWN_ERRORS as exc:
        raise StoreUnavailable(f"Redis unavailable during {what}: {exc}") from exc
    except RedisError as exc:
        if str(exc).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY")):
            raise StoreUnavailable(f"Redis unavailable during {what}: {exc}") from exc
        raise


class RedisScheduleStore:
    """`ScheduleStore` on one Redis (or Valkey) server."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "wpm-trigger",
        ledger_size: int = 1000,
        ledger_retention_seconds: float = 30 * 86_400,
        bad_data: BadData | None = None,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._ledger_size = ledger_size
        self._retention = ledger_retention_seconds
        self.bad_data = bad_data or BadData()
        self._put = client.register_script(_PUT)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._pending = client.register_script(_PENDING)
        self._decide = client.register_script(_DECIDE)
        self._add = client.register_script(_ADD)

    def __repr__(self) -> str:
        return f"<RedisScheduleStore {self._prefix}>"

    # --- keys -------------------------------------------------------------------------------------

    @property
    def schedules_key(self) -> str:
        """The HASH of every schedule."""
        return f"{self._prefix}:schedules"

    @property
    def replicas_key(self) -> str:
        """The ZSET of live replicas."""
        return f"{self._prefix}:replicas"

    def key(self, name: str, what: str) -> str:
        """A schedule's `lease`, `cursor` or `ledger` key (one hash slot per schedule)."""
        return f"{self._prefix}:{{{name}}}:{what}"

    def _decode_spec(self, name: str, raw: bytes | str) -> ScheduleSpec | None:
        try:
            spec = decode_spec(raw)
        except msgspec.DecodeError as exc:
            reason = f"{exc} in {show(raw)}"
        else:
            if spec.name == name:
                return spec
            reason = f"it is the schedule {spec.name!r}"
        self.bad_data.found(
            BadDataKind.SCHEDULE, f"{self.schedules_key} field {name}", reason, SCHEDULE_ACTION
        )
        return None

    def _decode_decision(self, name: str, raw: Any) -> TickDecision | None:
        try:
            return decode_decision(raw)
        except msgspec.DecodeError as exc:
            self.bad_data.found(
                BadDataKind.TICK_DECISION,
                f"{self.key(name, 'ledger')} member {show(raw)}",
                f"{exc}",
                LEDGER_ACTION,
            )
            return None

    # --- schedules --------------------------------------------------------------------------------

    async def put(
        self, spec: ScheduleSpec, *, mode: PutMode, expected_version: int = 0
    ) -> tuple[PutResult, ScheduleSpec | None]:
        """Store `spec` with the next version, as `mode` allows (see `ScheduleStore.put`)."""
        async with _available("put"):
            # read, then write if the version read is still there (a race makes another pass)
            for _ in range(10):
                raw = await self._redis.hget(self.schedules_key, spec.name)
                current = None if raw is None else self._decode_spec(spec.name, raw)
                if raw is not None and current is None:
                    current_version = -1  # junk: only an UPSERT or UPDATE may replace it
                else:
                    current_version = 0 if current is None else current.version
                if raw is not None and mode is PutMode.CREATE:
                    return PutResult.EXISTS, current
                if raw is None and mode is PutMode.UPDATE:
                    return PutResult.MISSING, None
                if expected_version and expected_version != current_version:
                    return PutResult.CONFLICT, current
                stored = msgspec.structs.replace(spec, version=max(current_version, 0) + 1)
                read = 0 if current_version < 0 else current_version
                if await self._put(
                    keys=[self.schedules_key], args=[spec.name, read, encode_record(stored)]
                ):
                    return PutResult.WRITTEN, stored
        return PutResult.CONFLICT, current

    async def get(self, name: str) -> ScheduleSpec | None:
        """The schedule, or None."""
        async with _available("get"):
            raw = await self._redis.hget(self.schedules_key, name)
        return None if raw is None else self._decode_spec(name, raw)

    async def all(self) -> list[ScheduleSpec]:
        """Every schedule that decodes, by name."""
        async with _available("all"):
            found = await self._redis.hgetall(self.schedules_key)
        specs = []
        for raw_name, raw in sorted(found.items()):
            spec = self._decode_spec(_text(raw_name), raw)
            if spec is not None:
                specs.append(spec)
        return specs

    async def delete(self, name: str) -> bool:
        """Drop the schedule, its cursor and its lease (the ledger expires by itself)."""
        async with _available("delete"):
            removed = await self._redis.hdel(self.schedules_key, name)
            await self._redis.delete(self.key(name, "lease"), self.key(name, "cursor"))
        return bool(removed)

    # --- leases and replicas ----------------------------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Take the lease when free, renew it when `owner`'s."""
        async with _available("acquire"):
            return bool(
                await self._acquire(keys=[self.key(name, "lease")], args=[owner, _ms(ttl_seconds)])
            )

    async def renew(self, names: Sequence[str], owner: str, ttl_seconds: float) -> list[bool]:
        """Extend each of `owner`'s leases (one round trip); whether each was still `owner`'s."""
        if not names:
            return []
        async with _available("renew"):
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                await self._renew(
                    keys=[self.key(name, "lease")], args=[owner, _ms(ttl_seconds)], client=pipe
                )
            return [bool(r) for r in await pipe.execute()]

    async def release(self, name: str, owner: str) -> None:
        """Give the lease up if `owner` holds it."""
        async with _available("release"):
            await self._release(keys=[self.key(name, "lease")], args=[owner])

    async def owners(self, names: Sequence[str]) -> list[str | None]:
        """Each lease's holder (one round trip; a GET per key keeps to one slot each)."""
        if not names:
            return []
        async with _available("owners"):
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.get(self.key(name, "lease"))
            found = await pipe.execute()
        return [None if v is None else _text(v) for v in found]

    async def heartbeat(self, replica: str, *, now: float, ttl_seconds: float) -> None:
        """`replica` is up until `now + ttl_seconds`."""
        async with _available("heartbeat"):
            await self._redis.zadd(self.replicas_key, {replica: now + ttl_seconds})

    async def replicas(self, *, now: float) -> list[str]:
        """The replicas up at `now`, sorted (the others are dropped)."""
        async with _available("replicas"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.zremrangebyscore(self.replicas_key, "-inf", _score(now))
            pipe.zrange(self.replicas_key, 0, -1)
            _, found = await pipe.execute()
        return sorted(_text(r) for r in found)

    async def leave(self, replica: str) -> None:
        """`replica` is going away."""
        async with _available("leave"):
            await self._redis.zrem(self.replicas_key, replica)

    # --- cursor and ledger ------------------------------------------------------------------------

    async def cursor(self, name: str) -> ScheduleCursor:
        """The schedule's cursor (empty when none; a pending tick that does not read is none)."""
        async with _available("cursor"):
            fields = await self._redis.hgetall(self.key(name, "cursor"))
        tick: float | None = None
        with contextlib.suppress(KeyError, ValueError):
            tick = float(fields[b"tick"])
        pending: PendingTick | None = None
        if b"pending" in fields:
            with contextlib.suppress(msgspec.DecodeError):
                pending = decode_pending(fields[b"pending"])
        last_job = _text(fields.get(b"last_job", b""))
        return ScheduleCursor(tick=tick, last_job_id=last_job, pending=pending)

    async def set_pending(self, name: str, owner: str, pending: PendingTick) -> bool:
        """Note the tick being submitted (lease and cursor permitting)."""
        async with _available("set_pending"):
            return bool(
                await self._pending(
                    keys=[self.key(name, "lease"), self.key(name, "cursor")],
                    args=[owner, _score(pending.tick), encode_record(pending)],
                )
            )

    def _trim_args(self, now: float) -> list[Any]:
        retention = max(1, math.ceil(self._retention))
        return [self._ledger_size, _score(now - self._retention), retention]

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
        args: list[Any] = [
            owner,
            "" if expected is None else _score(expected),
            last_job_id,
            *self._trim_args(now),
            _ms(ttl_seconds) if ttl_seconds else 0,
            _score(decisions[-1].tick) if decisions else "",
            len(decisions),
        ]
        for decision in decisions:
            args += [_score(decision.tick), encode_record(decision)]
        async with _available("decide"):
            result = await self._decide(
                keys=[self.key(name, k) for k in ("lease", "cursor", "ledger")], args=args
            )
        return {1: DecideResult.DONE, 0: DecideResult.LEASE_LOST}.get(
            int(result), DecideResult.CONFLICT
        )

    async def set_last_job(self, name: str, job_id: str) -> None:
        """The schedule's last run is `job_id`."""
        async with _available("set_last_job"):
            await self._redis.hset(self.key(name, "cursor"), "last_job", job_id)

    async def add_decision(
        self, decision: TickDecision, *, unless_ran: bool, now: float
    ) -> TickDecision | None:
        """Add a record outside the cursor (see `ScheduleStore.add_decision`)."""
        async with _available("add_decision"):
            found = await self._add(
                keys=[self.key(decision.schedule, "ledger")],
                args=[
                    _score(decision.tick),
                    encode_record(decision),
                    int(unless_ran),
                    *self._trim_args(now),
                ],
            )
        if found is None:
            return None
        return self._decode_decision(decision.schedule, found)

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
        key = self.key(name, "ledger")
        async with _available("decisions"):
            if newest_first:
                found = await self._redis.zrevrangebyscore(
                    key, _score(end), _score(start), start=0, num=limit
                )
            else:
                found = await self._redis.zrangebyscore(
                    key, _score(start), _score(end), start=0, num=limit
                )
        return [d for raw in found if (d := self._decode_decision(name, raw)) is not None]
