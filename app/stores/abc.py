"""The stores' interfaces: what the roles need from shared state, apart from how it is kept.

Each has a Redis implementation in `app.stores.redis` and an in-memory twin in
`app.stores.memory`; one contract suite (tests/test_stores_contract.py) runs both.
"""

from __future__ import annotations

from typing import Protocol


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
