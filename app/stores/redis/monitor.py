"""RedisMonitor: whether this process's Redis answers now, and whether it lost data.

One per process. Every `interval` it runs one small script that reads the fleet's epoch marker
(`wpm-fleet:epoch`, a random id with no expiry), setting it when it is not there, and counts a
heartbeat (`wpm-fleet:heartbeat`, INCR). The answer, or
its absence within the bound, makes Redis UP or DOWN: the role turns its health NOT_SERVING and
refuses submissions with UNAVAILABLE while it is DOWN (`on_change`). A marker that differs from
the one seen before means the data set was replaced: Redis restarted without its files, was
flushed, or failed over to a server that never had them. The process says so once and recreates
what it needs (`on_data_lost`). A restart that kept its data (AOF, RDB) and a fail-over to a
replica that had it keep the marker, and nothing is said but the outage.

A heartbeat at or below the last one this process counted means Redis went back in time: it
lost its last writes (restarted from an AOF that missed them, as after a power loss with
`appendfsync everysec`, or failed over to a replica that was behind). That too is said once,
and the role is told (`on_went_back`): the orchestrator then asks the workers before it runs a
job again that Redis may have forgotten had run.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.core.outage import Outage, OutageState

log = logging.getLogger(__name__)

#: The marker's key (shared by the fleet: every process on one Redis reads the same).
EPOCH_KEY = "wpm-fleet:epoch"
#: The heartbeat's key: every check of every process counts one.
HEARTBEAT_KEY = "wpm-fleet:heartbeat"

# KEYS: the marker, the heartbeat   ARGV: a new epoch   -> {the epoch, the heartbeat}
_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
return {epoch, redis.call('INCR', KEYS[2])}
"""


class RedisMonitorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Whether Redis answers, checks made, failed ones, outages and data losses seen."""

    state: Lifecycle
    redis: OutageState
    checks: int
    failures: int
    outages: int
    data_losses: int
    went_back: int


class RedisMonitor:
    """Checks one Redis every `interval` seconds: up or down, and the epoch marker."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        what: str = "Redis",
        consequence: str = "",
        interval: float = 1.0,
        key: str = EPOCH_KEY,
        heartbeat_key: str = HEARTBEAT_KEY,
        on_change: Callable[[bool], None] | None = None,
        on_data_lost: Callable[[], Awaitable[None]] | None = None,
        data_loss_action: str = "",
        on_went_back: Callable[[], Awaitable[None]] | None = None,
        went_back_action: str = "",
        clock: Clock | None = None,
    ) -> None:
        """`consequence`: what the role does while Redis is down (for the log line);
        `data_loss_action`, `went_back_action`: what the callbacks do (likewise)."""
        self._redis = client
        self._script = client.register_script(_EPOCH)
        self._keys = [key, heartbeat_key]
        self._on_went_back = on_went_back
        self._went_back_action = went_back_action
        self._beat = 0
        self.went_back = 0
        self._interval = interval
        self._on_change = on_change
        self._on_data_lost = on_data_lost
        self._data_loss_action = data_loss_action
        self._outage = Outage(
            what, log=log, clock=clock or SystemClock(), min_delay=interval, max_delay=interval,
            meanwhile=consequence,
        )  # fmt: skip
        self._epoch = ""
        self._state = Lifecycle.CREATED
        self._down_since = math.inf  # loop time of the first failed check of this outage
        self.checks = 0
        self.data_losses = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<RedisMonitor {s.state.value} redis={s.redis.value} checks={s.checks}"
            f" outages={s.outages} data_losses={s.data_losses}>"
        )

    def statistics(self) -> RedisMonitorStatistics:
        """A snapshot of the counters."""
        o = self._outage.statistics()
        return RedisMonitorStatistics(
            state=self._state,
            redis=o.state,
            checks=self.checks,
            failures=o.failures,
            outages=o.outages,
            data_losses=self.data_losses,
            went_back=self.went_back,
        )

    @property
    def up(self) -> bool:
        """Whether the last check was answered (True before the first one)."""
        return self._outage.state is not OutageState.DOWN

    def down_reason(self) -> str | None:
        """None while Redis answers; else a one-line reason for a refusal or a probe."""
        return None if self.up else f"{self._outage.what} unreachable"

    def retry_after(self) -> int:
        """Whole seconds a client should wait before trying again: the check interval, at
        least 1; longer once the outage has lasted (up to 5 s)."""
        down_for = max(0.0, anyio.current_time() - self._down_since)
        return max(1, min(5, math.ceil(max(self._interval, down_for / 4))))

    async def check(self) -> bool:
        """One check now (bounded by twice the interval, at least 1 s); True when answered."""
        self.checks += 1
        error: BaseException | None = None
        reply = None
        with anyio.move_on_after(max(1.0, 2 * self._interval)):
            try:
                reply = await self._script(keys=self._keys, args=[uuid.uuid4().hex])
            except (RedisError, OSError) as exc:
                error = exc
        if reply is None:
            was_up = self.up
            self._outage.failed(error or TimeoutError("no answer in time"))
            if was_up:
                self._down_since = anyio.current_time()
                if self._on_change is not None:
                    self._on_change(False)
            return False
        raw, beat = reply[0], int(reply[1])
        epoch = raw.decode() if isinstance(raw, bytes) else str(raw)
        came_back = self._outage.succeeded()
        self._down_since = math.inf
        if came_back and self._on_change is not None:
            self._on_change(True)
        last_beat, self._beat = self._beat, beat
        if self._epoch and epoch != self._epoch:
            self.data_losses += 1
            log.warning(
                "Redis lost its data: its epoch marker %s changed (it restarted without its"
                " files, was flushed, or failed over to a server that lacked them)%s",
                self._keys[0], f"; {self._data_loss_action}" if self._data_loss_action else "",
            )  # fmt: skip
            self._epoch = epoch
            if self._on_data_lost is not None:
                await self._on_data_lost()
        elif beat <= last_beat:
            self.went_back += 1
            log.warning(
                "Redis went back in time: it lost its last writes (heartbeat %s fell from %d to"
                " %d: it restarted from an AOF that missed them, or failed over to a replica that"
                " was behind)%s", self._keys[1], last_beat, beat,
                f"; {self._went_back_action}" if self._went_back_action else "",
            )  # fmt: skip
            if self._on_went_back is not None:
                await self._on_went_back()
        self._epoch = epoch
        return True

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Check every interval until cancelled; ready after the first check."""
        self._state = Lifecycle.RUNNING
        try:
            await self.check()
            task_status.started()
            while True:
                await anyio.sleep(self._interval)
                await self.check()
        finally:
            self._state = Lifecycle.STOPPED
