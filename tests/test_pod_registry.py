"""One contract for the PodInfo stores: in memory (on both backends) and on a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from app.stores.abc import PodRegistry
from app.stores.memory import MemoryPodRegistry
from app.stores.redis.pod_registry import RedisPodRegistry
from tests.helpers import RedisServer, eventually

pytestmark = pytest.mark.anyio


# the memory store on both backends; Redis on asyncio, where redis-py's client runs
@pytest.fixture(params=[("asyncio", "memory"), ("trio", "memory"), ("asyncio", "redis")],
                ids=lambda p: "-".join(p))  # fmt: skip
def store_and_backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(store_and_backend: tuple[str, str]) -> str:
    return store_and_backend[0]


@pytest.fixture
async def registry(
    store_and_backend: tuple[str, str], redis_server: RedisServer
) -> AsyncIterator[PodRegistry]:
    if store_and_backend[1] == "memory":
        yield MemoryPodRegistry()
        return
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    try:
        yield RedisPodRegistry(client)
    finally:
        await client.aclose()


async def test_put_get_delete(registry: PodRegistry) -> None:
    assert await registry.get("wpm-apps:1.2.3.4:1") is None
    await registry.put("wpm-apps:1.2.3.4:1", b'{"a":1}', 60)
    assert await registry.get("wpm-apps:1.2.3.4:1") == b'{"a":1}'
    await registry.delete("wpm-apps:1.2.3.4:1")
    assert await registry.get("wpm-apps:1.2.3.4:1") is None
    await registry.delete("wpm-apps:1.2.3.4:1")  # deleting twice is fine


async def test_get_many(registry: PodRegistry) -> None:
    await registry.put("wpm-apps:a:1", b"1", 60)
    await registry.put("wpm-apps:b:2", b"2", 60)
    assert await registry.get_many(["wpm-apps:b:2", "nope", "wpm-apps:a:1"]) == [b"2", None, b"1"]
    assert await registry.get_many([]) == []


async def test_keys_by_prefix(registry: PodRegistry) -> None:
    for key in ("wpm-apps:a:1", "wpm-apps:b:2", "other:c:3", "wpm-apps*x"):
        await registry.put(key, b"{}", 60)
    assert await registry.keys("wpm-apps:") == ["wpm-apps:a:1", "wpm-apps:b:2"]


async def test_entries_expire(registry: PodRegistry) -> None:
    await registry.put("wpm-apps:x:1", b"{}", 1)

    async def gone() -> bool:
        return await registry.get("wpm-apps:x:1") is None

    await eventually(gone)
    assert await registry.keys("wpm-apps:") == []
