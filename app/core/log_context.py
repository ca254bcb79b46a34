"""What a log line is about: the job, schedule or worker it concerns, carried by the context.

A task that works for one job binds `job_id` once (`bind_log_fields`), and every line logged
under it carries the field: its callees', the child tasks it starts, a blocking job's worker
thread (anyio copies the context into it). The log formatter reads the fields, and only for a
line that is emitted, so a job's hot path pays one context variable set and reset, nothing per
line that is filtered out. A line about something else than its task's job names it with
`extra={"worker": address}`, which wins over the context.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

#: the fields a line may carry, in the order they are shown
LOG_FIELDS = ("job_id", "schedule", "worker")

_NONE: Mapping[str, str] = MappingProxyType({})  # the default; a bound mapping is never changed
_fields: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "log_fields", default=_NONE
)

LogFieldsToken = contextvars.Token[Mapping[str, str]]


def log_fields() -> Mapping[str, str]:
    """The fields bound in this context (empty outside any)."""
    return _fields.get()


def bind_log_fields(
    *, job_id: str | None = None, schedule: str | None = None, worker: str | None = None
) -> LogFieldsToken:
    """Add fields to this context (those given; the others stay); undo with the token."""
    fields = dict(_fields.get())
    if job_id is not None:
        fields["job_id"] = job_id
    if schedule is not None:
        fields["schedule"] = schedule
    if worker is not None:
        fields["worker"] = worker
    return _fields.set(fields)


def unbind_log_fields(token: LogFieldsToken) -> None:
    """Undo `bind_log_fields`: the task goes on with the fields it had before."""
    _fields.reset(token)


@contextmanager
def log_context(
    *, job_id: str | None = None, schedule: str | None = None, worker: str | None = None
) -> Iterator[None]:
    """`bind_log_fields` for the body of a `with`."""
    token = bind_log_fields(job_id=job_id, schedule=schedule, worker=worker)
    try:
        yield
    finally:
        unbind_log_fields(token)
