"""dramatiq 2 on its RedisBroker, with the Results middleware on RedisBackend for the actor
whose results are waited for (`store_results=True` only there, as dramatiq's docs advise).

Worker: `dramatiq peer_dramatiq --processes 1 --threads 8` (8 threads is its default).
dramatiq's client is synchronous: the driver calls it from a thread pool when calls overlap.
Done: an un-acked message stays in the `<namespace>:<queue>.msgs` hash until its ack.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from bench_stamps import stamp
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

RESULT_TIMEOUT_MS = 60_000
_URL = os.environ["BENCH_E2E_REDIS"]

broker = RedisBroker(url=_URL)
broker.add_middleware(Results(backend=RedisBackend(url=_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor  # type: ignore[untyped-decorator]
def bench_noop(tag: str) -> None:
    """The benchmark's no-op: records its start."""
    stamp(tag)


@dramatiq.actor(store_results=True)  # type: ignore[untyped-decorator]
def bench_noop_result(tag: str) -> None:
    """The same, with its result stored for a caller that waits."""
    stamp(tag)


class Adapter:
    """`actor.send` to enqueue; `send(...).get_result(block=True)` (a BLPOP) to execute."""

    blocking = True

    def __init__(self, redis_url: str, target: str, stubs: str, poll: float) -> None:
        self._client: Any = broker.client

    def start(self) -> None:
        self._client.ping()

    def enqueue(self, tag: str) -> None:
        bench_noop.send(tag)

    def execute(self, tag: str) -> None:
        bench_noop_result.send(tag).get_result(block=True, timeout=RESULT_TIMEOUT_MS)

    def unfinished(self) -> tuple[int, str]:
        return int(self._client.hlen(f"{broker.namespace}:default.msgs")), "hlen"

    def close(self) -> None:
        broker.close()
