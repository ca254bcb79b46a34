"""In-memory twins of the stores, on the loop clock: for the core's tests on asyncio and trio.

They keep the contract of `app.stores.abc` exactly (the contract suite runs them beside the
Redis implementations) in one process's memory.
"""

from __future__ import annotations

import math

import anyio


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
