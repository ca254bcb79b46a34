"""Job states: one vocabulary for a run on a worker and for a job of the fleet, and its wire form.

A worker's run is QUEUED (waiting for a token), RUNNING, then ends; a fleet job is PENDING (in
the queue), DISPATCHED (sent to a worker), RUNNING (recorded once its run has gone on for
`orchestrator.running_recorded_after_seconds`: a shorter run goes from DISPATCHED to its end),
then ends the same ways. The two protos number their enums differently (`worker.JobState`,
`orchestrator.JobState`, fixed by the wire contract); the tables here are the only place that
knows the numbers.
"""

from __future__ import annotations

import enum

from app.pb import orchestrator as opb
from app.pb import worker as wpb


class JobState(enum.Enum):
    """Where a job is. The values are the names stored in job records and shown to people."""

    QUEUED = "QUEUED"
    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def finished(self) -> bool:
        """True for the four ends; a finished job never changes again."""
        return self in FINISHED


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT})

_TO_WORKER = {
    JobState.QUEUED: wpb.JobState.QUEUED,
    JobState.RUNNING: wpb.JobState.RUNNING,
    JobState.SUCCEEDED: wpb.JobState.SUCCEEDED,
    JobState.FAILED: wpb.JobState.FAILED,
    JobState.CANCELLED: wpb.JobState.CANCELLED,
    JobState.TIMED_OUT: wpb.JobState.TIMED_OUT,
}
_FROM_WORKER = {wire: state for state, wire in _TO_WORKER.items()}
_TO_ORCHESTRATOR = {
    JobState.PENDING: opb.JobState.PENDING,
    JobState.DISPATCHED: opb.JobState.DISPATCHED,
    JobState.RUNNING: opb.JobState.RUNNING,
    JobState.SUCCEEDED: opb.JobState.SUCCEEDED,
    JobState.FAILED: opb.JobState.FAILED,
    JobState.CANCELLED: opb.JobState.CANCELLED,
    JobState.TIMED_OUT: opb.JobState.TIMED_OUT,
}
#: The states a fleet job's record may hold (QUEUED is a worker's run's only).
FLEET_STATES = frozenset(_TO_ORCHESTRATOR)


def to_worker_wire(state: JobState) -> wpb.JobState:
    """`worker.JobState` for a run's state (a fleet-only state is a bug: ValueError)."""
    try:
        return _TO_WORKER[state]
    except KeyError:
        raise ValueError(f"{state.value} is not a state of a worker's run") from None


def from_worker_wire(value: int) -> JobState | None:
    """The state a worker reported; None for a value this version does not know."""
    try:
        return _FROM_WORKER.get(wpb.JobState(value))
    except ValueError:
        return None


def to_orchestrator_wire(state: JobState) -> opb.JobState:
    """`orchestrator.JobState` for a fleet job's state (a worker-only state: ValueError)."""
    try:
        return _TO_ORCHESTRATOR[state]
    except KeyError:
        raise ValueError(f"{state.value} is not a state of a fleet job") from None


_FROM_ORCHESTRATOR = {wire: state for state, wire in _TO_ORCHESTRATOR.items()}


def from_orchestrator_wire(value: int) -> JobState | None:
    """The fleet job's state an `orchestrator.JobState` value names; None for UNSPECIFIED or a
    value this version does not know."""
    try:
        return _FROM_ORCHESTRATOR.get(opb.JobState(value))
    except ValueError:
        return None
