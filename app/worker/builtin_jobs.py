"""Jobs every worker has, for demos, probes and tests."""

from __future__ import annotations

import time

import anyio
import anyio.from_thread

from app.worker.job_registry import JobRegistry, JobSpec


class JobFailedError(Exception):
    """What `fail` raises."""


async def demo(seconds: float = 0.2, **params: str) -> dict[str, object]:
    """The seed's example job (`grpcurl ... -d '{"id":"job-1","name":"demo"}'`): a short wait."""
    await anyio.sleep(seconds)
    return {"job": "demo", "seconds": seconds, "params": params}


def echo(**params: str) -> dict[str, str]:
    """Return the parameters it was given."""
    return params


async def sleep(seconds: float = 1.0) -> dict[str, float]:
    """Sleep for `seconds` on the event loop, then return them."""
    if seconds < 0:
        raise ValueError("seconds must be 0 or more")
    await anyio.sleep(seconds)
    return {"slept": seconds}


def block(seconds: float = 1.0) -> dict[str, float]:
    """Block a worker thread for `seconds` (stops early when the job is cancelled)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
        anyio.from_thread.check_cancelled()
    return {"blocked": seconds}


def fail(message: str = "failed as asked") -> None:
    """Raise, so that the run ends FAILED with `message`."""
    raise JobFailedError(message)


def builtin_specs() -> list[JobSpec]:
    """The built-in jobs' specs, by name; `echo` and `fail` run on the loop, not in a thread."""
    registry = JobRegistry()
    registry.register(demo)
    registry.register(echo, blocking=False)  # no I/O: cheaper inline than in a thread
    registry.register(sleep)
    registry.register(block)
    registry.register(fail, blocking=False)
    return registry.specs()
