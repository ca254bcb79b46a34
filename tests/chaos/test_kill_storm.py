"""Kill storm: workers and orchestrators SIGKILLed or frozen (SIGSTOP, then SIGCONT) at random,
and restarted, while jobs flow.

Every job must end (lost = 0) and all must be terminal within 30 s of the last fault. A job whose
run was killed mid-way may run once more (the ledger shows a `start` without a `done`). A frozen
worker cannot be told from a dead one: its jobs start again elsewhere, and a frozen run that
completes after it resumes (before the worker notices it was away and stops it) is a repeat the
fleet explains with an attempt recorded as lost. No other repeat is allowed.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.harness import ChaosFleet, print_report

pytestmark = pytest.mark.chaos


def test_kill_storm(chaos: ChaosFleet) -> None:
    chaos.add("worker", 3)
    chaos.add("orchestrator", 2)
    jobs = [f"storm-{i}" for i in range(150)]
    storm = chaos.storm(
        seconds=15, every=(1.0, 2.5), down=(0.3, 1.0), stop_rather_than_kill=0.3,
        stopped=(0.5, 4.0),
    )  # fmt: skip
    for job_id in jobs:
        chaos.submit(job_id, seconds=chaos.rng.uniform(0.2, 2.0))
        time.sleep(0.1)
    storm.join()
    settle = chaos.wait_terminal(jobs, within=30)
    report = chaos.report(jobs, settle)
    print_report("kill storm", report)
    assert report.faults >= 5
    assert report.lost == []
    assert report.unexplained_repeats == []
    assert report.settle_seconds <= 30
