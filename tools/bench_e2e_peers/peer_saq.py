"""saq on its Redis queue (`Queue.from_url`), default worker settings (concurrency 10).

Worker: `saq peer_saq.settings`. Execute is `queue.apply`, saq's enqueue-and-wait, which polls
the job's status every `poll_interval` (0.5 s by default; the benchmark's poll interval here).
Done: a job stays in the queue's `incomplete` sorted set until it has finished.
"""

from __future__ import annotations

import os
from typing import Any

from bench_stamps import stamp
from saq import Queue

RESULT_TIMEOUT = 60.0

queue = Queue.from_url(os.environ["BENCH_E2E_REDIS"])


async def bench_noop(ctx: Any, *, tag: str) -> None:
    """The benchmark's no-op: records its start."""
    stamp(tag)


settings = {"queue": queue, "functions": [bench_noop]}


class Adapter:
    """`queue.enqueue` and `queue.apply`."""

    blocking = False

    def __init__(self, redis_url: str, target: str, stubs: str, poll: float) -> None:
        self._poll = poll

    async def start(self) -> None:
        await queue.connect()

    async def enqueue(self, tag: str) -> None:
        await queue.enqueue("bench_noop", tag=tag)

    async def execute(self, tag: str) -> None:
        await queue.apply("bench_noop", timeout=RESULT_TIMEOUT, poll_interval=self._poll, tag=tag)

    async def unfinished(self) -> tuple[int, str]:
        return int(await queue.count("incomplete")), "zcard"

    async def close(self) -> None:
        await queue.disconnect()
