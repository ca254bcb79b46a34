"""The Redis connection pool under load, on a real redis-server: a full pool waits (bounded)
instead of raising, and a wait that times out is "busy", never "Redis unreachable".

(tests/chaos/test_defaults_under_load.py shows the same through a real orchestrator process.)
"""

from __future__ import annotations

import logging

import anyio
import pytest
import redis
import redis.asyncio as aioredis

from app.config import RedisConfig
from app.errors import StoreBusy, StoreUnavailable
from app.fleet.batch_job import BatchJob
from app.stores.redis.client import LIVENESS_CONNECTIONS, create_redis, is_busy, is_unavailable
from app.stores.redis.job_store import RedisJobStore
from app.stores.redis.monitor import RedisMonitor
from app.stores.redis.pool import (
    PoolExhausted,
    WaitingConnectionPool,
    WaitingSentinelPool,
    pool_statistics,
)
from tests.helpers import RedisServer, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client


def connected_clients(redis_client: redis.Redis) -> int:
    return int(redis_client.info("clients")["connected_clients"])


async def hold_connections(client: aioredis.Redis, count: int, seconds: float) -> None:
    """Keep `count` of the client's connections busy for `seconds` (BLPOP on an empty list)."""

    async def hold(i: int) -> None:
        await client.blpop([f"nothing-{i}"], seconds)

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(hold, i)


async def test_a_full_pool_waits_for_a_connection_instead_of_raising(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    config = RedisConfig(url=redis_server.url, max_connections=2)
    client = create_redis(config)
    before = connected_clients(redis_client)
    peak = 0
    try:
        store = RedisJobStore(client)

        async def submit(i: int) -> None:
            nonlocal peak
            job = BatchJob(job_id=f"pool-{i}", job_type="echo", submitted_at=0.0)
            await store.submit(job, bound=10_000)
            peak = max(peak, connected_clients(redis_client) - before)

        # a blocking read holds one of the two for a while, as the dispatcher's XREADGROUP does
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_connections, client, 1, 0.3)
            for i in range(300):
                tg.start_soon(submit, i)
        assert await store.queued_count("echo") == 300
        stats = pool_statistics(client)
        assert stats is not None
        assert stats.max_connections == 2
        assert stats.open <= 2
        assert stats.in_use == 0
        assert stats.waits > 0  # calls did wait for a connection
        assert stats.exhausted == 0
    finally:
        await client.aclose()
    assert 1 <= peak <= 2  # (the sync client's own connection not counted)


async def test_a_pool_wait_that_times_out_is_busy_not_an_outage(
    redis_server: RedisServer,
) -> None:
    config = RedisConfig(url=redis_server.url, max_connections=2, pool_timeout_seconds=0.05)
    client = create_redis(config)
    try:
        store = RedisJobStore(client)
        errors: list[BaseException] = []

        async def meanwhile() -> None:
            await anyio.sleep(0.1)  # both connections taken by then
            with anyio.fail_after(2):  # the wait is bounded by the pool's timeout
                try:
                    await client.get("x")
                except PoolExhausted as exc:
                    errors.append(exc)
                try:
                    await store.get("some-job")
                except StoreBusy as exc:
                    errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_connections, client, 2, 1.0)
            tg.start_soon(meanwhile)
        raw, translated = errors
        assert isinstance(raw, PoolExhausted)
        assert is_busy(raw)
        assert not is_unavailable(raw)  # not an outage: health stays, nobody is blamed
        assert not isinstance(raw, redis.ConnectionError)
        assert isinstance(translated, StoreBusy)
        assert not isinstance(translated, StoreUnavailable)
        assert str(translated) == (
            "all 2 Redis connections of this process stayed in use for 0.05s"
        )
        assert await client.get("x") is None  # the connections came back: calls work again
        stats = pool_statistics(client)
        assert stats is not None
        assert stats.exhausted == 2
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_still_an_outage() -> None:
    client = create_redis(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0",
                                      connect_timeout_seconds=0.5))  # fmt: skip
    try:
        with pytest.raises(StoreUnavailable, match=r"^Redis unreachable \(ConnectionError: "):
            await RedisJobStore(client).get("some-job")
        with pytest.raises(redis.ConnectionError) as caught:
            await client.get("x")
        assert is_unavailable(caught.value)
        assert not is_busy(caught.value)
    finally:
        await client.aclose()


async def test_the_health_check_has_connections_of_its_own(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = RedisConfig(url=redis_server.url, max_connections=2, pool_timeout_seconds=0.05)
    main = create_redis(config)
    liveness = create_redis(config, liveness=True)
    changes: list[bool] = []
    monitor = RedisMonitor(liveness, on_change=changes.append, interval=0.05)
    try:

        async def check_while_busy() -> None:
            await anyio.sleep(0.1)
            for _ in range(5):
                assert await monitor.check()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_connections, main, 2, 0.6)
            tg.start_soon(check_while_busy)
        assert changes == []
        assert monitor.up
    finally:
        await main.aclose()
        await liveness.aclose()
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]


async def test_every_client_gets_a_waiting_pool_sized_from_config() -> None:
    config = RedisConfig(url="redis://127.0.0.1:1/0", max_connections=7, pool_timeout_seconds=3)
    client = create_redis(config)
    side = create_redis(config, liveness=True)
    sentinel = create_redis(RedisConfig(sentinels=["127.0.0.1:1"], master_name="m",
                                        max_connections=9))  # fmt: skip
    try:
        pool = client.connection_pool
        assert isinstance(pool, WaitingConnectionPool)
        assert (pool.max_connections, pool.timeout) == (7, 3)
        assert side.connection_pool.max_connections == LIVENESS_CONNECTIONS
        assert isinstance(sentinel.connection_pool, WaitingSentinelPool)
        assert sentinel.connection_pool.max_connections == 9
    finally:
        for c in (client, side, sentinel):
            await c.aclose()


def test_the_default_pool_holds_the_dispatcher_and_as_many_clients() -> None:
    from app.config import OrchestratorConfig

    # every job in hand may wait on one Redis call at once, and client calls come on top
    assert RedisConfig().max_connections >= 2 * OrchestratorConfig().max_inflight
