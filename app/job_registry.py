"""Where job authors have imported `job` from since the first release; `from app import job` is
the short spelling. The registry itself is the worker's: `app.worker.job_registry`."""

from __future__ import annotations

from app.worker.job_registry import JobRegistry, JobSpec, job

__all__ = ["JobRegistry", "JobSpec", "job"]
