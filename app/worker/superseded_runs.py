"""SupersededRuns: after an absence, a worker stops the runs that the fleet gave to another worker.

A worker that was frozen (SIGSTOP, a paused VM, a long GC) or cut off from Redis for longer than
the fleet waits before it deems a worker gone may find, once back, that an orchestrator started
its jobs again elsewhere under a newer fencing token. Those runs of its own no longer count:
their outcome would be refused, and running on only repeats side effects. So on the first report
after such an absence, the worker reads the record of each job it runs for an orchestrator and
cancels the runs whose job's newest attempt went to another worker under a newer token. (A run
whose worker was merely slow to report keeps going: nobody took its job over. A newer attempt
to this same worker is an orchestrator taking the job over that is about to attach to this very
run: it keeps going too.)
"""

from __future__ import annotations

import logging

import anyio

from app.errors import CorruptRecord, JobNotFound
from app.stores.abc import JobStore
from app.worker.job_master import JobMaster

log = logging.getLogger(__name__)

#: The reads of fencing tokens after an absence are bounded: the store may be slow to answer.
CHECK_TIMEOUT_SECONDS = 5.0


class SupersededRuns:
    """The reporter's `on_return` hook: stop the runs another attempt took over."""

    def __init__(self, store: JobStore, job_master: JobMaster, *, address: str) -> None:
        self._store = store
        self._job_master = job_master
        self._address = address  # this worker's, as attempts name it (`ip:port`)
        self.checks = 0
        self.stopped = 0

    def __repr__(self) -> str:
        return f"<SupersededRuns checks={self.checks} stopped={self.stopped}>"

    async def __call__(self, away_seconds: float) -> None:
        """Check every live run that an orchestrator's attempt started (those carry a token)."""
        self.checks += 1
        runs = [run for run in self._job_master.live() if run.fencing_token]
        if not runs:
            return
        log.warning(
            "this worker was away for %.1fs (frozen or cut off from the registry): checking"
            " whether its %d orchestrated run(s) were taken over meanwhile",
            away_seconds, len(runs),
        )  # fmt: skip
        with anyio.move_on_after(CHECK_TIMEOUT_SECONDS):
            for run in runs:
                try:
                    job = await self._store.get(run.id)
                except CorruptRecord:
                    continue  # said by the store; nothing tells that another attempt took it
                except Exception as exc:  # the store went again: the next return checks anew
                    log.warning("could not read job records: %s: %s", type(exc).__name__, exc)
                    return
                newest = job.attempts[-1] if job is not None and job.attempts else None
                if (
                    newest is None
                    or newest.fencing_token <= run.fencing_token
                    or newest.worker == self._address
                    or run.state.finished
                ):
                    continue
                reason = (
                    f"superseded: another attempt (fencing token {newest.fencing_token}, on"
                    f" {newest.worker}) took the job over while this worker was away"
                )
                try:
                    self._job_master.cancel_nowait(run.id, reason)
                except JobNotFound:
                    continue
                self.stopped += 1
                log.warning("job %s: run under fencing token %d stopped: %s", run.id,
                            run.fencing_token, reason, extra={"job_id": run.id})  # fmt: skip
