"""Kill storm: workers, orchestrators and trigger replicas SIGKILLed or frozen (SIGSTOP, then
SIGCONT) at random, and restarted, while jobs flow (submitted by a client and by a schedule).

Every job must end (lost = 0) and all must be terminal within 30 s of the last fault. A job whose
run was killed mid-way may run once more (the ledger shows a `start` without a `done`). A frozen
worker cannot be told from a dead one: its jobs start again elsewhere, and a frozen run that
completes after it resumes (before the worker notices it was away and stops it) is a repeat the
fleet explains with an attempt recorded as lost. No other repeat is allowed.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.harness import ChaosFleet, print_report, trigger_report

pytestmark = pytest.mark.chaos


def test_kill_storm(chaos: ChaosFleet) -> None:
    chaos.add("worker", 3)
    chaos.add("orchestrator", 2)
    # two trigger replicas submit a tick every second through the same storm
    chaos.declare_schedules(
        '[[schedules]]\nname = "storm-tick"\njob_type = "work"\ninterval_seconds = 1\n'
        'params = { seconds = "0.3" }\noverlap = "allow"\nmisfire_grace_seconds = 20\n'
    )
    chaos.add("trigger", 2)
    jobs = [f"storm-{i}" for i in range(150)]
    storm = chaos.storm(
        seconds=15, every=(1.0, 2.5), down=(0.3, 1.0), stop_rather_than_kill=0.3,
        stopped=(0.5, 4.0), roles=("worker", "orchestrator", "trigger"),
    )  # fmt: skip
    for i, job_id in enumerate(jobs):
        chaos.submit(job_id, seconds=chaos.rng.uniform(0.2, 2.0))
        time.sleep(0.1)
        owner = chaos.trigger_owner("storm-tick") if i in (40, 100) else None
        if owner is not None:  # the storm may miss it: the schedule's replica is killed too
            chaos.kill(owner)
            chaos.restart(owner)
    storm.join()
    time.sleep(2)  # a take-over after the last fault decides its ticks
    ticks = trigger_report(chaos, "storm-tick")
    settle = chaos.wait_terminal(jobs + ticks.job_ids, within=30)
    report = chaos.report(jobs + ticks.job_ids, settle)
    print_report("kill storm", report)
    for line in ticks.lines():
        print(f"   {line}")
    assert report.faults >= 5
    assert report.lost == []
    assert report.unexplained_repeats == []
    assert report.settle_seconds <= 30
    # every fire time of the schedule decided once, and (within the grace) run
    assert ticks.fire_times >= 15
    assert (ticks.undecided, ticks.decided_twice) == ([], [])
    assert dict(ticks.decisions) == {"fired": ticks.fire_times}
