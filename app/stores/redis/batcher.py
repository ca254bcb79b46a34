"""Commands of concurrent callers sent to Redis together, one pipeline per loop turn.

A command sent on its own costs redis-py ~50-70 µs of CPU (a connection from the pool, packing,
one write, one read, the retry wrapper); in a pipeline of 64 it costs ~15 µs, and Redis reads
and answers it with one system call each way. An orchestrator with many jobs in hand issues
many commands in the same loop turn (the Submits it is answering, the records it writes): the
batcher queues them, and its senders (a few tasks in the caller's task group) send all that is
queued as one non-transactional pipeline. A sender that finds the queue empty sleeps, so a
lone command goes out on the next turn, alone; under load the commands that arrive while a
pipeline is on its way go out together in the next one.

Nothing about what each command means changes: each is answered (or raises) as it would alone.
A pipeline is not a transaction: the commands of different callers run one after the other,
as they would have on separate connections. A connection error fails every command of its
pipeline (redis-py retries the whole pipeline first, as it retries a lone command): the
callers see what they would have seen alone. A caller cancelled before its commands were sent
takes them back; after that, they run, as a lone command already written would.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

#: One Redis command as redis-py's `execute_command` takes it: the name, then its arguments.
Command = tuple[Any, ...]

#: Pipelines on their way at once: while one is sent and read, the next fills.
SENDERS = 1
#: Commands per pipeline at most: a bigger queue goes out in several.
MAX_COMMANDS = 512


class _Request:
    """One caller's commands, and their replies once the pipeline that carried them is read."""

    __slots__ = ("commands", "done", "error", "replies", "sent")

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = commands
        self.done = anyio.Event()
        self.replies: list[Any] = []
        self.error: BaseException | None = None
        self.sent = False


class CommandBatcher:
    """Queues commands and sends them in pipelines; `run` (in a task group) is its senders."""

    def __init__(
        self, client: aioredis.Redis, *, senders: int = SENDERS, max_commands: int = MAX_COMMANDS
    ) -> None:
        self._client = client
        self._senders = senders
        self._max_commands = max_commands
        self._queue: deque[_Request] = deque()
        self._wake = anyio.Event()
        self._running = False
        self.pipelines = 0  # sent and read so far
        self.commands = 0  # in them
        self.sending = 0  # commands in pipelines on their way

    def __repr__(self) -> str:
        return (
            f"<CommandBatcher senders={self._senders} queued={len(self._queue)}"
            f" pipelines={self.pipelines} commands={self.commands}>"
        )

    @property
    def queued(self) -> int:
        """Callers whose commands wait for a sender."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """Whether its senders run (until then, and after, commands go out alone)."""
        return self._running

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The senders, until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._senders):
                    tg.start_soon(self._send_loop)
                self._running = True
                task_status.started()
        finally:
            self._running = False
            stopped = RedisConnectionError("the Redis command batcher stopped")
            while self._queue:  # never sent: their callers must not wait for good
                request = self._queue.popleft()
                request.sent, request.error = True, stopped
                request.done.set()

    async def execute(self, *commands: Command) -> list[Any]:
        """Each command's reply, in order; a command Redis refused has its `ResponseError` as
        its reply (as `pipeline.execute(raise_on_error=False)`). A connection error raises."""
        if not self._running:
            return await self._send_alone(commands)
        request = _Request(commands)
        self._queue.append(request)
        self._wake.set()
        try:
            await request.done.wait()
        finally:
            if not request.sent:
                # cancelled before it went out: not sent at all, as a caller still waiting for
                # a connection would not have been
                self._queue.remove(request)
        if request.error is not None:
            raise request.error
        return request.replies

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """`script`'s reply (EVALSHA, loaded first when Redis does not have it); a refusal
        raises its `ResponseError`, as calling the script alone does."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        (reply,) = await self.execute(command)
        if isinstance(reply, NoScriptError):
            # Redis restarted or was flushed since the script was loaded: load it, once more
            reply = await script(keys=keys, args=args)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _send_loop(self) -> None:
        while True:
            while not self._queue:
                wake = self._wake
                if wake.is_set():  # woken for a batch another sender took
                    self._wake = wake = anyio.Event()
                await wake.wait()
            batch: list[_Request] = []
            size = 0
            while self._queue and (
                not batch or size + len(self._queue[0].commands) <= self._max_commands
            ):
                request = self._queue.popleft()
                request.sent = True
                batch.append(request)
                size += len(request.commands)
            await self._send(batch, size)

    async def _send(self, batch: list[_Request], size: int) -> None:
        self.sending += size
        try:
            replies = await self._pipeline([c for request in batch for c in request.commands])
        except Exception as exc:  # the connection failed: every command of the pipeline did
            for request in batch:
                request.error = exc
        except BaseException:  # cancelled (the batcher stops): sent, but not known to have run
            for request in batch:
                request.error = RedisConnectionError("the Redis command batcher stopped")
            raise
        else:
            at = 0
            for request in batch:
                request.replies = replies[at : at + len(request.commands)]
                at += len(request.commands)
        finally:
            self.sending -= size
            self.pipelines += 1
            self.commands += size
            for request in batch:
                request.done.set()

    async def _send_alone(self, commands: Sequence[Command]) -> list[Any]:
        if len(commands) == 1:
            try:
                return [await self._client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
            except ResponseError as exc:
                return [exc]
        return await self._pipeline(commands)

    async def _pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """One non-transactional pipeline of `commands`: each reply, or its `ResponseError`."""
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
