"""One job-state vocabulary and its wire tables: total, one-to-one, and refusing what is not."""

from __future__ import annotations

import pytest

from app.fleet.job_state import (
    FINISHED,
    JobState,
    from_worker_wire,
    to_orchestrator_wire,
    to_worker_wire,
)
from app.pb import orchestrator as opb
from app.pb import worker as wpb

RUN_STATES = {JobState.QUEUED, JobState.RUNNING, *FINISHED}
FLEET_STATES = {JobState.PENDING, JobState.DISPATCHED, JobState.RUNNING, *FINISHED}


def test_every_wire_value_has_one_state_and_names_agree() -> None:
    assert {to_worker_wire(s) for s in RUN_STATES} == set(wpb.JobState) - {
        wpb.JobState.JOB_STATE_UNSPECIFIED
    }
    assert {to_orchestrator_wire(s) for s in FLEET_STATES} == set(opb.JobState) - {
        opb.JobState.JOB_STATE_UNSPECIFIED
    }
    for state in RUN_STATES:
        assert to_worker_wire(state).name == state.value
        assert from_worker_wire(to_worker_wire(state)) is state
    for state in FLEET_STATES:
        assert to_orchestrator_wire(state).name == state.value


def test_states_of_the_other_tier_and_unknown_values_are_refused() -> None:
    with pytest.raises(ValueError, match="PENDING is not a state of a worker's run"):
        to_worker_wire(JobState.PENDING)
    with pytest.raises(ValueError, match="QUEUED is not a state of a fleet job"):
        to_orchestrator_wire(JobState.QUEUED)
    assert from_worker_wire(0) is None  # unspecified
    assert from_worker_wire(99) is None  # a newer worker's state


def test_the_finished_states_are_the_four_ends() -> None:
    assert {s for s in JobState if s.finished} == {
        JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT
    }  # fmt: skip
