"""`PodInfo`: what a worker writes about itself to `wpm-apps:<ip>:<pid>`."""

from __future__ import annotations

import enum

import msgspec


class PodStatus(enum.Enum):
    """The seed's POD_STATUS_TYPE, plus DRAINING for a worker on its way out."""

    IDLE = "IDLE"
    BUSY = "BUSY"
    DRAINING = "DRAINING"


class WorkerLoad(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's load as its job master reads it live: the one record that PodInfo carries
    and that status and metrics show (the names are PodInfo's)."""

    status: PodStatus
    active: int
    capacity: int
    core_size: int
    max_size: int
    queued: int
    queue_capacity: int
    watermark: int


class PodInfo(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """The seed's three keys first (`grpcPort`, `status`, `updateDatetime`), then the fleet's.

    Times are ISO 8601 with a UTC offset; `updateEpochMs` lets a reader compare without parsing.
    The schema only grows by adding fields with defaults, so older readers keep working.
    """

    grpc_port: int
    status: PodStatus
    update_datetime: str
    update_epoch_ms: int = 0
    ip: str = ""
    pid: int = 0
    host: str = ""
    start_datetime: str = ""
    active: int = 0
    capacity: int = 0
    core_size: int = 0
    max_size: int = 0
    queued: int = 0
    queue_capacity: int = 0
    watermark: int = 0
    version: str = ""
    # how often this worker reports: `jobworker status` takes a report older than two of them
    # for stale (0: from a writer that did not say; the reader's own config decides)
    report_interval_seconds: float = 0.0
    # the job names this worker runs, so that an orchestrator sends it only those
    job_names: list[str] = msgspec.field(default_factory=list)
    # the ids of the jobs queued or running here: an orchestrator that lost its call to this
    # worker (a partition, a reset) sees from it that the run goes on, and does not start a
    # second copy elsewhere
    live_job_ids: list[str] = msgspec.field(default_factory=list)
    # per job name, its parameters (`app.fleet.job_signature.JobSignature` as JSON, kept raw:
    # an orchestrator reads one only when it changed): what a submission is checked against.
    # A job named in jobNames but not here is not checked before it reaches a worker.
    job_signatures: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PodInfo)


def encode_pod_info(info: PodInfo) -> bytes:
    """PodInfo as the registry stores it: JSON with camelCase keys."""
    return _encoder.encode(info)


def decode_pod_info(raw: bytes | str) -> PodInfo:
    """PodInfo from the registry's JSON; `msgspec.DecodeError` when it is not one.

    Unknown keys are ignored, so a newer writer's fields do not trouble an older reader.
    """
    return _decoder.decode(raw)


def pod_key(prefix: str, ip: str, pid: int) -> str:
    """The seed's key: `<prefix>:<ip>:<pid>` (prefix `wpm-apps` by default)."""
    return f"{prefix}:{ip}:{pid}"
