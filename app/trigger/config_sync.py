"""`[[schedules]]` in the TOML config: checked at start, then synced into the store.

The config owns the names it declares: a replica that starts writes each declared schedule
(taking a runtime schedule of the same name over), leaves an unchanged one alone (its cursor and
ledger go on), updates a changed one (its pause state is kept: pausing is an operation, not a
definition), and deletes the config's schedules that are no longer declared. The runtime API
refuses to change or delete a config schedule (FAILED_PRECONDITION). With several replicas on
different config versions (a rolling deploy), the last one started wins.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec

from app.config import ScheduleEntry
from app.errors import ConfigError
from app.fleet.schedules import InvalidSchedule, ScheduleSource, ScheduleSpec
from app.stores.abc import PutMode, PutResult, ScheduleStore
from app.trigger.specs import same_definition, spec_from_fields

log = logging.getLogger("app.trigger")


def config_specs(
    entries: Sequence[ScheduleEntry], *, now: float, min_grace: float
) -> list[ScheduleSpec]:
    """The declared schedules, checked; ConfigError naming `schedules[i].<field>` if one is
    wrong (so the process exits 2 before it touches the store)."""
    specs: list[ScheduleSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        try:
            spec = spec_from_fields(
                msgspec.structs.asdict(entry), now=now, source=ScheduleSource.CONFIG,
                min_grace=min_grace,
            )  # fmt: skip
        except InvalidSchedule as exc:
            raise ConfigError(f"schedules[{i}].{exc.field}", exc.problem) from None
        if spec.name in seen:
            first = seen[spec.name]
            raise ConfigError(
                f"schedules[{i}].name", f"{spec.name!r} is declared already (schedules[{first}])"
            )
        seen[spec.name] = i
        specs.append(spec)
    return specs


async def sync_config_schedules(
    store: ScheduleStore, specs: Sequence[ScheduleSpec], *, now: float
) -> list[str]:
    """Make the store's config schedules the declared ones; what changed, one line each."""
    changes: list[str] = []
    declared = {spec.name for spec in specs}
    for spec in specs:
        for _ in range(5):  # again when another replica wrote it meanwhile
            current = await store.get(spec.name)
            if current is None:
                result, _ = await store.put(spec, mode=PutMode.CREATE)
                done = f"schedule {spec.name}: created from the config ({spec.describe()})"
            elif current.source is ScheduleSource.CONFIG and same_definition(current, spec):
                break
            else:
                wanted = msgspec.structs.replace(
                    spec,
                    created_at=current.created_at,
                    paused=current.paused,
                    paused_at=current.paused_at,
                    pause_note=current.pause_note,
                    since=current.since if current.timing() == spec.timing() else now,
                )
                result, _ = await store.put(
                    wanted, mode=PutMode.UPDATE, expected_version=current.version
                )
                done = (
                    f"schedule {spec.name}: the config takes over the name from the runtime API"
                    if current.source is ScheduleSource.RUNTIME
                    else f"schedule {spec.name}: updated from the config ({spec.describe()})"
                )
            if result is PutResult.WRITTEN:
                changes.append(done)
                break
    for current in await store.all():
        gone = current.source is ScheduleSource.CONFIG and current.name not in declared
        if gone and await store.delete(current.name):
            changes.append(f"schedule {current.name}: deleted (no longer in the config)")
    for line in changes:
        log.info("%s", line)
    return changes
