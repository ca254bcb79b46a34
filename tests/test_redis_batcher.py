"""The Redis command batcher on a real redis-server: the commands of concurrent callers go out
in shared pipelines, each caller gets its own replies (a refusal its own error), a caller
cancelled before its commands went out takes them back, and stopping the batcher leaves no
caller waiting. (tests/test_stores_contract.py runs the whole store contract through it too.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.stores.redis.batcher import CommandBatcher
from tests.helpers import eventually, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client


@pytest.fixture
async def running(async_redis: aioredis.Redis) -> AsyncIterator[CommandBatcher]:
    batcher = CommandBatcher(async_redis, senders=1)
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run)
        yield batcher
        tg.cancel_scope.cancel()


async def test_the_commands_of_one_turn_share_a_pipeline(
    running: CommandBatcher, redis_client: redis.Redis
) -> None:
    replies: list[Any] = []

    async def caller() -> None:
        replies.extend(await running.execute(("INCR", "counter")))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
    assert sorted(replies) == list(range(1, 51))
    assert running.commands == 50
    assert running.pipelines <= 2  # 50 alone would be 50
    assert redis_client.get("counter") == b"50"


async def test_a_refused_command_fails_only_its_own_caller(
    running: CommandBatcher, redis_client: redis.Redis
) -> None:
    redis_client.set("text", "not a number")
    results: dict[str, Any] = {}

    async def caller(key: str) -> None:
        results[key] = await running.execute(("INCR", key), ("GET", key))

    async with anyio.create_task_group() as tg:
        for key in ("a", "text", "b"):
            tg.start_soon(caller, key)
    assert results["a"] == [1, b"1"]
    assert results["b"] == [1, b"1"]
    refused, value = results["text"]
    assert isinstance(refused, ResponseError)
    assert "not an integer" in str(refused)
    assert value == b"not a number"


async def test_a_script_redis_forgot_is_loaded_again(
    running: CommandBatcher, async_redis: aioredis.Redis, redis_client: redis.Redis
) -> None:
    script = async_redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await running.script(script, ["n"], [5]) == 5
    redis_client.script_flush()  # as a Redis that restarted
    assert await running.script(script, ["n"], [2]) == 7
    with pytest.raises(ResponseError):
        await running.script(script, ["n", "m"], [])  # ARGV[1] missing: the script fails


async def hold_the_sender(running: CommandBatcher, tg: anyio.abc.TaskGroup) -> None:
    """Keep the one sender busy on a BLPOP (until something is pushed to `gate`)."""
    tg.start_soon(running.execute, ("BLPOP", "gate", 10))
    await eventually(lambda: running.sending == 1)


async def test_a_caller_cancelled_before_its_pipeline_went_out_takes_its_commands_back(
    running: CommandBatcher, redis_client: redis.Redis
) -> None:
    async with anyio.create_task_group() as tg:
        await hold_the_sender(running, tg)
        with anyio.move_on_after(0.05):
            await running.execute(("SET", "late", "1"))  # queued behind the BLPOP
        assert running.queued == 0
        redis_client.rpush("gate", "go")
    await running.execute(("PING",))  # the sender is free again: everything before went out
    assert redis_client.get("late") is None
    assert running.commands == 2  # the BLPOP and the PING


async def test_stopping_the_batcher_fails_its_waiting_callers_instead_of_leaving_them(
    async_redis: aioredis.Redis, redis_client: redis.Redis
) -> None:
    batcher = CommandBatcher(async_redis, senders=1)
    errors: list[BaseException] = []

    async def caller(*command: Any) -> None:
        try:
            await batcher.execute(command)
        except RedisConnectionError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as senders:
            await senders.start(batcher.run)
            tg.start_soon(caller, "BLPOP", "gate", 10)
            await eventually(lambda: batcher.sending == 1)
            tg.start_soon(caller, "SET", "queued", "1")
            await eventually(lambda: batcher.queued == 1)
            senders.cancel_scope.cancel()
        redis_client.rpush("gate", "go")
    # the BLPOP on its way and the SET still queued: neither caller is left waiting
    assert len(errors) == 2
    assert all("stopped" in str(e) for e in errors)
    assert redis_client.get("queued") is None
    assert not batcher.running
    assert await batcher.execute(("SET", "after", "1")) == [True]  # alone, once it stopped


async def test_a_connection_that_fails_fails_every_caller_of_its_pipeline() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
    batcher = CommandBatcher(client)
    failed = 0

    async def caller() -> None:
        nonlocal failed
        with pytest.raises(RedisConnectionError):
            await batcher.execute(("GET", "x"))
        failed += 1

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            async with anyio.create_task_group() as callers:
                for _ in range(5):
                    callers.start_soon(caller)
            tg.cancel_scope.cancel()
    finally:
        await client.aclose()
    assert failed == 5
