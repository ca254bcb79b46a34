"""`RoleInfo`: what an orchestrator or a trigger replica writes about itself to Redis.

The workers have `PodInfo` under the seed's `wpm-apps:<ip>:<pid>`, which the orchestrators'
worker directory reads; the other roles register apart from it, under
`<redis.roles_key_prefix>:<role>:<ip>:<pid>` (see `app.stores.redis.role_registry`), so that a
client (`jobworker status`) can list the whole fleet from Redis. Same habits as PodInfo: JSON
with camelCase keys, refreshed every report interval with a TTL, deleted on a clean stop, and
the schema grows only by fields with defaults.
"""

from __future__ import annotations

import enum
import os
import socket
from datetime import datetime
from typing import Any

import msgspec


class Role(enum.Enum):
    """The tiers of the fleet, as the registry and `jobworker status` name them."""

    WORKER = "worker"
    ORCHESTRATOR = "orchestrator"
    TRIGGER = "trigger"


class RoleStatus(enum.Enum):
    """Serving, or on its way out (refusing new work while it finishes what it holds)."""

    SERVING = "SERVING"
    DRAINING = "DRAINING"


class RoleInfo(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """One orchestrator's or trigger replica's report.

    Load is what the role holds: an orchestrator's jobs in hand (`inflight`, of `maxInflight`)
    and those of them waiting for a worker (`waiting`); a trigger's schedules it works
    (`schedulesHeld`, of `schedules`) and the replicas it sees up. Times are ISO 8601 in UTC;
    `updateEpochMs` lets a reader compare without parsing.
    """

    role: Role
    ip: str
    grpc_port: int
    pid: int
    status: RoleStatus
    update_datetime: str
    update_epoch_ms: int
    host: str = ""
    start_datetime: str = ""
    version: str = ""
    # how often it reports: a reader takes a report older than two of them for stale
    report_interval_seconds: float = 0.0
    # an orchestrator's load
    inflight: int = 0
    max_inflight: int = 0
    waiting: int = 0
    # a trigger's load
    schedules_held: int = 0
    schedules: int = 0
    replicas: int = 0

    @property
    def address(self) -> str:
        """`ip:grpcPort`: where it takes calls."""
        return f"{self.ip}:{self.grpc_port}"

    @property
    def member(self) -> str:
        """`ip:pid`: its name in its role's registry index (a restart is a new member)."""
        return f"{self.ip}:{self.pid}"


class RoleIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """What stays the same across one process's reports; `report()` adds the time and load."""

    role: Role
    ip: str
    version: str
    start_datetime: str
    report_interval_seconds: float

    def report(self, now: datetime, *, grpc_port: int, draining: bool, **load: Any) -> RoleInfo:
        """This process's `RoleInfo` at `now` (aware, UTC) on `grpc_port` (known once its
        server is bound), with the load fields in `load`."""
        return RoleInfo(
            role=self.role, ip=self.ip, grpc_port=grpc_port, pid=os.getpid(),
            host=socket.gethostname(), version=self.version, start_datetime=self.start_datetime,
            status=RoleStatus.DRAINING if draining else RoleStatus.SERVING,
            update_datetime=now.isoformat(timespec="milliseconds"),
            update_epoch_ms=int(now.timestamp() * 1000),
            report_interval_seconds=self.report_interval_seconds, **load,
        )  # fmt: skip


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """One live record of a role's registry as read: its key, its member name, the value it
    wrote, and the seconds it has left (None when the store cannot tell: no expiry)."""

    key: str
    member: str
    value: bytes
    ttl_left_seconds: float | None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RoleInfo)


def encode_role_info(info: RoleInfo) -> bytes:
    """RoleInfo as the registry stores it: JSON with camelCase keys."""
    return _encoder.encode(info)


def decode_role_info(raw: bytes | str) -> RoleInfo:
    """RoleInfo from the registry's JSON; `msgspec.DecodeError` when it is not one (unknown
    keys are ignored, so a newer writer's fields do not trouble an older reader)."""
    return _decoder.decode(raw)
