"""The errors the core raises; the gRPC edge maps each to one status code."""

from __future__ import annotations

import enum


def shown(value: str, limit: int = 64) -> str:
    """`repr(value)` for an error's reason, cut near `limit` characters (values come from clients).

    A reason is one line of a status message: a megabyte id echoed in it cost the server tens of
    seconds in hpack's Huffman coder, and the client its trailer limit.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


class JobWorkerError(Exception):
    """Base of this project's errors. `str()` is a one-line reason fit for a status message."""


class ConfigError(JobWorkerError):
    """A configuration value is missing or wrong; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class JobRejected(JobWorkerError):
    """The job master did not accept a job (nothing was started)."""


class InvalidJobRequest(JobRejected):
    """A field of the request is wrong (INVALID_ARGUMENT)."""


class UnknownJob(JobRejected):
    """No job function is registered under that name (NOT_FOUND)."""


class JobAlreadyExists(JobRejected):
    """A job with that id is queued or running already (ALREADY_EXISTS)."""


class QueueFull(JobRejected):
    """All tokens taken, the limiter at its maximum and the queue full (RESOURCE_EXHAUSTED)."""


class Draining(JobRejected):
    """The worker is shutting down and takes no new work (UNAVAILABLE)."""


class JobNotFound(JobWorkerError):
    """No job with that id is queued, running or remembered (NOT_FOUND)."""


class BadDataKind(enum.Enum):
    """What kind of stored item did not read: the `kind` label of the bad-data counters."""

    STREAM_ENTRY = "stream_entry"  # a queue entry: no job id, not UTF-8, or no job record
    JOB_RECORD = "job_record"  # `<prefix>:<id>`: not JSON, not a job, not a string value
    FENCING_TOKEN = "fencing_token"  # `<prefix>:<id>:fence`: not an integer
    RUN_OUTCOME = "run_outcome"  # `<prefix>:<id>:run:<token>`: not a run's end
    QUEUED_COUNTER = "queued_counter"  # `<prefix>-queued:<type>`: not an integer
    JOB_EVENT = "job_event"  # a pub/sub message on a channel that is not UTF-8
    SCHEDULE = "schedule"  # a field of `<trigger prefix>:schedules`: not a schedule
    TICK_DECISION = "tick_decision"  # a member of `<trigger prefix>:{<name>}:ledger`
    JOB_INDEX = "job_index"  # `wpm-jobs:index`: not a sorted set, or a member that is no job id


class CorruptRecord(JobWorkerError):
    """Something a job needs in the store does not read (DATA_LOSS): the job cannot be driven
    or shown, and is set aside; other jobs are not affected.

    `problem` says what (without the job id), `key` where it was found."""

    def __init__(self, kind: BadDataKind, job_id: str, key: str, detail: str) -> None:
        unusable = "unusable" if kind is BadDataKind.STREAM_ENTRY else "unreadable"
        self.problem = f"{_WHAT[kind]} {unusable}: {detail}"
        super().__init__(f"job {job_id}: {self.problem}")
        self.kind = kind
        self.job_id = job_id
        self.key = key
        self.detail = detail


_WHAT = {
    BadDataKind.STREAM_ENTRY: "queue entry",
    BadDataKind.JOB_RECORD: "record",
    BadDataKind.FENCING_TOKEN: "fencing token",
    BadDataKind.RUN_OUTCOME: "run outcome",
    BadDataKind.QUEUED_COUNTER: "queued counter",
    BadDataKind.JOB_EVENT: "event",
    BadDataKind.SCHEDULE: "schedule",
    BadDataKind.TICK_DECISION: "ledger record",
    BadDataKind.JOB_INDEX: "index entry",
}


class CorruptIndex(JobWorkerError):
    """The job index as a whole does not read (its key holds another type): listing jobs
    answers DATA_LOSS until it is deleted; submits go on, unindexed."""


class StoreUnavailable(JobWorkerError):
    """The shared store (Redis) cannot be reached now: down, restarting, loading its data or
    failing over (UNAVAILABLE). The same call may work once it is back."""


class StoreBusy(JobWorkerError):
    """This process's connections to the store all stayed in use for the whole wait for one: a
    load condition, not an outage (RESOURCE_EXHAUSTED with a retry-after). Nothing says the store
    is away, so nothing turns health NOT_SERVING for it or blames a worker."""


class QueueGone(JobWorkerError):
    """The job queue's consumer group is not there: the store lost its data (restarted empty,
    flushed) or someone deleted it. `JobStore.ensure_group` makes it again."""
