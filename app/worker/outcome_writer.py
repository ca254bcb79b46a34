"""OutcomeWriter: the worker records how each run an orchestrator asked for ended, in the job store.

Under the attempt's fencing token (`<job record>:run:<token>`), so that the outcome outlives the
orchestrator that asked for it: one that takes the job over reads it there instead of running
the job again. The job master tells it of every run's end synchronously; a task writes them in
order (those that ended since the last write together, in one round trip), riding out a store
outage (logged once) with the queue bounded.
"""

from __future__ import annotations

import logging
from collections import Counter

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from app.core.clock import Clock, SystemClock
from app.core.lifecycle import Lifecycle
from app.core.outage import Outage
from app.errors import StoreBusy
from app.fleet.batch_job import RunOutcome
from app.stores.abc import JobStore
from app.worker.job_run import JobRun

log = logging.getLogger(__name__)

_Item = tuple[str, int, RunOutcome]
#: The pause before an outcome refused as busy (every Redis connection in use) is written again.
BUSY_RETRY_SECONDS = 0.05
#: Outcomes written in one step at most (those of the runs that ended since the last write).
OUTCOMES_PER_WRITE = 256


class OutcomeWriterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Outcomes written, waiting, and dropped because the queue was full."""

    state: Lifecycle
    written: int
    waiting: int
    dropped: int


class OutcomeWriter:
    """Writes run outcomes to the job store in the order the runs ended."""

    def __init__(self, store: JobStore, *, buffer: int = 10_000, clock: Clock | None = None):
        self._store = store
        send, receive = anyio.create_memory_object_stream[_Item](buffer)
        self._send: MemoryObjectSendStream[_Item] = send
        self._receive: MemoryObjectReceiveStream[_Item] = receive
        self._outage = Outage(
            "the job store (run outcomes)", log=log, clock=clock or SystemClock(),
            meanwhile="outcomes wait in memory",
        )  # fmt: skip
        self._state = Lifecycle.CREATED
        self._drained = anyio.Event()
        self.written = 0
        self.dropped = 0
        # runs whose outcome is not in the store yet: PodInfo still lists them as this worker's,
        # so that an orchestrator that finds neither the run listed nor its outcome may be sure
        # the run is not here
        self._unwritten: Counter[str] = Counter()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<OutcomeWriter {s.state.value} written={s.written} waiting={s.waiting}"
            f" dropped={s.dropped}>"
        )

    def statistics(self) -> OutcomeWriterStatistics:
        """The counters, and the outcomes not written yet."""
        return OutcomeWriterStatistics(
            state=self._state,
            written=self.written,
            waiting=self._receive.statistics().current_buffer_used,
            dropped=self.dropped,
        )

    def finished(self, record: JobRun) -> None:
        """The job master's hook: queue the outcome of a run that carries a fencing token."""
        if not record.fencing_token:
            return
        if self._state in (Lifecycle.DRAINING, Lifecycle.STOPPED):
            self.dropped += 1  # closed: the worker stops after its job master, so this is rare
            return
        outcome = RunOutcome(
            state=record.state, result_json=record.result_json.decode(), error=record.error
        )
        try:
            self._send.send_nowait((record.id, record.fencing_token, outcome))
            self._unwritten[record.id] += 1
        except anyio.WouldBlock:
            # the store has been away for that long: the orchestrator that asked may still get
            # the outcome over RunWork; only a takeover then runs the job again
            if not self.dropped:
                log.warning("run outcomes queue full: outcomes dropped (e.g. job %s)", record.id,
                            extra={"job_id": record.id})  # fmt: skip
            self.dropped += 1

    def unwritten_ids(self) -> list[str]:
        """The jobs whose runs ended here but whose outcome is not in the store yet."""
        return list(self._unwritten)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write outcomes until `close` and the queue is empty (or until cancelled)."""
        self._state = Lifecycle.RUNNING
        task_status.started()
        try:
            async with self._receive:
                async for first in self._receive:
                    # the runs that ended meanwhile go with it: one round trip for all
                    batch = [first]
                    while len(batch) < OUTCOMES_PER_WRITE:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    await self._write(batch)
        finally:
            self._state = Lifecycle.STOPPED
            self._drained.set()

    async def _write(self, batch: list[_Item]) -> None:
        while True:
            try:
                await self._store.record_outcomes(batch)
            except StoreBusy:  # every connection in use: load, not an outage
                await anyio.sleep(BUSY_RETRY_SECONDS)
                continue
            except Exception as exc:  # the store away: wait, try again
                await anyio.sleep(self._outage.failed(exc))
                continue
            self._outage.succeeded()
            break
        self.written += len(batch)
        for job_id, _, _ in batch:
            self._unwritten[job_id] -= 1
            if not self._unwritten[job_id]:
                del self._unwritten[job_id]

    async def close(self, *, within: float) -> None:
        """Take no more outcomes, and give the queued ones `within` seconds to be written."""
        if self._state is not Lifecycle.STOPPED:
            self._state = Lifecycle.DRAINING
        self._send.close()
        with anyio.move_on_after(within, shield=True):
            await self._drained.wait()
