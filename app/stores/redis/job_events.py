"""`JobEvents` on Redis pub/sub: one pattern subscription per process wakes the waiters."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import anyio
import anyio.abc
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.core.clock import SystemClock
from app.core.lifecycle import Lifecycle
from app.core.outage import Outage, OutageState
from app.errors import BadDataKind
from app.stores.bad_data import BadData
from app.stores.redis.job_store import CANCEL_EVENT, events_channel, text
from app.stores.waits import JobWaiters

log = logging.getLogger(__name__)


class JobEventsStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the event listener."""

    state: Lifecycle
    waiting_jobs: int
    messages: int
    connection: OutageState


class RedisJobEvents:
    """One pub/sub connection per process; waiters for a job id are woken on its changes.

    The store PUBLISHes on `<prefix>-events:<id>` with every write (the new state's name) and
    cancel request (`cancel`); whatever else arrives there is taken as a change."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        job_prefix: str = "wpm-job",
        bad_data: BadData | None = None,
    ) -> None:
        self._redis = client
        self._bad_data = bad_data or BadData()
        self._outage = Outage(
            "job events (Redis pub/sub)", log=log, clock=SystemClock(), min_delay=0.5,
            meanwhile="waiters re-read the records",
        )  # fmt: skip
        self._prefix = events_channel(job_prefix, "")
        self._waiters = JobWaiters()
        self._state = Lifecycle.CREATED
        self.messages = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<RedisJobEvents {s.state.value} waiting_jobs={s.waiting_jobs}"
            f" messages={s.messages} connection={s.connection.value}>"
        )

    def statistics(self) -> JobEventsStatistics:
        """Jobs waited on now, messages received, and whether the subscription is up."""
        return JobEventsStatistics(
            state=self._state,
            waiting_jobs=len(self._waiters),
            messages=self.messages,
            connection=self._outage.state,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen for job changes; reconnect after an outage (waiters re-read meanwhile)."""
        self._state = Lifecycle.RUNNING
        try:
            await self._subscribe_forever(task_status)
        finally:
            self._state = Lifecycle.STOPPED

    async def _subscribe_forever(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            delay = 0.0
            try:
                await pubsub.psubscribe(self._prefix + "*")
                self._outage.succeeded()
                if not started:
                    task_status.started()
                    started = True
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                delay = self._outage.failed(exc)
                if not started:
                    task_status.started()
                    started = True
            finally:
                with anyio.move_on_after(1, shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await anyio.sleep(delay)

    async def _listen(self, pubsub: Any) -> None:
        prefix = self._prefix
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            self.messages += 1
            try:
                job_id = text(message["channel"]).removeprefix(prefix)
            except UnicodeDecodeError:
                # no job id is that (ids are checked at submit): it wakes nobody
                self._bad_data.found(BadDataKind.JOB_EVENT, message["channel"],
                                     "channel name is not UTF-8", "ignored")  # fmt: skip
                continue
            self._waiters.wake(job_id, cancel=message["data"] == CANCEL_EVENT)

    async def wait_changed(self, job_id: str) -> None:
        """Return after the job's next change (callers bound it and re-read the record)."""
        await self._waiters.wait(job_id)

    def watching(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching`."""
        return self._waiters.watching(job_id)

    def watching_cancel(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching_cancel`: woken by a message that says `cancel`."""
        return self._waiters.watching_cancel(job_id)
