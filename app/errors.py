"""The errors the core raises; the gRPC edge maps each to one status code."""

from __future__ import annotations


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


class StoreUnavailable(JobWorkerError):
    """The shared store (Redis) cannot be reached now: down, restarting, loading its data or
    failing over (UNAVAILABLE). The same call may work once it is back."""


class QueueGone(JobWorkerError):
    """The job queue's consumer group is not there: the store lost its data (restarted empty,
    flushed) or someone deleted it. `JobStore.ensure_group` makes it again."""
