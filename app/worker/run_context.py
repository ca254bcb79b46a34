"""What a running job may know about its own run: `current_run()`.

Chiefly the fencing token. The fleet runs a job at least once: a run is repeated only after its
worker was presumed gone (killed, frozen, cut off) while it ran. Each attempt carries a newer
token, so a job that writes somewhere can guard that write with it, the way the fleet guards its
own records::

    from app import current_run, job

    @job
    async def settle(account: str) -> None:
        token = current_run().fencing_token
        # UPDATE balances SET ..., fence = :token WHERE account = :account AND fence < :token

A write that carries an older token than the store has seen is then refused, so a run that was
presumed gone and comes back cannot overwrite what its successor wrote.
"""

from __future__ import annotations

import contextvars

import msgspec


class RunContext(msgspec.Struct, frozen=True, kw_only=True):
    """The run a job function is called for.

    `fencing_token` grows with each attempt an orchestrator makes (0 when the job was sent to
    this worker directly, without an orchestrator).
    """

    job_id: str
    name: str
    fencing_token: int = 0


_current: contextvars.ContextVar[RunContext] = contextvars.ContextVar("job_run")


def current_run() -> RunContext:
    """The run of the job being executed (also in the worker thread of a plain `def` job).

    Raises LookupError outside a job's run.
    """
    try:
        return _current.get()
    except LookupError:
        raise LookupError("current_run() is only known inside a job's run") from None


def enter_run(context: RunContext) -> contextvars.Token[RunContext]:
    """Set the run for the job master's runner task (reset with `leave_run`)."""
    return _current.set(context)


def leave_run(token: contextvars.Token[RunContext]) -> None:
    """Undo `enter_run`: the runner task goes on to its next run."""
    _current.reset(token)
