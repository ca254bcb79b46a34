"""taskiq with taskiq-redis: its RedisStreamBroker (a stream and a consumer group, with acks)
and RedisAsyncResultBackend, as taskiq-redis recommends; uvloop installed (taskiq[uv]).

Worker: `taskiq worker peer_taskiq:broker --workers 1`. Execute is `kiq` then
`task.wait_result()`, which polls the result backend every `check_interval` (0.2 s by default;
the benchmark's poll interval here).
Done: a message stays pending in the consumer group until the worker acks it (after its result
is saved).
"""

from __future__ import annotations

import os
from typing import Any

from bench_stamps import stamp
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

RESULT_TIMEOUT = 60.0
_URL = os.environ["BENCH_E2E_REDIS"]

broker = RedisStreamBroker(url=_URL).with_result_backend(RedisAsyncResultBackend(redis_url=_URL))


@broker.task  # type: ignore[untyped-decorator]
async def bench_noop(tag: str) -> None:
    """The benchmark's no-op: records its start."""
    stamp(tag)


class Adapter:
    """`task.kiq` and `wait_result`."""

    blocking = False

    def __init__(self, redis_url: str, target: str, stubs: str, poll: float) -> None:
        self._poll = poll
        self._redis: Any = None

    async def start(self) -> None:
        from redis.asyncio import Redis

        await broker.startup()
        self._redis = Redis.from_url(_URL)

    async def enqueue(self, tag: str) -> None:
        await bench_noop.kiq(tag)

    async def execute(self, tag: str) -> None:
        task = await bench_noop.kiq(tag)
        result = await task.wait_result(check_interval=self._poll, timeout=RESULT_TIMEOUT)
        if result.is_err:
            raise RuntimeError(f"task {tag} failed: {result.error!r}")

    async def unfinished(self) -> tuple[int, str]:
        summary = await self._redis.xpending(broker.queue_name, broker.consumer_group_name)
        return int(summary["pending"]), "xpending"

    async def close(self) -> None:
        await self._redis.aclose()
        await broker.shutdown()
