"""One worker with many jobs is SIGKILLed: every one of its jobs restarts elsewhere within 5 s.

The retry budget exists to stop retry storms when the fleet is sick; moving a dead worker's jobs
to a live one is recovery, and must not be paced by it (the defaults apply here).
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.harness import ChaosFleet, print_report
from tests.helpers import wait_for

pytestmark = pytest.mark.chaos


def test_a_dead_worker_s_jobs_all_restart_elsewhere_at_once(chaos: ChaosFleet) -> None:
    (crowded,) = chaos.add("worker")
    chaos.add("orchestrator")
    # as many as a worker takes (max_size 16): the one that is left has room for all of them
    jobs = [f"dead-{i}" for i in range(16)]
    for job_id in jobs:
        chaos.submit(job_id, seconds=6)
    address = f"127.0.0.1:{crowded.port}"

    def on_crowded() -> list[str]:
        records = chaos.records(jobs)
        return [
            j for j, r in records.items()
            if r and r["state"] in ("DISPATCHED", "RUNNING")
            and r["attempts"][-1]["worker"] == address
        ]  # fmt: skip

    def many_on_crowded() -> list[str] | None:
        held = on_crowded()
        return held if len(held) == len(jobs) else None  # 8 running, 8 queued there

    held = wait_for(many_on_crowded, timeout=30, what="jobs running on the first worker")
    chaos.add("worker")  # somewhere for them to go
    chaos.kill(crowded)
    killed_at = time.time()
    settle = chaos.wait_terminal(jobs, within=40)
    report = chaos.report(jobs, settle)
    records = chaos.records(held)
    moved = [
        r["attempts"][1]["started_at"] - killed_at
        for r in records.values() if r and len(r["attempts"]) > 1
    ]  # fmt: skip
    report.notes.append(
        f"{len(held)} jobs on the killed worker; their next attempt started "
        f"{min(moved, default=0):.2f}..{max(moved, default=0):.2f}s after the kill"
    )
    print_report("one worker with many jobs killed", report)
    assert report.lost == []
    assert report.completed_twice == []
    assert len(moved) == len(held)
    assert max(moved) <= 5.0
