"""`RoleReporter`: an orchestrator or trigger replica says it is up, as a worker's PodInfo does.

Every report interval it writes the role's `RoleInfo` (read live from `snapshot`) to the role
registry with a TTL; `report(force=True)` writes at once (the DRAINING status as the drain
starts); `close()` removes the record on a clean stop, after which nothing writes it again. A
process killed outright leaves its record to the TTL.

While Redis is away the reports fail quietly (the process's RedisMonitor says so, once) and
resume on the interval; a report that works again re-registers the role.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import anyio.abc
import msgspec

from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.errors import StoreBusy, StoreUnavailable
from app.fleet.role_info import RoleInfo, encode_role_info
from app.stores.abc import RoleRegistry

log = logging.getLogger(__name__)


class RoleReporterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Reports written and failed so far."""

    state: Lifecycle
    reports: int
    failures: int


class RoleReporter:
    """Writes `snapshot()` to `registry` every `interval_seconds`, with `ttl_seconds`."""

    def __init__(
        self,
        registry: RoleRegistry,
        snapshot: Callable[[], RoleInfo],
        *,
        ttl_seconds: float = 60.0,
        interval_seconds: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        self._registry = registry
        self._snapshot = snapshot
        self._ttl = ttl_seconds
        self._interval = interval_seconds
        self._clock: Clock = clock or SystemClock()
        self._lock = anyio.Lock()
        self._state = Lifecycle.CREATED
        self._written: RoleInfo | None = None  # the last record written (its role and member)
        self.reports = 0
        self.failures = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<RoleReporter {s.state.value} reports={s.reports} failures={s.failures}>"

    def statistics(self) -> RoleReporterStatistics:
        """Whether it runs, and the reports written and failed so far."""
        return RoleReporterStatistics(
            state=self._state, reports=self.reports, failures=self.failures
        )

    async def report(self, *, force: bool = False) -> bool:
        """Write the record now; True when it was written (False once closed, or Redis away).

        `force` is for a caller outside the loop (a status change): the same write, now."""
        async with self._lock:
            if self._state is Lifecycle.STOPPED:
                return False
            info = self._snapshot()
            try:
                await self._registry.put(
                    info.role.value, info.member, encode_role_info(info),
                    ttl_seconds=self._ttl, now=self._clock.timestamp(),
                )  # fmt: skip
            except (StoreUnavailable, StoreBusy) as exc:
                self.failures += 1
                log.debug("%s %s not registered: %s", info.role.value, info.member, exc)
                return False
            if self._written is None:
                log.info("registered as %s %s (ttl %gs)", info.role.value, info.member, self._ttl)
            self._written = info
            self.reports += 1
            return True

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Report now and on every interval until cancelled (or closed); ready after the first
        attempt, written or not."""
        self._state = Lifecycle.RUNNING
        await self.report()
        task_status.started()
        while self._state is Lifecycle.RUNNING:
            await anyio.sleep(self._interval)
            await self.report()

    async def close(self) -> None:
        """Stop reporting and remove the record (a clean stop); a failure is logged, not raised.
        Bound it with a shielded scope: it talks to Redis."""
        async with self._lock:
            self._state = Lifecycle.STOPPED
            written, self._written = self._written, None
            if written is None:
                return  # never registered: nothing to remove
            try:
                await self._registry.remove(written.role.value, written.member)
            except (StoreUnavailable, StoreBusy) as exc:
                log.warning("could not remove %s %s: %s", written.role.value, written.member, exc)
                return
            log.info("%s %s unregistered", written.role.value, written.member)
