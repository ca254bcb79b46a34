"""Schedules as people write them (a `[[schedules]]` table, a gRPC `Schedule`) into `ScheduleSpec`.

Both arrive as plain fields with strings for the policies and the interval's start; one
function turns them into a spec and checks it, so the config and the API refuse the same things
with the same words: `InvalidSchedule` naming the field (`cron: '61 * * * *': minute ...`).
Times given without an offset are wall times in the schedule's zone.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from app.fleet.schedules import (
    DEFAULT_MISFIRE_GRACE,
    InvalidSchedule,
    ScheduleSource,
    ScheduleSpec,
    check_schedule,
)
from app.scheduling.cron import RepeatedTime, SkippedTime, parse_zone
from app.scheduling.decisions import Overlap

#: The fields a person gives (everything else is the store's or the trigger's).
GIVEN = (
    "name", "job_type", "cron", "interval_seconds", "interval_start", "time_zone", "dst_skipped",
    "dst_repeated", "params", "overlap", "misfire_grace_seconds", "jitter_seconds",
    "deadline_seconds", "timeout_seconds", "priority", "retry_on_failure", "max_attempts",
    "paused",
)  # fmt: skip


def _choice(field: str, value: str, enum: Any, default: Any) -> Any:
    if not value:
        return default
    try:
        return enum(value.lower())
    except ValueError:
        allowed = " or ".join(repr(e.value) for e in enum)
        raise InvalidSchedule(field, f"must be {allowed}, got {value[:40]!r}") from None


def parse_time(text: str, *, zone_name: str, field: str, now: float | None = None) -> float:
    """An instant from ISO 8601 (`now` also); without an offset, a wall time in the zone."""
    text = text.strip()
    if text.lower() == "now" and now is not None:
        return now
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise InvalidSchedule(
            field, f"expected an ISO 8601 time such as 2026-03-08T02:30, got {text[:40]!r}"
        ) from None
    if value.tzinfo is None:
        try:
            value = value.replace(tzinfo=parse_zone(zone_name))
        except ValueError:
            value = value.replace(tzinfo=UTC)
    return value.timestamp()


def spec_from_fields(
    values: Mapping[str, Any],
    *,
    now: float,
    source: ScheduleSource,
    min_grace: float,
    previous: ScheduleSpec | None = None,
) -> ScheduleSpec:
    """A checked spec from the given fields (absent or empty ones take their defaults).

    With `previous` (an update), its creation time, pause state and version carry over, and
    `since` moves to `now` only when the fire times change.
    """
    zone = str(values.get("time_zone") or "UTC")
    start = str(values.get("interval_start") or "")
    grace = float(values.get("misfire_grace_seconds") or 0) or DEFAULT_MISFIRE_GRACE
    try:
        spec = ScheduleSpec(
            name=str(values.get("name") or ""),
            job_type=str(values.get("job_type") or ""),
            cron=str(values.get("cron") or "").strip(),
            interval_seconds=float(values.get("interval_seconds") or 0.0),
            interval_start=(
                parse_time(start, zone_name=zone, field="interval_start") if start else 0.0
            ),
            time_zone=zone,
            dst_skipped=_choice(
                "dst_skipped",
                str(values.get("dst_skipped") or ""),
                SkippedTime,
                SkippedTime.RUN_AT_TRANSITION,
            ),
            dst_repeated=_choice(
                "dst_repeated",
                str(values.get("dst_repeated") or ""),
                RepeatedTime,
                RepeatedTime.ONCE,
            ),
            params={str(k): str(v) for k, v in dict(values.get("params") or {}).items()},
            overlap=_choice("overlap", str(values.get("overlap") or ""), Overlap, Overlap.FORBID),
            misfire_grace_seconds=grace,
            jitter_seconds=float(values.get("jitter_seconds") or 0.0),
            deadline_seconds=float(values.get("deadline_seconds") or 0.0),
            timeout_seconds=float(values.get("timeout_seconds") or 0.0),
            priority=int(values.get("priority") or 0),
            retry_on_failure=bool(values.get("retry_on_failure")),
            max_attempts=int(values.get("max_attempts") or 0),
            paused=bool(values.get("paused")),
            paused_at=now if values.get("paused") else None,
            source=source,
            created_at=now,
            updated_at=now,
            since=now,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidSchedule):
            raise
        raise InvalidSchedule("schedule", str(exc)) from None
    if previous is not None:
        spec = msgspec.structs.replace(
            spec,
            created_at=previous.created_at,
            paused=previous.paused,
            paused_at=previous.paused_at,
            pause_note=previous.pause_note,
            version=previous.version,
            since=previous.since if previous.timing() == spec.timing() else now,
        )
    return check_schedule(spec, min_grace=min_grace)


def same_definition(a: ScheduleSpec, b: ScheduleSpec) -> bool:
    """Whether two specs define the same schedule (bookkeeping and pause state aside)."""
    skip = {"paused", "paused_at", "pause_note", "created_at", "updated_at", "since", "version"}
    return all(
        getattr(a, f) == getattr(b, f) for f in ScheduleSpec.__struct_fields__ if f not in skip
    )
