"""The role registry on Redis/Valkey: a record per member with a TTL, and a small index per role.

| key | value |
|---|---|
| `<prefix>:<role>:<member>` | the member's record (`RoleInfo` JSON), `SET ... PX ttl` |
| `<prefix>:<role>` | ZSET: member → until when its record lives (wall time, epoch seconds) |

Listing a role reads its index and then its members' records (one round trip each), never a
SCAN of the keyspace; the index stays small (a `put` drops entries expired a TTL ago; the margin
spares a live member whose writer's clock runs behind). A record read has its PTTL along, which
is Redis's own account of how long it has left, whatever the clocks say.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from app.config import Config
from app.core.clock import Clock
from app.errors import StoreBusy, StoreUnavailable
from app.fleet.role_info import Registration, RoleInfo
from app.stores.redis.client import is_busy, is_unavailable
from app.stores.role_reporter import RoleReporter


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class RedisRoleRegistry:
    """`RoleRegistry` on one Redis (or Valkey) server."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "wpm-roles") -> None:
        self._redis = client
        self._prefix = prefix

    def __repr__(self) -> str:
        return f"<RedisRoleRegistry {self._prefix}>"

    def key(self, role: str, member: str) -> str:
        """A member's record."""
        return f"{self._prefix}:{role}:{member}"

    def index_key(self, role: str) -> str:
        """A role's index."""
        return f"{self._prefix}:{role}"

    async def put(
        self, role: str, member: str, value: bytes, *, ttl_seconds: float, now: float
    ) -> None:
        """SET the record with its TTL and ZADD it to the index, in one round trip."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self.key(role, member), value, px=max(1, round(ttl_seconds * 1000)))
            pipe.zadd(self.index_key(role), {member: now + ttl_seconds})
            pipe.zremrangebyscore(self.index_key(role), "-inf", f"({now - ttl_seconds!r}")
            await pipe.execute()
        except Exception as exc:
            _raise_unavailable(exc, "a role's registration")
            raise

    async def remove(self, role: str, member: str) -> None:
        """DEL the record and ZREM it from the index."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(self.key(role, member))
            pipe.zrem(self.index_key(role), member)
            await pipe.execute()
        except Exception as exc:
            _raise_unavailable(exc, "a role's removal")
            raise

    async def members(self, role: str) -> list[Registration]:
        """ZRANGE the index, then GET and PTTL each member's record."""
        try:
            listed = await self._redis.zrange(self.index_key(role), 0, -1)
            names = sorted(_text(m) for m in listed if isinstance(m, bytes | str))
            if not names:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.get(self.key(role, name))
                pipe.pttl(self.key(role, name))
            replies = await pipe.execute()
        except Exception as exc:
            _raise_unavailable(exc, "a role's listing")
            raise
        found = []
        for i, name in enumerate(names):
            value, pttl = replies[2 * i], replies[2 * i + 1]
            if value is None:
                continue  # expired, or removed between the two reads
            found.append(
                Registration(
                    key=self.key(role, name),
                    member=name,
                    value=value.encode() if isinstance(value, str) else value,
                    ttl_left_seconds=pttl / 1000 if pttl is not None and pttl >= 0 else None,
                )
            )
        return found


def _raise_unavailable(exc: Exception, what: str) -> None:
    """Redis that cannot serve now is StoreUnavailable, a pool that stayed full StoreBusy (the
    caller re-raises anything else)."""
    if is_busy(exc):
        raise StoreBusy(f"{what}: {exc}") from exc
    if is_unavailable(exc):
        raise StoreUnavailable(f"Redis unavailable during {what}: {exc}") from exc


def redis_role_reporter(
    liveness: aioredis.Redis, config: Config, snapshot: Callable[[], RoleInfo], clock: Clock
) -> RoleReporter:
    """An orchestrator's or trigger's `RoleReporter` as configured (`redis.roles_key_prefix`,
    `redis.ttl_seconds`, `schedule.report_interval_seconds`), writing through `liveness`: the
    connections of its own, so that `jobworker status` never sees it gone for load."""
    return RoleReporter(
        RedisRoleRegistry(liveness, prefix=config.redis.roles_key_prefix),
        snapshot,
        ttl_seconds=config.redis.ttl_seconds,
        interval_seconds=config.schedule.report_interval_seconds,
        clock=clock,
    )
