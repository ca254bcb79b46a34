"""The job the chaos scenarios run: it writes to a shared ledger when it starts and when it ends.

A run that is killed leaves a `start` line without a `done` line; a run that completed twice
leaves two `done` lines. Each line carries the run's pid and fencing token (`current_run()`), so
that a repeat can be matched with the attempt that the fleet recorded for it. Lines are appended
with one `os.write` on an O_APPEND file, which the kernel keeps whole between processes.
"""

from __future__ import annotations

import os

import anyio

from app import current_run, job

LEDGER = os.environ.get("CHAOS_LEDGER", os.devnull)


def _note(kind: str, key: str) -> None:
    token = current_run().fencing_token
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {key} {os.getpid()} {token}\n".encode())
    finally:
        os.close(fd)


@job
async def work(key: str = "", seconds: float = 0.5) -> dict[str, str]:
    """Note the start, sleep `seconds`, note the end. `key` defaults to the job id (a trigger's
    schedule submits the same parameters at every fire time)."""
    key = key or current_run().job_id
    _note("start", key)
    await anyio.sleep(seconds)
    _note("done", key)
    return {"key": key}
