"""Load alone, on the default settings: many clients submitting at once must not make the fleet
lose, repeat or fail a job (an error of ours is never blamed on a worker, and never re-runs a
job that is running or done), nor take itself for Redis being away (tests/chaos/
test_defaults_under_load.py: more clients, each on a connection of its own, and Execute)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.chaos.harness import ChaosFleet, print_report

pytestmark = pytest.mark.chaos

CLIENTS = 64
JOBS = 3200


def test_many_clients_on_the_default_settings(chaos: ChaosFleet) -> None:
    chaos.defaults = True
    chaos.add("worker", 2)
    chaos.add("orchestrator")
    jobs = [f"load-{i}" for i in range(JOBS)]
    errors: list[BaseException] = []

    def client(share: list[str]) -> None:
        try:
            for job_id in share:
                chaos.submit(job_id, seconds=0.0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=client, args=(jobs[i::CLIENTS],), name=f"client {i}")
        for i in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    settle = chaos.wait_terminal(jobs, within=120)
    report = chaos.report(jobs, settle)
    print_report("load on the defaults", report)
    assert report.lost == []
    assert report.completed_twice == []
    assert dict(report.terminal) == {"SUCCEEDED": JOBS}
    attempts = Counter(
        "/".join(a["outcome"] for a in (record or {}).get("attempts", []))
        for record in chaos.records(jobs).values()
    )
    assert attempts == {"SUCCEEDED": JOBS}  # none against a worker: one attempt each
    for slot in chaos.slots:
        assert slot.process is not None
        assert "Traceback" not in slot.process.log()
        # a full pool of Redis connections once read as an outage (issue 12)
        assert " unreachable" not in slot.process.log()
