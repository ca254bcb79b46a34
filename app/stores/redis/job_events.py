"""`JobEvents` on Redis pub/sub: subscriptions to the jobs waited on here, and to cancels.

Each process listens on one pub/sub connection to two kinds of channel:
- `<prefix>-cancels`, always: a cancel request of a job on a worker publishes the job's id there,
  and the job's holder (whichever orchestrator it is) stops the run. Cancels are rare, so every
  orchestrator hearing every one costs nothing.
- `<prefix>-events:<id>` of each job someone here waits on (Execute, WatchJob, a cancel that
  waits for the end), subscribed while `subscribed(id)` is entered and confirmed before it
  returns. Every write PUBLISHes there; a process that waits on no job hears none of them, so
  the events a process parses grow with its own clients' waits, not with the fleet (a pattern
  subscription had every orchestrator parse every job's events).

After an outage the connection is made again and every channel waited on is subscribed again;
waiters bound their waits and re-read the record meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import anyio
import anyio.abc
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.core.clock import SystemClock
from app.core.exception_groups import first_leaf
from app.core.lifecycle import Lifecycle
from app.core.outage import Outage, OutageState
from app.errors import BadDataKind
from app.stores.bad_data import BadData
from app.stores.redis.job_store import cancels_channel, events_channel, text
from app.stores.waits import CANCEL_REQUESTED, JobWaiters

log = logging.getLogger(__name__)

#: How long `subscribed` waits for Redis to confirm a subscription before it lets its caller go
#: on anyway (Redis away: the waits are bounded and re-read the record).
CONFIRM_SECONDS = 2.0


class JobEventsStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the event listener."""

    state: Lifecycle
    waiting_jobs: int
    subscribed_jobs: int
    channels_at_redis: int  # this connection's subscriptions, as Redis last confirmed them
    messages: int
    connection: OutageState


class _Subscription:
    """One job's channel, as long as somebody here waits on it."""

    def __init__(self) -> None:
        self.users = 0
        self.confirmed = anyio.Event()


class RedisJobEvents:
    """One pub/sub connection per process; waiters for a job id are woken on its changes.

    The store PUBLISHes on `<prefix>-events:<id>` with every write (the new state's name) and
    cancel request (`cancel`), and the job id on `<prefix>-cancels` with a cancel request of a
    job on a worker; whatever else arrives on a job's channel is taken as a change."""

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
        self._cancels = cancels_channel(job_prefix)
        self._waiters = JobWaiters()
        self._state = Lifecycle.CREATED
        self._subscriptions: dict[str, _Subscription] = {}  # channel -> who waits on it here
        self._subscribed: set[str] = set()  # channels asked of Redis on this connection
        self._confirmed: set[str] = set()  # of those, the ones Redis said it subscribed
        self._touched: set[str] = set()  # channels wanted or unwanted since last asked
        self._asking = anyio.Event()  # set when there are touched channels
        self.messages = 0
        self.requests = 0  # SUBSCRIBE and UNSUBSCRIBE commands sent
        self._channels_at_redis = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<RedisJobEvents {s.state.value} waiting_jobs={s.waiting_jobs}"
            f" subscribed_jobs={s.subscribed_jobs} messages={s.messages}"
            f" connection={s.connection.value}>"
        )

    def statistics(self) -> JobEventsStatistics:
        """Jobs waited on and subscribed to now, messages received, the connection."""
        return JobEventsStatistics(
            state=self._state,
            waiting_jobs=len(self._waiters),
            subscribed_jobs=len(self._subscriptions),
            channels_at_redis=self._channels_at_redis,
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
            pubsub = self._redis.pubsub()  # subscribe messages kept: they confirm
            delay = 0.0
            try:
                self._subscribed = {self._cancels, *self._subscriptions}
                self._confirmed = set()
                self._touched.clear()
                for subscription in self._subscriptions.values():
                    subscription.confirmed = anyio.Event()  # again, on this connection
                self.requests += 1
                await pubsub.subscribe(*self._subscribed)
                self._outage.succeeded()
                if not started:
                    task_status.started()
                    started = True
                async with anyio.create_task_group() as tg:  # either failing ends both
                    tg.start_soon(self._ask, pubsub)
                    await self._listen(pubsub)
            except* (RedisError, OSError) as group:
                delay = self._outage.failed(first_leaf(group))
                if not started:
                    task_status.started()
                    started = True
            finally:
                self._subscribed, self._confirmed = set(), set()
                with anyio.move_on_after(1, shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await anyio.sleep(delay)

    async def _listen(self, pubsub: Any) -> None:
        prefix = self._prefix
        cancels = self._cancels
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind = message["type"]
            if kind in ("subscribe", "unsubscribe"):
                self._channels_at_redis = int(message["data"] or 0)
            if kind == "subscribe":
                channel = text(message["channel"], lenient=True)
                if channel in self._subscribed:
                    self._confirmed.add(channel)
                if (subscription := self._subscriptions.get(channel)) is not None:
                    subscription.confirmed.set()
                continue
            if kind != "message":
                continue
            self.messages += 1
            cancel = text(message["channel"], lenient=True) == cancels
            try:
                if cancel:
                    self._waiters.wake(text(message["data"]), cancel=True, state=CANCEL_REQUESTED)
                else:
                    # the data: the new state's name, as the write published it
                    state = text(message["data"], lenient=True)
                    self._waiters.wake(text(message["channel"]).removeprefix(prefix), state=state)
            except UnicodeDecodeError:
                # no job id is that (ids are checked at submit): it wakes nobody
                what = f"{cancels} message {message['data']!r}" if cancel else message["channel"]
                self._bad_data.found(BadDataKind.JOB_EVENT, what, "job id is not UTF-8",
                                     "ignored")  # fmt: skip

    def subscribed(self, job_id: str) -> AbstractAsyncContextManager[None]:
        """See `JobEvents.subscribed`: SUBSCRIBE to the job's channel (shared by every waiter
        on it here), confirmed by Redis before it returns; UNSUBSCRIBE when the last leaves."""
        return self._subscription(self._prefix + job_id)

    @contextlib.asynccontextmanager
    async def _subscription(self, channel: str) -> AsyncIterator[None]:
        subscription = self._subscriptions.get(channel)
        if subscription is None:
            subscription = self._subscriptions[channel] = _Subscription()
            if channel in self._confirmed:
                subscription.confirmed.set()  # still subscribed (its UNSUBSCRIBE not sent yet)
            self._touch(channel)
        subscription.users += 1
        try:
            with anyio.move_on_after(CONFIRM_SECONDS):
                await subscription.confirmed.wait()
            yield
        finally:
            subscription.users -= 1
            if not subscription.users and self._subscriptions.get(channel) is subscription:
                del self._subscriptions[channel]
                self._touch(channel)  # unsubscribed in the background: nobody waits for it

    def _touch(self, channel: str) -> None:
        self._touched.add(channel)
        self._asking.set()

    async def _ask(self, pubsub: Any) -> None:
        """Make what Redis is asked on this connection what is wanted now: the channels
        touched during a loop turn go in one SUBSCRIBE and one UNSUBSCRIBE (one write each,
        however many waits began and ended)."""
        while True:
            await self._asking.wait()
            self._asking = anyio.Event()
            touched, self._touched = self._touched, set()
            wanted = {c for c in touched if c in self._subscriptions}
            new, gone = wanted - self._subscribed, (touched - wanted) & self._subscribed
            if new:
                self._subscribed |= new
                self.requests += 1
                await pubsub.subscribe(*new)
            if gone:
                self._subscribed -= gone
                self._confirmed -= gone
                self.requests += 1
                await pubsub.unsubscribe(*gone)

    async def wait_changed(self, job_id: str) -> None:
        """Return after the job's next change (callers bound it and re-read the record)."""
        async with self.subscribed(job_id):
            await self._waiters.wait(job_id)

    def watching(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching` (inside `subscribed(job_id)`: changes arrive only then)."""
        return self._waiters.watching(job_id)

    def watching_cancel(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching_cancel`: woken by the job's id on the cancels channel."""
        return self._waiters.watching_cancel(job_id)

    def watching_end(self, job_id: str) -> AbstractContextManager[anyio.Event]:
        """See `JobEvents.watching_end`: woken by a finished state's name on the job's channel."""
        return self._waiters.watching_end(job_id)
