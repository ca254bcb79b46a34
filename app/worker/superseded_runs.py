"""SupersededRuns: after an absence, a worker stops the runs that the fleet gave to another worker.

A worker that was frozen (SIGSTOP, a paused VM, a long GC) or cut off from Redis for longer than
the fleet waits before it deems a worker gone may find, once back, that an orchestrator started
its jobs again elsewhere under a newer fencing token. Those runs of its own no longer count:
their outcome would be refused, and running on only repeats side effects. So on the first report
after such an absence, the worker reads the fencing token of each job it runs for an
orchestrator and cancels the runs whose token is older. (A run whose worker was merely slow to
report keeps going: nobody took its job over, so its token is still the newest.)
"""

from __future__ import annotations

import logging

import anyio

from app.errors import JobNotFound
from app.stores.abc import JobStore
from app.worker.job_master import JobMaster

log = logging.getLogger(__name__)

#: The reads of fencing tokens after an absence are bounded: the store may be slow to answer.
CHECK_TIMEOUT_SECONDS = 5.0


class SupersededRuns:
    """The reporter's `on_return` hook: stop the runs another attempt took over."""

    def __init__(self, store: JobStore, job_master: JobMaster) -> None:
        self._store = store
        self._job_master = job_master
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
                    fence = await self._store.fence(run.id)
                except Exception as exc:  # the store went again: the next return checks anew
                    log.warning("could not read fencing tokens: %s: %s", type(exc).__name__, exc)
                    return
                if fence <= run.fencing_token or run.state.finished:
                    continue
                reason = (
                    f"superseded: another attempt (fencing token {fence}) took the job over"
                    f" while this worker was away"
                )
                try:
                    self._job_master.cancel_nowait(run.id, reason)
                except JobNotFound:
                    continue
                self.stopped += 1
                log.warning("job %s: run under fencing token %d stopped: %s", run.id,
                            run.fencing_token, reason)  # fmt: skip
