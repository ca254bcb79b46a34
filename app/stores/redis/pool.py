"""Connection pools that wait for a free connection, bounded, instead of failing at once.

redis-py 8's asyncio `ConnectionPool` holds at most 100 connections and raises
`MaxConnectionsError` (a `ConnectionError`) for the 101st caller: under load alone that read as
"Redis unreachable" (health NOT_SERVING, calls waiting out an outage that was not there). Ours
are `BlockingConnectionPool`s sized by `redis.max_connections`: a caller past the size waits for
a connection to come back, up to `redis.pool_timeout_seconds`, and only then fails, with
`PoolExhausted`: not a `ConnectionError`, so that nothing takes it for an outage. Callers map it
to "busy" (RESOURCE_EXHAUSTED with a retry-after, or a quiet retry), never to "unreachable".

A connection that is free while nobody waits is handed out directly (redis-py's lists of
connections, as its own `get_available_connection` uses them): that path is most of the calls,
and redis-py's costs a Condition, a timeout and a lock each time.

This leans on redis-py's `BlockingConnectionPool.get_connection` raising
`ConnectionError("No connection available.")` from the timeout of its wait (the same from 5.2
to 8.x; pyproject bounds the version and a test holds each release to it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

# what redis-py says when its wait for a free connection timed out (and only then)
_NO_CONNECTION = "No connection available."


class PoolExhausted(RedisError):
    """Every connection of the pool stayed in use for the whole wait: the process is busy, Redis
    is not known to be away. Deliberately not a `ConnectionError`."""


def _exhausted(pool: BlockingConnectionPool, exc: RedisConnectionError) -> PoolExhausted | None:
    """The `PoolExhausted` that `exc` stands for, or None when it is a real connection error
    (a connect that failed after a connection was free)."""
    if str(exc) != _NO_CONNECTION or not isinstance(exc.__cause__, asyncio.TimeoutError):
        return None
    return PoolExhausted(
        f"all {pool.max_connections} Redis connections of this process stayed in use for"
        f" {pool.timeout:g}s"
    )


class PoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A pool's connections (at most, in use, open) and its waits (all, and timed out)."""

    max_connections: int
    in_use: int
    open: int
    waits: int
    exhausted: int


class WaitingConnectionPool(BlockingConnectionPool):
    """A `BlockingConnectionPool` whose timed-out wait raises `PoolExhausted`."""

    waits = 0  # calls that found every connection in use (and waited)
    exhausted = 0  # of those, the ones whose wait timed out

    def statistics(self) -> PoolStatistics:
        """A snapshot (redis-py's own lists of connections, read as they are)."""
        in_use = len(self._in_use_connections)
        return PoolStatistics(
            max_connections=self.max_connections,
            in_use=in_use,
            open=in_use + len(self._available_connections),
            waits=self.waits,
            exhausted=self.exhausted,
        )

    _slow = 0  # callers in redis-py's own get_connection (waiting, or opening a connection)

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        """A connection, waiting up to `timeout` seconds for one to be free."""
        if self._available_connections and not self._slow:
            # the common case (one is free, nobody waits for one) without redis-py's Condition,
            # timeout, lock and wait-time metric: a quarter of a command's cost in the client
            connection: AbstractConnection = self._available_connections.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        if not self.can_get_connection():
            self.waits += 1
        self._slow += 1
        try:
            connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            return connection
        except RedisConnectionError as exc:
            if (exhausted := _exhausted(self, exc)) is not None:
                self.exhausted += 1
                raise exhausted from exc
            raise
        finally:
            self._slow -= 1


class WaitingSentinelPool(SentinelConnectionPool, WaitingConnectionPool):
    """The same for the master a Sentinel names (its connections find the master again)."""

    # SentinelConnectionPool adds no get_connection of its own: WaitingConnectionPool's runs,
    # and its __init__ hands `max_connections` and `timeout` on to BlockingConnectionPool's


def pool_statistics(client: aioredis.Redis) -> PoolStatistics | None:
    """The statistics of `client`'s pool, when it is one of ours."""
    pool = client.connection_pool
    return pool.statistics() if isinstance(pool, WaitingConnectionPool) else None
