"""Where workers publish their PodInfo: a small protocol, with Redis and in-memory stores."""

from __future__ import annotations

import math
from typing import Protocol

import anyio
import redis.asyncio as aioredis


class PodRegistry(Protocol):
    """A key-value store with expiry: the I/O edge behind ApplicationInfoReportJob."""

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of `keys`, in order (None for a key that is gone)."""
        ...

    async def keys(self, prefix: str) -> list[str]:
        """Every live key that starts with `prefix` (unordered)."""
        ...


class RedisPodRegistry:
    """`SET key value EX ttl` on Redis/Valkey; SCAN (never KEYS) to list."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    def __repr__(self) -> str:
        return f"<RedisPodRegistry {self._redis!r}>"

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        await self._redis.set(key, value, ex=ttl_seconds)

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(key)
        return value.encode() if isinstance(value, str) else value

    async def delete(self, key: str) -> None:
        await self._redis.delete(key)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        values = await self._redis.mget(keys)
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def keys(self, prefix: str) -> list[str]:
        found = [
            k.decode() if isinstance(k, bytes) else str(k)
            async for k in self._redis.scan_iter(match=_glob_escape(prefix) + "*", count=500)
        ]
        return sorted(set(found))


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


class MemoryPodRegistry:
    """The same contract in one process's memory, on the loop clock (for core tests on trio)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float]] = {}

    def __repr__(self) -> str:
        return f"<MemoryPodRegistry keys={len(self._data)}>"

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= anyio.current_time():
            del self._data[key]
            return None
        return item[0]

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        expires = anyio.current_time() + ttl_seconds if ttl_seconds else math.inf
        self._data[key] = (bytes(value), expires)

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self._live(k) for k in keys]

    async def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in list(self._data) if k.startswith(prefix) and self._live(k))
