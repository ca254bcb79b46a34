"""job-worker-app: a gRPC job worker and batch fleet on structured concurrency.

The names a job author needs are here: `from app import job` (see `app.worker.job_registry`) and
`current_run` (its run's fencing token: `app.worker.run_context`). They are imported on first
use, so that importing the kernel does not import the worker.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.worker.job_registry import job as job
    from app.worker.run_context import current_run as current_run

try:
    __version__ = version("job-worker-app")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "job":
        from app.worker.job_registry import job

        return job
    if name == "current_run":
        from app.worker.run_context import current_run

        return current_run
    raise AttributeError(f"module 'app' has no attribute {name!r}")
