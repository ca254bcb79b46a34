"""The orchestrator's job record, as stored at `wpm-job:<id>` (JSON) and returned by its RPCs."""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.fleet.job_state import FLEET_STATES, JobState

# What a record's numbers may be: what `orchestrator.Job` carries and RFC 3339 can show. A stored
# value outside them is junk, refused when the record is read, not when it is put on the wire.
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=253_402_300_799)]  # to 9999-12-31
Seconds = Annotated[float, msgspec.Meta(ge=0)]
UInt32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
UInt64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # Redis INCR stops there too
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]


class AttemptRecord(msgspec.Struct, kw_only=True):
    """One delegation to one worker. `outcome` is empty while the call is going."""

    number: UInt32
    worker: str
    fencing_token: UInt64
    started_at: Timestamp
    finished_at: Timestamp | None = None
    outcome: str = ""
    error: str = ""


class BatchJob(msgspec.Struct, kw_only=True):
    """A job of the fleet. Times are Unix epoch seconds.

    `fencing_token` is the token of the attempt that may write now; the authoritative counter
    is the `<record>:fence` key, so a writer holding an older token is refused.
    """

    job_id: str
    job_type: str
    params: dict[str, str] = msgspec.field(default_factory=dict)
    timeout_seconds: Seconds = 0.0
    priority: Int32 = 0
    deadline_at: Timestamp = 0.0
    retry_on_failure: bool = False
    max_attempts: int = 3
    state: JobState = JobState.PENDING
    attempts: list[AttemptRecord] = msgspec.field(default_factory=list)
    result_json: str = ""
    error: str = ""
    submitted_at: Timestamp = 0.0
    finished_at: Timestamp | None = None
    fencing_token: UInt64 = 0
    # the schedule whose run this is (the trigger says so at submit); empty for a job by hand
    schedule: str = ""


class RunOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How one run of a job ended on its worker: what the worker records under the attempt's
    fencing token, and what the dispatcher reads back when the answer did not reach it."""

    state: JobState
    result_json: str = ""
    error: str = ""


class LostJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job the store forgot while a process held it (Redis restarted empty, or failed over to
    a replica that lacked it): what that process knew of it, for `jobworker lost`."""

    job_id: str
    reason: str
    noticed_by: str  # the process: an orchestrator's consumer name
    noticed_at: float
    job_type: str = ""
    state: str = ""  # as last known in hand (the end it reached, when the run had ended)
    worker: str = ""  # the worker of the last attempt
    attempts: int = 0
    result_json: str = ""
    error: str = ""


_encoder = msgspec.json.Encoder()
_outcome_decoder = msgspec.json.Decoder(RunOutcome)
_decoder = msgspec.json.Decoder(BatchJob)
_lost_decoder = msgspec.json.Decoder(LostJob)


def encode_job(job: BatchJob) -> bytes:
    """The record as stored: compact JSON."""
    return _encoder.encode(job)


def encode_outcome(outcome: RunOutcome) -> bytes:
    """The outcome as stored: JSON."""
    return _encoder.encode(outcome)


def decode_outcome(raw: bytes | str) -> RunOutcome:
    """An outcome from its JSON (msgspec.DecodeError when it is not one: a run's end)."""
    outcome = _outcome_decoder.decode(raw)
    if not outcome.state.finished:
        raise msgspec.ValidationError(f"state {outcome.state.value} is not the end of a run")
    return outcome


def decode_job(raw: bytes | str) -> BatchJob:
    """A record from its stored JSON; `msgspec.DecodeError` when it is not one (its numbers
    and state included: what it holds can always be shown)."""
    job = _decoder.decode(raw)
    if job.state not in FLEET_STATES:
        raise msgspec.ValidationError(f"state {job.state.value} is not a fleet job's state")
    return job


def encode_lost(lost: LostJob) -> bytes:
    """A lost-job report as stored: JSON."""
    return _encoder.encode(lost)


def decode_lost(raw: bytes | str) -> LostJob:
    """A lost-job report from its JSON (msgspec.DecodeError when it is not one)."""
    return _lost_decoder.decode(raw)
