"""Everything the fleet wrote about itself to Redis, for `jobworker status`: read, not judged.

The workers' PodInfo is found as the orchestrators' worker directory finds it (SCAN over
`<redis.key_prefix>:`, see `RedisPodRegistry.keys`), the orchestrators and trigger replicas
through their role's index (`RedisRoleRegistry`). Each record comes with the seconds Redis
says it has left. Decoding and the stale marks are `app.fleet.fleet_view`'s.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from app.errors import StoreUnavailable
from app.fleet.role_info import Registration, Role
from app.stores.redis.client import is_unavailable
from app.stores.redis.pod_registry import RedisPodRegistry
from app.stores.redis.role_registry import RedisRoleRegistry


async def read_fleet(
    client: aioredis.Redis, *, pod_prefix: str, roles_prefix: str
) -> dict[Role, list[Registration]]:
    """Each role's live records; `StoreUnavailable` when Redis cannot be asked."""
    try:
        pods = RedisPodRegistry(client)
        keys = await pods.keys(f"{pod_prefix}:")
        workers: list[Registration] = []
        if keys:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                name = key.encode("utf-8", "surrogateescape")
                pipe.get(name)
                pipe.pttl(name)
            replies = await pipe.execute()
            for i, key in enumerate(keys):
                value, pttl = replies[2 * i], replies[2 * i + 1]
                if value is None:
                    continue
                workers.append(Registration(
                    key=key, member=key.removeprefix(f"{pod_prefix}:"),
                    value=value.encode() if isinstance(value, str) else value,
                    ttl_left_seconds=pttl / 1000 if pttl is not None and pttl >= 0 else None,
                ))  # fmt: skip
        roles = RedisRoleRegistry(client, prefix=roles_prefix)
        found = {Role.WORKER: workers}
        for role in (Role.ORCHESTRATOR, Role.TRIGGER):
            found[role] = await roles.members(role.value)
        return found
    except StoreUnavailable:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        raise
