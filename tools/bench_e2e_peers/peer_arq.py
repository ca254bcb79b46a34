"""arq, default worker settings (max_jobs 10) but for its queue poll: arq polls its queue
(a sorted set) every `poll_delay`, 0.5 s by default; it runs at the benchmark's poll interval.

Worker: `arq peer_arq.WorkerSettings`. Execute is `enqueue_job` then `job.result()`, which polls
for the result every `poll_delay` (the benchmark's poll interval).
Done: a job leaves the queue's sorted set when it has finished.
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings, create_pool
from bench_stamps import stamp

RESULT_TIMEOUT = 60.0
POLL = float(os.environ.get("BENCH_E2E_POLL", "0.01"))


async def bench_noop(ctx: Any, tag: str) -> None:
    """The benchmark's no-op: records its start."""
    stamp(tag)


class WorkerSettings:
    """What `arq peer_arq.WorkerSettings` runs."""

    functions = (bench_noop,)
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_E2E_REDIS"])
    poll_delay = POLL


class Adapter:
    """`enqueue_job` and `job.result()`."""

    blocking = False

    def __init__(self, redis_url: str, target: str, stubs: str, poll: float) -> None:
        self._poll = poll
        self._redis: Any = None

    async def start(self) -> None:
        self._redis = await create_pool(WorkerSettings.redis_settings)

    async def enqueue(self, tag: str) -> None:
        await self._redis.enqueue_job("bench_noop", tag)

    async def execute(self, tag: str) -> None:
        job = await self._redis.enqueue_job("bench_noop", tag)
        await job.result(timeout=RESULT_TIMEOUT, poll_delay=self._poll)

    async def unfinished(self) -> tuple[int, str]:
        return int(await self._redis.zcard("arq:queue")), "zcard"

    async def close(self) -> None:
        await self._redis.aclose()
