"""ApplicationInfoReportJob: the seed's 5-second job that writes this worker's PodInfo to Redis.

`SET <prefix>:<ip>:<pid> <PodInfo JSON> EX <ttl>` at boot and on every tick; the key is deleted
on a clean exit. While the registry is unreachable the worker goes on serving: the outage is
logged once, attempts back off from the report interval up to `retry_max_seconds`, and the first
write that succeeds again re-registers the worker and says so.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
import msgspec
from redis.exceptions import RedisError

from app import __version__
from app.core.clock import Clock, SystemClock
from app.core.outage import Outage, OutageState
from app.fleet.pod_info import PodInfo, encode_pod_info, pod_key
from app.grpc.ports import advertised_ip
from app.stores.abc import PodRegistry
from app.worker.job_master import JobMaster

log = logging.getLogger(__name__)

#: Failures that mean "the registry is not there right now", as opposed to a bug.
REGISTRY_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


class PodIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who this worker is: fixed for the life of the process."""

    ip: str
    pid: int
    host: str
    grpc_port: int
    start_datetime: str
    version: str = __version__


def make_identity(grpc_port: int, *, bound_host: str, advertise_ip: str = "") -> PodIdentity:
    """This process's identity: advertised IP (`advertised_ip`), pid, host name, start time."""
    return PodIdentity(
        ip=advertised_ip(bound_host, advertise_ip),
        pid=os.getpid(),
        host=socket.gethostname(),
        grpc_port=grpc_port,
        start_datetime=datetime.now(UTC).isoformat(timespec="milliseconds"),
    )


class ReporterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """How PodInfo reporting goes: whether the registry answers, reports and failed ones."""

    registry: OutageState
    reports: int
    failures: int


class ApplicationInfoReportJob:
    """Writes PodInfo on each call; safe to call from a schedule and directly."""

    def __init__(
        self,
        registry: PodRegistry,
        job_master: JobMaster,
        identity: PodIdentity,
        *,
        key_prefix: str = "wpm-apps",
        ttl_seconds: int = 60,
        interval_seconds: float = 5.0,
        retry_max_seconds: float = 30.0,
        clock: Clock | None = None,
        on_return: Callable[[float], Awaitable[None]] | None = None,
        unrecorded_ids: Callable[[], list[str]] | None = None,
    ) -> None:
        self._registry = registry
        self._job_master = job_master
        self._identity = identity
        self.key = pod_key(key_prefix, identity.ip, identity.pid)
        self._ttl = ttl_seconds
        self._clock: Clock = clock or SystemClock()
        # the registry's outages: logged once, reports spaced from the interval up to the max
        self._outage = Outage(
            "registry",
            log=log,
            clock=self._clock,
            min_delay=interval_seconds,
            max_delay=max(interval_seconds, retry_max_seconds),
            meanwhile="still serving",
        )
        self._lock = anyio.Lock()
        self.reports = 0
        # the fleet deems a worker gone when its report is older than two intervals
        self._interval = interval_seconds
        self._stale_after = 2 * interval_seconds
        self._last_written: float | None = None  # monotonic
        # told, after a report that follows a longer absence (frozen, cut off from the
        # registry), how long this worker was away: its runs may have been taken over meanwhile
        self._on_return = on_return
        # runs that ended here but whose outcome is not in the store yet: listed as live still
        self._unrecorded_ids = unrecorded_ids

    def __repr__(self) -> str:
        state = self._outage.state.value
        return f"<ApplicationInfoReportJob {self.key} registry {state} reports={self.reports}>"

    def statistics(self) -> ReporterStatistics:
        """The registry's state, and the reports written and failed so far."""
        stats = self._outage.statistics()
        return ReporterStatistics(
            registry=stats.state, reports=self.reports, failures=stats.failures
        )

    @property
    def connected(self) -> bool:
        """Whether the last write reached the registry."""
        return self._outage.state is OutageState.UP

    @property
    def failures(self) -> int:
        """Writes that failed so far."""
        return self._outage.statistics().failures

    def pod_info(self) -> PodInfo:
        """What goes to the registry now: who this worker is and its load, read live."""
        now = self._clock.now()
        ident = self._identity
        return PodInfo(
            **msgspec.structs.asdict(self._job_master.load()),
            grpc_port=ident.grpc_port,
            update_datetime=now.isoformat(timespec="milliseconds"),
            update_epoch_ms=int(now.timestamp() * 1000),
            ip=ident.ip,
            pid=ident.pid,
            host=ident.host,
            start_datetime=ident.start_datetime,
            version=ident.version,
            report_interval_seconds=self._interval,
            job_names=self._job_master.job_names(),
            job_signatures=self._job_master.job_signatures(),
            live_job_ids=self._live_job_ids(),
        )

    def _live_job_ids(self) -> list[str]:
        ids = [run.id for run in self._job_master.live()]
        if self._unrecorded_ids is not None:
            ids += self._unrecorded_ids()
        return ids

    async def __call__(self) -> None:
        """`report()`, as a schedule calls it: nothing is written while backing off."""
        await self.report()

    async def report(self, *, force: bool = False) -> bool:
        """Write PodInfo now (unless backing off and not `force`); True when it was written."""
        if not force and not self._outage.due():
            return False
        async with self._lock:
            try:
                await self._registry.put(self.key, encode_pod_info(self.pod_info()), self._ttl)
            except REGISTRY_ERRORS as exc:
                self._outage.failed(exc)
                return False
        first = self._outage.state is OutageState.UNKNOWN
        self._outage.succeeded(detail=f"PodInfo re-registered as {self.key}")
        if first:
            log.info("PodInfo registered as %s (ttl %ds)", self.key, self._ttl)
        self.reports += 1
        now, last = self._clock.monotonic(), self._last_written
        self._last_written = now
        if last is not None and now - last > self._stale_after and self._on_return is not None:
            await self._on_return(now - last)
        return True

    async def unregister(self) -> None:
        """Delete the key (a clean exit). Failures are logged, not raised."""
        try:
            await self._registry.delete(self.key)
            log.info("PodInfo %s deleted", self.key)
        except REGISTRY_ERRORS as exc:
            log.warning("could not delete %s: %s: %s", self.key, type(exc).__name__, exc)
