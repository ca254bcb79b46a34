"""Whether a submission is admitted, decided from facts in hand: pure, no I/O, no await.

- **Job type and params**, against the live workers that run the type (`admit`): none of them
  while some worker is live → NOT_FOUND; params that every one of them would refuse →
  INVALID_ARGUMENT naming the field, in the worker's own words (`app.fleet.job_signature`).
  Workers that disagree (a rolling upgrade with two versions of a job): admitted when any would
  take the params, and the dispatcher sends the job only to one that would. A worker that runs
  the type without advertising its signature (an older version, or one past the size cap), or
  no live worker at all: admitted unchecked, and the worker decides when the job reaches it, as
  an unknown job type waits for a worker when none is live.
- **A reused job id** (`reuse_problem`): the same id with the same job type and params answers
  the existing job (idempotent); with another type or other params it is refused
  (ALREADY_EXISTS: the job the request would create exists, and another one cannot take its id).
  The other options (priority, timeouts, deadline, attempts) of the first submission stand. A
  repeat is answered with its job even when the fleet would refuse its params now (they were
  accepted unchecked, or by workers since gone): the service looks the id up on a refusal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import msgspec

from app.errors import shown
from app.fleet.batch_job import BatchJob
from app.fleet.job_signature import CallShape


class RefusalKind(enum.Enum):
    """The gRPC status a refusal maps to."""

    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """Why a submission is not admitted, in one line."""

    kind: RefusalKind
    message: str


def admit(
    job_type: str, params: Mapping[str, str], *, live: int, runners: Sequence[CallShape | None]
) -> Refusal | None:
    """None when the job may be queued; else why not.

    `live`: how many workers are live; `runners`: for each live worker that runs `job_type`,
    how it takes its params (None: it does not say).
    """
    if live and not runners:
        return Refusal(kind=RefusalKind.NOT_FOUND, message=f"no worker runs job type {job_type!r}")
    problem = params_problem(job_type, params, runners)
    if problem is not None:
        return Refusal(kind=RefusalKind.INVALID_ARGUMENT, message=problem)
    return None


def params_problem(
    job_type: str, params: Mapping[str, str], runners: Sequence[CallShape | None]
) -> str | None:
    """The first runner's reason when every runner would refuse `params`; None when one would
    take them or cannot be judged (no runner, or one that does not say)."""
    if not runners or any(shape is None for shape in runners):
        return None
    first: str | None = None
    judged: set[int] = set()  # workers of one version share one compiled shape: judge it once
    for shape in runners:
        assert shape is not None
        if id(shape) in judged:
            continue
        judged.add(id(shape))
        problem = shape.problem(job_type, params)
        if problem is None:
            return None
        first = first or problem
    return first


def willing(
    job_type: str, params: Mapping[str, str], runners: Mapping[str, CallShape | None]
) -> frozenset[str] | None:
    """Of the live workers that run `job_type` (address → how it takes params), those that
    would take `params` (one that does not say would); None when none would, or none is known:
    then any may have the job, and its refusal ends it with the worker's reason."""
    if len({id(shape) for shape in runners.values()}) < 2:
        return None  # one version of the job: every worker would answer alike
    verdicts: dict[int, bool] = {}
    out: list[str] = []
    for address, shape in runners.items():
        if shape is None:
            out.append(address)
            continue
        takes = verdicts.get(id(shape))
        if takes is None:
            takes = verdicts[id(shape)] = shape.problem(job_type, params) is None
        if takes:
            out.append(address)
    return frozenset(out) or None


def reuse_problem(job: BatchJob, existing: BatchJob) -> str | None:
    """Why the request for `job` may not be answered with `existing`, the job its id names
    (another job type, other params), or None when it repeats it."""
    name = shown(existing.job_id)
    if job.job_type != existing.job_type:
        return (
            f"job {name} exists with job type {shown(existing.job_type)}, not {shown(job.job_type)}"
        )
    if job.params == existing.params:
        return None
    before, now = existing.params, job.params
    differ = [k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
    key = differ[0]
    more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
    return (
        f"job {name} exists with other params: params.{key} was {_value(before.get(key))},"
        f" now {_value(now.get(key))}{more}"
    )


def _value(value: str | None) -> str:
    return "not given" if value is None else shown(value, 40)
