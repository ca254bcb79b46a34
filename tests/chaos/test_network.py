"""Network faults between an orchestrator and a worker that is alive: no job runs twice.

A worker sits behind fault proxies (one for its gRPC port, one for its way to Redis) with four
jobs running on it, and a second worker stands by. Then the network breaks one way: a black
hole, a 2 s delay, a reset of every connection, or a partition between the worker and Redis
only. The worker never dies, so each job must run once, there, and end SUCCEEDED: the broken
calls are followed (the worker's report still lists its runs), or kept (it answers although its
report is stale).

A frozen worker (SIGSTOP) is the other side of the same coin: nobody can tell it from a dead
one, so its jobs start again elsewhere; once it is resumed it notices that it was away and stops
those runs of its own, which therefore never complete.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.chaos.harness import ChaosFleet, Slot, print_report
from tests.helpers import wait_for

pytestmark = pytest.mark.chaos

JOBS = 4
JOB_SECONDS = 6.0


def _running_on(chaos: ChaosFleet, slot: Slot, jobs: list[str]) -> None:
    def all_there() -> bool:
        records = chaos.records(jobs)
        return all(
            r is not None
            and r["state"] == "RUNNING"
            and r["attempts"][-1]["worker"] == slot.address
            for r in records.values()
        )

    wait_for(all_there, timeout=20, what=f"{jobs} running on {slot.address}")


def _black_hole(slot: Slot) -> Callable[[], None]:
    assert slot.grpc_proxy is not None
    slot.grpc_proxy.black_hole()
    return slot.grpc_proxy.heal


def _delay(slot: Slot) -> Callable[[], None]:
    assert slot.grpc_proxy is not None
    slot.grpc_proxy.delay(2.0)
    return slot.grpc_proxy.heal


def _reset(slot: Slot) -> Callable[[], None]:
    assert slot.grpc_proxy is not None
    slot.grpc_proxy.reset()
    return lambda: None


def _cut_from_redis(slot: Slot) -> Callable[[], None]:
    assert slot.redis_proxy is not None
    slot.redis_proxy.black_hole()
    return slot.redis_proxy.heal


@pytest.mark.parametrize(
    ("fault", "lasts"),
    [(_black_hole, 4.0), (_delay, 4.0), (_reset, 0.0), (_cut_from_redis, 4.0)],
    ids=["black-hole", "delay-2s", "reset", "cut-from-redis"],
)
def test_a_network_fault_never_runs_a_job_twice(
    chaos: ChaosFleet, fault: Callable[[Slot], Callable[[], None]], lasts: float
) -> None:
    (victim,) = chaos.add("worker", proxied=True)
    chaos.add("orchestrator")
    jobs = [f"net-{i}" for i in range(JOBS)]
    for job_id in jobs:
        chaos.submit(job_id, seconds=JOB_SECONDS)
    _running_on(chaos, victim, jobs)
    (spare,) = chaos.add("worker")  # somewhere a second copy could go
    chaos.wait_known(spare)
    heal = fault(victim)
    chaos.fault()
    time.sleep(lasts)  # the fault lasts this long: longer than the keepalive and the stale age
    heal()
    chaos.healed()
    settle = chaos.wait_terminal(jobs, within=30)
    report = chaos.report(jobs, settle)
    print_report(f"network: {fault.__name__.strip('_')}", report)
    assert report.lost == []
    assert report.completed_twice == []
    assert chaos.states(jobs) == dict.fromkeys(jobs, "SUCCEEDED")
    assert victim.process is not None
    ran_on = {(line.key, line.pid) for line in chaos.ledger_lines()}
    assert ran_on == {(job_id, victim.process.pid) for job_id in jobs}  # there, and only there
    assert "Traceback" not in victim.process.log()


def test_a_frozen_worker_s_jobs_move_and_its_runs_stop_when_it_resumes(chaos: ChaosFleet) -> None:
    (frozen,) = chaos.add("worker")
    chaos.add("orchestrator")
    jobs = [f"frozen-{i}" for i in range(JOBS)]
    for job_id in jobs:
        chaos.submit(job_id, seconds=12.0)
    _running_on(chaos, frozen, jobs)
    (spare,) = chaos.add("worker")
    chaos.wait_known(spare)
    assert frozen.process is not None
    assert spare.process is not None
    chaos.kill(frozen, signal.SIGSTOP)
    wait_for(
        lambda: all(r and r["attempts"][-1]["worker"] == spare.address
                    for r in chaos.records(jobs).values()),
        timeout=20, what="the frozen worker's jobs restarted elsewhere",
    )  # fmt: skip
    frozen.process.signal(signal.SIGCONT)
    chaos.healed()
    frozen.process.wait_log(r"stopped: superseded", timeout=15)
    settle = chaos.wait_terminal(jobs, within=30)
    report = chaos.report(jobs, settle)
    print_report("frozen worker", report)
    assert report.lost == []
    assert report.completed_twice == []  # the frozen copies were stopped before they ended
    records = chaos.records(jobs)
    for job_id in jobs:
        record = records[job_id]
        assert record is not None
        assert record["state"] == "SUCCEEDED"
        assert [a["outcome"] for a in record["attempts"]] == ["LOST", "SUCCEEDED"]
    dones = [line for line in chaos.ledger_lines() if line.kind == "done"]
    assert {line.pid for line in dones} == {spare.process.pid}
    assert frozen.process.log().count("stopped: superseded") == JOBS
