"""RedisJobStore on a real redis-server: idempotent submit, per-type bound, fencing, the stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from app.fleet.batch_job import AttemptRecord, BatchJob
from app.fleet.job_state import JobState
from app.stores.abc import SubmitResult, WriteResult
from app.stores.redis.job_events import RedisJobEvents
from app.stores.redis.job_store import RedisJobStore
from app.stores.waits import wait_finished
from tests.helpers import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisJobStore]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    store = RedisJobStore(client, retention_seconds=60)
    await store.ensure_group()
    await store.ensure_group()  # twice is fine
    try:
        yield store
    finally:
        await client.aclose()


def job(job_id: str = "j1", job_type: str = "echo") -> BatchJob:
    return BatchJob(
        job_id=job_id, job_type=job_type, submitted_at=time.time(), deadline_at=time.time() + 60
    )


async def test_submit_is_idempotent_and_bounded_per_type(store: RedisJobStore) -> None:
    assert (await store.submit(job("a"), bound=2))[0] is SubmitResult.CREATED
    result, existing, _ = await store.submit(job("a"), bound=2)
    assert result is SubmitResult.EXISTS
    assert existing is not None
    assert existing.job_id == "a"
    assert (await store.submit(job("b"), bound=2))[0] is SubmitResult.CREATED
    assert await store.submit(job("c"), bound=2) == (SubmitResult.QUEUE_FULL, None, 2)
    assert (await store.submit(job("x", "other"), bound=2))[0] is SubmitResult.CREATED
    entries = await store.read_new("me", count=10, block_ms=10)
    assert [job_id for _, job_id in entries] == ["a", "b", "x"]
    assert await store.queued_count("echo") == 2


async def test_a_late_result_from_a_superseded_attempt_is_refused(store: RedisJobStore) -> None:
    record = job()
    await store.submit(record, bound=10)
    old = await store.next_token("j1")
    record.attempts.append(AttemptRecord(number=1, worker="w1:1", fencing_token=old, started_at=0))
    assert await store.write(record, old) is WriteResult.WRITTEN
    new = await store.next_token("j1")  # a re-dispatch takes over
    assert new == old + 1
    late = await store.get("j1")
    assert late is not None
    late.state, late.result_json = JobState.SUCCEEDED, '"from the old attempt"'
    assert await store.write(late, old) is WriteResult.SUPERSEDED
    current = await store.get("j1")
    assert current is not None
    assert (current.state, current.result_json) == (JobState.PENDING, "")
    current.state, current.result_json = JobState.SUCCEEDED, '"from the new attempt"'
    assert await store.write(current, new) is WriteResult.WRITTEN
    # the outcome is final: not even the token holder rewrites it
    current.state = JobState.FAILED
    assert await store.write(current, new) is WriteResult.ALREADY_FINISHED
    final = await store.get("j1")
    assert final is not None
    assert (final.state, final.result_json) == (JobState.SUCCEEDED, '"from the new attempt"')
    assert await store.queued_count("echo") == 0  # the bound counts unfinished jobs only
    # kept for the retention (60 s here) once it has ended, no longer
    ttl = await store._redis.ttl(store.record_key("j1"))
    assert 0 < ttl <= 60


async def test_idle_entries_are_claimed_and_held_ones_are_not(store: RedisJobStore) -> None:
    await store.submit(job("held"), bound=10)
    await store.submit(job("dropped"), bound=10)
    entries = dict(await store.read_new("dead", count=10, block_ms=10))
    held_entry = next(e for e, j in entries.items() if j == "held")
    await anyio.sleep(0.06)
    await store.keep_alive("dead", [held_entry])  # as if its owner were alive for this one
    claimed = await store.claim_idle("rescuer", min_idle_ms=50, count=10)
    assert [job_id for _, job_id in claimed] == ["dropped"]
    await store.ack(claimed[0][0])
    assert await store.claim_idle("rescuer", min_idle_ms=0, count=10) == [(held_entry, "held")]


async def test_events_wake_a_waiter(store: RedisJobStore, redis_server: RedisServer) -> None:
    record = job()
    await store.submit(record, bound=10)
    client = aioredis.Redis.from_url(redis_server.url)
    events = RedisJobEvents(client)
    async with anyio.create_task_group() as tg:
        await tg.start(events.run)
        token = await store.next_token("j1")

        async def finish_later() -> None:
            await anyio.sleep(0.05)
            record.state = JobState.SUCCEEDED
            await store.write(record, token)

        tg.start_soon(finish_later)
        with anyio.fail_after(5):
            final = await wait_finished(store, events, "j1", deadline=anyio.current_time() + 10)
        assert final is not None
        assert final.state is JobState.SUCCEEDED
        tg.cancel_scope.cancel()
    await client.aclose()
