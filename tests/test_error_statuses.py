"""The worker maps each core error to one gRPC status, subclasses included."""

from __future__ import annotations

from grpclib.const import Status

from app.errors import Draining, InvalidJobRequest, JobRejected, QueueFull
from app.worker.service import grpc_error


class SpecialQueueFull(QueueFull):
    """A finer kind of full queue that a future module might raise."""


def test_each_error_has_its_status_and_its_line() -> None:
    assert grpc_error(InvalidJobRequest("params.n: bad")).status is Status.INVALID_ARGUMENT
    assert grpc_error(Draining("draining")).status is Status.UNAVAILABLE
    error = grpc_error(SpecialQueueFull("queue is full"))
    assert (error.status, error.message) == (Status.RESOURCE_EXHAUSTED, "queue is full")
    assert grpc_error(JobRejected("no reason")).status is Status.INTERNAL  # unmapped: a bug
