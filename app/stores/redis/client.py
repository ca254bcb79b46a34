"""Build the redis-py asyncio client from config: redis://, rediss:// (TLS), unix://, ACL users."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.config import RedisConfig
from app.core.clock import SystemClock
from app.core.outage import Outage
from app.stores.redis.pool import PoolExhausted, WaitingConnectionPool, WaitingSentinelPool

log = logging.getLogger(__name__)

#: What "Redis is unreachable" looks like to callers (redis-py raises these, or OSError).
#: ConnectionError covers LOADING (restarting with its AOF) and Sentinel's "no master found";
#: a pool that stayed full is not among them (`PoolExhausted`: busy, see `is_busy`).
REDIS_DOWN_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError, RedisTimeoutError, OSError, ReadOnlyError,
)  # fmt: skip
# replies that mean "not now" rather than "wrong": a replica not yet in sync, a fail-over
_NOT_NOW = ("MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "READONLY")


#: Connections of a client for what must not wait behind the load (`liveness` below): the
#: health check, the pub/sub subscription (it holds one for good), the workers' PodInfo and the
#: roles' RoleInfo (written and read): four at most at once in any role, and room to spare.
LIVENESS_CONNECTIONS = 6


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` means this process's connections to Redis all stayed in use for the whole
    pool wait: a load condition, not an outage (nothing says Redis is away)."""
    return isinstance(exc, PoolExhausted)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means Redis cannot serve right now (down, loading, failing over), so that
    the same call may work later; as opposed to a wrong call, bad data or a busy process."""
    if isinstance(exc, PoolExhausted):
        return False
    if isinstance(exc, REDIS_DOWN_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_NOT_NOW)


def is_nogroup(exc: BaseException) -> bool:
    """Whether `exc` is Redis's NOGROUP: the stream or its consumer group is not there."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


class SentinelRedis(aioredis.Redis):
    """The master's client from Redis Sentinel; closing it closes the sentinels' clients too."""

    # not `sentinel`: Redis has a SENTINEL command method of that name
    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the master's pool, then the connections to the sentinels."""
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                await self.sentinel_manager.aclose()


def create_redis(
    config: RedisConfig, url: str | None = None, *, liveness: bool = False
) -> aioredis.Redis:
    """A client for `url`, else the config's endpoint: its URL or host, or the master its
    sentinels name (found again after a fail-over). Every call has a socket timeout.

    Its pool holds `redis.max_connections`; a call past them waits for one up to
    `redis.pool_timeout_seconds`, then raises `PoolExhausted` (see `app.stores.redis.pool`).
    `liveness`: a small pool of its own (`LIVENESS_CONNECTIONS`) for what tells whether Redis
    and the workers are there, so that a process busy with its load never reads as an outage.
    `redis.username`/`redis.password` apply when the URL carries none.
    """
    pool: dict[str, object] = {
        "max_connections": LIVENESS_CONNECTIONS if liveness else config.max_connections,
        "timeout": config.pool_timeout_seconds,
    }
    kwargs: dict[str, object] = {
        "socket_timeout": config.connect_timeout_seconds,
        "socket_connect_timeout": config.connect_timeout_seconds,
        # a couple of quick retries for a blip; longer outages are the caller's backoff
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        "health_check_interval": 30,
    }
    if config.username:
        kwargs["username"] = config.username
    if config.password:
        kwargs["password"] = config.password
    if url is None and config.sentinels:
        timeouts = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
        tls = {"ssl": True} if config.tls else {}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            config.sentinel_addresses(), sentinel_kwargs={**timeouts, **tls}, **kwargs, **tls
        )
        master: SentinelRedis = sentinel.master_for(
            config.master_name, redis_class=SentinelRedis,
            connection_pool_class=WaitingSentinelPool, db=config.db, **pool,
        )  # fmt: skip
        master.sentinel_manager = sentinel
        return master
    connections = WaitingConnectionPool.from_url(url or config.effective_url(), **kwargs, **pool)
    return aioredis.Redis.from_pool(connections)


async def wait_for_redis(client: aioredis.Redis, *, what: str = "Redis", cap: float = 5.0) -> None:
    """Return once `client` answers PING; log the wait once, retry with backoff up to `cap` s."""
    outage = Outage(what, log=log, clock=SystemClock(), max_delay=cap, meanwhile="waiting for it")
    while True:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await anyio.sleep(outage.failed(exc))
            continue
        outage.succeeded()
        return


async def wait_for_redis_unless_stopped(
    client: aioredis.Redis,
    signals: AsyncIterator[signal.Signals],
    stop: anyio.CancelScope,
    *,
    what: str,
    then: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """A role's start: wait until `client` answers (and run `then`, e.g. a sync that needs it),
    unless a signal comes first, which cancels `stop` (the role's scope): a process started
    before its Redis must still stop on SIGTERM."""
    async with anyio.create_task_group() as waiting:

        async def stop_on_signal() -> None:
            signum = await anext(signals)
            log.info("%s while waiting for Redis: stopping", signum.name)
            stop.cancel()

        waiting.start_soon(stop_on_signal)
        await wait_for_redis(client, what=what)
        if then is not None:
            await then()
        waiting.cancel_scope.cancel()
