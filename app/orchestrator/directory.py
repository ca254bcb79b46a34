"""The fleet as one orchestrator sees it: the workers' PodInfo, read from `wpm-apps:*`.

Refreshed on an interval with SCAN (never KEYS) and MGET, and cached between refreshes. A worker
whose `updateDatetime` is older than two report intervals is stale and gets no new work.

A registry outage is not blamed on the workers: they could not report while it lasted, and
they come back with a backoff of their own. While the registry is away, and for as long again
plus two report intervals after it answers, a worker whose report was fresh when it went away
is not taken for stale. A worker whose key vanished keeps its last report until that goes stale
(a key is deleted only once its worker has drained, and Redis may have lost it with its data).
A worker that really died meanwhile breaks its calls by itself.

Each worker's advertised job signatures are compiled into call shapes at refresh, once per
distinct signature (workers of one version share them; a signature is compiled again only when
its JSON changes), so that checking a submission's params costs no parsing.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc
import msgspec

from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.core.outage import Outage, OutageState
from app.fleet.job_signature import CallShape, shape_from_json
from app.fleet.pod_info import PodInfo, decode_pod_info
from app.stores.abc import PodRegistry

log = logging.getLogger(__name__)


class WorkerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's last report, under its registry key."""

    key: str
    info: PodInfo

    @property
    def address(self) -> str:
        """`ip:grpcPort`: where the worker takes calls, and its key in the directory."""
        return f"{self.info.ip}:{self.info.grpc_port}"

    def age_seconds(self, now: float) -> float:
        """Seconds since the worker wrote the report, `now` in Unix seconds.

        A PodInfo without `updateEpochMs` (0) looks decades old: stale.
        """
        return now - self.info.update_epoch_ms / 1000


class DirectoryStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the directory for status and metrics."""

    state: Lifecycle
    workers: int
    refreshes: int
    errors: int
    skipped: int
    registry: OutageState


class WorkerDirectory:
    """Cached PodInfo of every worker under `prefix`."""

    def __init__(
        self,
        registry: PodRegistry,
        *,
        prefix: str = "wpm-apps",
        report_interval_seconds: float = 5.0,
        refresh_seconds: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self._registry = registry
        self._prefix = prefix
        self._stale_after = 2 * report_interval_seconds
        self._refresh = refresh_seconds
        self._clock: Clock = clock or SystemClock()
        self._entries: dict[str, WorkerEntry] = {}
        # by address, then job name: how the worker takes that job's params (None: unreadable)
        self._shapes: dict[str, dict[str, CallShape | None]] = {}
        self._compiled: dict[bytes, CallShape | None] = {}  # by a signature's JSON
        self._changed = anyio.Event()
        self.refreshes = 0
        self._outage = Outage(
            "the worker registry", log=log, clock=self._clock, min_delay=refresh_seconds,
            max_delay=max(5.0, refresh_seconds), meanwhile="keeping the last view of the fleet",
        )  # fmt: skip
        self.errors = 0
        self._skipped: dict[str, str] = {}  # registry keys skipped, and why (said once each)
        self._state = Lifecycle.CREATED
        # wall times: since when the registry does not answer, and the excuse after it did
        self._away_since: float | None = None
        self._excuse: tuple[float, float] | None = None  # (away since, until)

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<WorkerDirectory {s.state.value} workers={s.workers} refreshes={s.refreshes}"
            f" errors={s.errors} registry={s.registry.value}>"
        )

    def statistics(self) -> DirectoryStatistics:
        """Known workers, refreshes and failed ones, and whether the registry answers."""
        return DirectoryStatistics(
            state=self._state,
            workers=len(self._entries),
            refreshes=self.refreshes,
            errors=self.errors,
            skipped=len(self._skipped),
            registry=self._outage.state,
        )

    def entries(self) -> list[WorkerEntry]:
        """The workers of the last refresh, stale ones included, by address."""
        return sorted(self._entries.values(), key=lambda e: e.address)

    def get(self, address: str) -> WorkerEntry | None:
        """The worker at `address` as of the last refresh, or None."""
        return self._entries.get(address)

    def shape(self, entry: WorkerEntry, job_type: str) -> CallShape | None:
        """How the worker of `entry` takes the params of `job_type`, as it advertises them;
        None when it does not say (then they are not checked before they reach it)."""
        return self._shapes.get(entry.address, {}).get(job_type)

    def runs(self, entry: WorkerEntry, job_type: str) -> bool:
        """Whether the worker runs `job_type` (one that names no job runs anything)."""
        names = entry.info.job_names
        return not names or job_type in names

    def _excused_since(self, now: float) -> float | None:
        """When the registry went away, while its outage excuses old reports; else None."""
        if self._away_since is not None:
            return self._away_since
        if self._excuse is not None and now < self._excuse[1]:
            return self._excuse[0]
        return None

    def stale_reason(self, entry: WorkerEntry | None) -> str | None:
        """Why a worker should be taken for gone, or None when its report is fresh (or was
        fresh when the registry went away, during the excuse that follows: see above)."""
        if entry is None:
            return "its PodInfo key is gone"
        now = self._clock.timestamp()
        age = entry.age_seconds(now)
        if age <= self._stale_after:
            return None
        away = self._excused_since(now)
        if away is not None and entry.age_seconds(away) <= self._stale_after:
            return None
        return f"its last report is {age:.1f}s old"

    async def refresh(self) -> None:
        """Read every worker's PodInfo now.

        A restarted worker reports under a new key (its new pid) while the old one lingers until
        its TTL: per address the freshest report counts. A report that cannot be a worker's
        (not a PodInfo, or no port a worker could listen on) is skipped, and said once per key.
        """
        try:
            keys = await self._registry.keys(f"{self._prefix}:")
            values = await self._registry.get_many(keys)
        except Exception:
            if self._away_since is None:
                self._away_since = self._clock.timestamp()
            raise
        now = self._clock.timestamp()
        if self._away_since is not None:
            # the workers had no way to report meanwhile, and back off as long again at most
            self._excuse = (self._away_since, now + (now - self._away_since) + self._stale_after)
            self._away_since = None
        entries: dict[str, WorkerEntry] = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            try:
                entry = WorkerEntry(key=key, info=decode_pod_info(raw))
            except msgspec.DecodeError as exc:
                self._skip(key, f"not a PodInfo ({exc})")
                continue
            if not 1 <= entry.info.grpc_port <= 65535 or not entry.info.ip:
                self._skip(key, f"no address a worker could have ({entry.address!r})")
                continue
            known = entries.get(entry.address)
            if known is None or entry.info.update_epoch_ms > known.info.update_epoch_ms:
                entries[entry.address] = entry
        for address, old in self._entries.items():
            if address not in entries and self.stale_reason(old) is None:
                entries[address] = old  # its key vanished: its last report counts until stale
        live = set(keys)
        self._skipped = {k: why for k, why in self._skipped.items() if k in live}
        self._shapes = self._compile(entries)
        self._entries = entries
        self.refreshes += 1
        self._changed.set()
        self._changed = anyio.Event()

    def _compile(self, entries: dict[str, WorkerEntry]) -> dict[str, dict[str, CallShape | None]]:
        """Each worker's call shapes, from the cache or compiled; the cache keeps those in use."""
        compiled: dict[bytes, CallShape | None] = {}
        shapes: dict[str, dict[str, CallShape | None]] = {}
        for address, entry in entries.items():
            mine = shapes[address] = {}
            for job, raw in entry.info.job_signatures.items():
                text = bytes(raw)
                if text not in compiled:
                    if text in self._compiled:
                        compiled[text] = self._compiled[text]
                    else:
                        compiled[text] = shape = shape_from_json(text)
                        if shape is None:
                            log.warning("ignoring the signature of job %r on %s: it does not"
                                        " read (%.80r)", job, address, text)  # fmt: skip
                mine[job] = compiled[text]
        self._compiled = compiled
        return shapes

    def _skip(self, key: str, why: str) -> None:
        if key not in self._skipped:
            log.warning("ignoring %s: %s", key, why)
        self._skipped[key] = why

    async def wait_refreshed(self) -> None:
        """Return after the next refresh."""
        await self._changed.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Refresh on the interval until cancelled; ready after the first attempt."""
        self._state = Lifecycle.RUNNING
        try:
            await self._refresh_forever(task_status)
        finally:
            self._state = Lifecycle.STOPPED

    async def _refresh_forever(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        first = True
        while True:
            delay = self._refresh
            try:
                await self.refresh()
            except Exception as exc:  # Redis away or confused: keep the last view, try again
                self.errors += 1
                delay = max(delay, self._outage.failed(exc))
            else:
                self._outage.succeeded()
            if first:
                task_status.started()
                first = False
            await anyio.sleep(delay)
