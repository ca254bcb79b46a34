"""The record of one job run on a worker, as the job master keeps it and the RPCs return it."""

from __future__ import annotations

from typing import Any

import msgspec

from app.fleet.job_state import JobState


class JobRun(msgspec.Struct, kw_only=True):
    """One run of a job. Mutable: the job master updates it in place as the run moves on.

    Times are Unix epoch seconds; `result_json` is the job function's return value as JSON.
    """

    id: str
    name: str
    params: dict[str, str] = msgspec.field(default_factory=dict)
    timeout_seconds: float = 0.0
    state: JobState = JobState.QUEUED
    result_json: bytes = b""
    error: str = ""
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    # the orchestrator's fencing token for the attempt that started this run (0: none)
    fencing_token: int = 0

    def result(self) -> Any:
        """The decoded return value (None when the job has not succeeded)."""
        return msgspec.json.decode(self.result_json) if self.result_json else None
