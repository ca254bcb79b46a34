"""The pod registry on Redis/Valkey: `SET key value EX ttl`, SCAN (never KEYS) to list."""

from __future__ import annotations

import redis.asyncio as aioredis


class RedisPodRegistry:
    """`SET key value EX ttl` on Redis/Valkey; SCAN (never KEYS) to list."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    def __repr__(self) -> str:
        return f"<RedisPodRegistry {self._redis!r}>"

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        """`SET key value EX ttl_seconds`: a new value and expiry (Redis refuses a ttl of 0)."""
        await self._redis.set(key, value, ex=ttl_seconds)

    async def get(self, key: str) -> bytes | None:
        """The value as bytes, or None when the key is gone."""
        value = await self._redis.get(_name(key))
        return value.encode() if isinstance(value, str) else value

    async def delete(self, key: str) -> None:
        """`DEL key` (fine when it is not there)."""
        await self._redis.delete(key)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of `keys` in order, by one MGET (None for a key that is gone)."""
        if not keys:
            return []
        values = await self._redis.mget([_name(k) for k in keys])
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def keys(self, prefix: str) -> list[str]:
        """Every live key that starts with `prefix` (literally, not a glob), by SCAN; sorted."""
        found = [
            # a name that is not UTF-8 keeps its bytes (surrogateescape): it is read like the
            # others, instead of failing the whole listing
            k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k)
            async for k in self._redis.scan_iter(match=_glob_escape(prefix) + "*", count=500)
        ]
        return sorted(set(found))


def _name(key: str) -> bytes:
    """A key as `keys()` gave it, back to its bytes."""
    return key.encode("utf-8", "surrogateescape")


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
