"""The fleet as `jobworker status` shows it: every role's record, decoded, with stale ones marked.

Pure: given what Redis holds (`app.stores.redis.fleet_reader`) and the time, one `FleetMember`
per record. A member is stale when its report is older than two of its report intervals (the
orchestrators' worker directory takes such a worker for gone), or when its record has less
than one interval left before Redis drops it (its next report would come too late). A record
that does not decode is listed too, stale, with the reason: it is there, and someone should know.
"""

from __future__ import annotations

import msgspec

from app.fleet.pod_info import PodInfo, decode_pod_info
from app.fleet.role_info import Registration, Role, RoleInfo, decode_role_info

#: the order of the tiers in a listing: from where jobs start to where they run
ROLE_ORDER = (Role.TRIGGER, Role.ORCHESTRATOR, Role.WORKER)


class FleetMember(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One process of the fleet as its record says, and whether that record is stale."""

    role: Role
    address: str
    ip: str
    port: int
    pid: int
    host: str
    status: str
    load: str  # for people: "2/8 active, 0/100 queued"
    load_detail: dict[str, int]
    # seconds since it wrote the record (None: the record says no time)
    report_age_seconds: float | None
    report_interval_seconds: float
    # seconds before Redis drops the record (None: no expiry, or unknown)
    ttl_left_seconds: float | None
    version: str
    started_at: str
    stale: bool
    stale_reason: str
    key: str


def stale_reason(age: float | None, interval: float, ttl_left: float | None) -> str | None:
    """Why a record is stale, or None when it is fresh (see the module's docstring)."""
    if age is None:
        return "its record carries no report time"
    if age > 2 * interval:
        return f"last report {age:.1f}s ago (reports every {interval:g}s)"
    if ttl_left is not None and ttl_left < interval:
        return f"its record expires in {ttl_left:.1f}s"
    return None


def _age(update_epoch_ms: int, now: float) -> float | None:
    # milliseconds are what the record carries
    return round(max(0.0, now - update_epoch_ms / 1000), 3) if update_epoch_ms > 0 else None


def _member(
    reg: Registration, *, role: Role, now: float, interval: float, ip: str, port: int, pid: int,
    host: str, status: str, load: str, detail: dict[str, int], epoch_ms: int, version: str,
    started: str,
) -> FleetMember:  # fmt: skip
    age = _age(epoch_ms, now)
    why = stale_reason(age, interval, reg.ttl_left_seconds)
    return FleetMember(
        role=role, address=f"{ip}:{port}", ip=ip, port=port, pid=pid, host=host, status=status,
        load=load, load_detail=detail, report_age_seconds=age, report_interval_seconds=interval,
        ttl_left_seconds=reg.ttl_left_seconds, version=version, started_at=started,
        stale=why is not None, stale_reason=why or "", key=reg.key,
    )  # fmt: skip


def _worker(reg: Registration, info: PodInfo, now: float, interval: float) -> FleetMember:
    detail = {
        "active": info.active, "maxSize": info.max_size, "coreSize": info.core_size,
        "queued": info.queued, "queueCapacity": info.queue_capacity,
    }  # fmt: skip
    return _member(
        reg, role=Role.WORKER, now=now, interval=info.report_interval_seconds or interval,
        ip=info.ip, port=info.grpc_port, pid=info.pid, host=info.host, status=info.status.value,
        load=f"{info.active}/{info.max_size} active, {info.queued}/{info.queue_capacity} queued",
        detail=detail, epoch_ms=info.update_epoch_ms, version=info.version,
        started=info.start_datetime,
    )  # fmt: skip


def _role(reg: Registration, info: RoleInfo, now: float, interval: float) -> FleetMember:
    if info.role is Role.TRIGGER:
        detail = {
            "schedulesHeld": info.schedules_held, "schedules": info.schedules,
            "replicas": info.replicas,
        }  # fmt: skip
        load = f"{info.schedules_held}/{info.schedules} schedules, {info.replicas} replica(s)"
    else:
        detail = {
            "inflight": info.inflight,
            "maxInflight": info.max_inflight,
            "waiting": info.waiting,
        }
        load = f"{info.inflight}/{info.max_inflight} in flight, {info.waiting} waiting"
    return _member(
        reg, role=info.role, now=now, interval=info.report_interval_seconds or interval,
        ip=info.ip, port=info.grpc_port, pid=info.pid, host=info.host, status=info.status.value,
        load=load, detail=detail, epoch_ms=info.update_epoch_ms, version=info.version,
        started=info.start_datetime,
    )  # fmt: skip


def _unreadable(reg: Registration, role: Role, problem: str, interval: float) -> FleetMember:
    return FleetMember(
        role=role, address="?", ip="", port=0, pid=0, host="", status="?", load="",
        load_detail={}, report_age_seconds=None, report_interval_seconds=interval,
        ttl_left_seconds=reg.ttl_left_seconds, version="", started_at="", stale=True,
        stale_reason=f"unreadable record: {problem}", key=reg.key,
    )  # fmt: skip


def fleet_members(
    found: dict[Role, list[Registration]], *, now: float, default_interval: float
) -> list[FleetMember]:
    """Every record decoded, by tier then address. `now` is the wall time (Unix seconds);
    `default_interval` is the report interval of a record that does not say its own."""
    members: list[FleetMember] = []
    for role in ROLE_ORDER:
        for reg in found.get(role, []):
            try:
                if role is Role.WORKER:
                    members.append(_worker(reg, decode_pod_info(reg.value), now, default_interval))
                else:
                    info = decode_role_info(reg.value)
                    if info.role is not role:
                        raise msgspec.ValidationError(f"a {info.role.value}'s under {role.value}")
                    members.append(_role(reg, info, now, default_interval))
            except msgspec.DecodeError as exc:
                members.append(_unreadable(reg, role, str(exc)[:120], default_interval))
    order = {role: i for i, role in enumerate(ROLE_ORDER)}
    return sorted(members, key=lambda m: (order[m.role], m.address, m.pid))
