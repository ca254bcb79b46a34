"""Redis faults while jobs flow (2 workers, 2 orchestrators, real processes, a private Redis).

- restarted with its AOF (SIGTERM; SIGKILL with appendfsync everysec and always): nothing lost,
  nothing completed twice, no worker blamed for it;
- restarted empty: every process says once that Redis lost its data, the orchestrators recreate
  the queue's group and go on serving new work, and every job Redis forgot is listed by the
  operators' check (`jobworker lost`) or, at worst, was never taken by anyone (see below);
- failed over to a replica (Redis Sentinel: master, replica, 3 sentinels; the master SIGKILLed):
  nothing lost, nothing completed twice, every process finds the new master by itself;
- during each outage: Submit answers UNAVAILABLE with a retry-after, health is NOT_SERVING and
  /readyz 503, and back to SERVING after; no traceback reaches any process's log.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from tests.chaos.harness import TERMINAL, ChaosFleet, Report, SentinelRedis, Slot, print_report
from tests.helpers import ROOT, scrape, wait_for

pytestmark = pytest.mark.chaos

OUTAGE_SECONDS = 3.0


def start_fleet(chaos: ChaosFleet, *redis_args: str, sentinel: bool = False) -> Slot:
    """Redis (again) with `redis_args` (or a master, a replica and 3 sentinels), then 2 workers
    and 2 orchestrators; one orchestrator."""
    chaos.redis.stop()
    if sentinel:
        chaos.redis = SentinelRedis(chaos.tmp / "sentinel")
        chaos.redis.start()
        chaos.redis_env = chaos.redis.env()
    else:
        chaos.start_redis(*redis_args)
    chaos.extra_env = {
        **chaos.extra_env,
        "JOBWORKER_METRICS__PORT": "0",
        "JOBWORKER_REDIS__CHECK_INTERVAL_SECONDS": "0.5",
    }
    chaos.add("worker", 2)
    orchestrator, _ = chaos.add("orchestrator", 2)
    return orchestrator


def submit_in_background(
    chaos: ChaosFleet, jobs: list[str], *, rate: float, seconds: tuple[float, float]
) -> threading.Thread:
    """Submit `jobs` at `rate` a second from a thread (each retried until accepted)."""

    def run() -> None:
        for job_id in jobs:
            if chaos.stopping.wait(1 / rate):
                return
            chaos.submit(job_id, seconds=chaos.rng.uniform(*seconds))

    return chaos.in_background(run, "submitter")


def readyz(chaos: ChaosFleet, slot: Slot) -> tuple[int, str]:
    url = f"http://127.0.0.1:{chaos.http_port(slot)}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def probe_outage(chaos: ChaosFleet, orchestrator: Slot) -> list[str]:
    """While Redis is down: health, /readyz and a Submit, as a client and a balancer see them."""
    wait_for(lambda: chaos.health(orchestrator) == "NOT_SERVING", timeout=10,
             what="health NOT_SERVING")  # fmt: skip
    noticed = time.monotonic() - chaos.last_fault
    status, body = readyz(chaos, orchestrator)
    assert status == 503, body
    assert "unreachable" in body
    request = chaos.orch.pb2.BatchExecutionRequest(job_id="probe", job_type="work")
    with pytest.raises(grpc.RpcError) as refused:
        chaos._stub(orchestrator).Submit(request, timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value
    details = refused.value.details() or ""
    assert "retry after" in details
    return [f"during the outage: health NOT_SERVING {noticed:.1f}s after the fault, "
            f"/readyz {status} {body!r}",
            f"   Submit {refused.value.code().name}: {details}"]  # fmt: skip


def probe_recovered(chaos: ChaosFleet, orchestrator: Slot) -> str:
    """SERVING and ready again once Redis is back; how long that took, as a note."""
    wait_for(lambda: chaos.health(orchestrator) == "SERVING", timeout=10, what="SERVING again")
    back = time.monotonic() - chaos.last_fault
    assert readyz(chaos, orchestrator) == (200, "ready")
    return f"health SERVING again {back:.1f}s after Redis was back"


def blamed_workers(chaos: ChaosFleet, jobs: list[str]) -> list[str]:
    """Attempts that ended as if their worker had failed (unreachable, lost): none did."""
    return [
        f"{job_id}#{attempt['number']} {attempt['outcome']}"
        for job_id, record in chaos.records(jobs).items() if record
        for attempt in record["attempts"] if attempt["outcome"] in ("UNREACHABLE", "LOST")
    ]  # fmt: skip


def check_logs(chaos: ChaosFleet, report: Report) -> None:
    tracebacks = chaos.tracebacks()
    report.notes.append(f"log files with a traceback: {tracebacks or 'none'}")
    assert tracebacks == {}


@pytest.mark.parametrize(
    ("signum", "fsync"),
    [(signal.SIGTERM, "everysec"), (signal.SIGKILL, "everysec"), (signal.SIGKILL, "always")],
    ids=["sigterm-everysec", "sigkill-everysec", "sigkill-always"],
)
def test_redis_restarted_with_aof(chaos: ChaosFleet, signum: int, fsync: str) -> None:
    orchestrator = start_fleet(chaos, "--appendonly", "yes", "--appendfsync", fsync)
    jobs = [f"aof-{i}" for i in range(120)]
    submitter = submit_in_background(chaos, jobs, rate=8, seconds=(0.2, 1.5))
    time.sleep(5)  # mid-load: ~40 submitted, many running
    chaos.redis_down(signum)
    down_at = time.monotonic()
    notes = probe_outage(chaos, orchestrator)
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    chaos.redis_up()
    notes.append(probe_recovered(chaos, orchestrator))
    submitter.join()
    settle = chaos.wait_terminal(jobs, within=60)
    report = chaos.report(jobs, settle)
    blamed = blamed_workers(chaos, jobs)
    report.notes += [*notes, f"attempts blamed on a worker: {len(blamed)} {blamed[:5]}"]
    check_logs(chaos, report)
    print_report(f"Redis restarted with AOF ({signal.Signals(signum).name}, {fsync})", report)
    assert report.lost == []
    assert report.completed_twice == []
    assert report.rerun_after_kill == []  # no run was cut off: none had to run again
    assert blamed == []
    assert report.settle_seconds <= 30
    metrics = scrape(chaos.http_port(orchestrator))
    assert metrics[("jobworker_redis_outages_total", frozenset())] == 1
    assert metrics[("jobworker_redis_data_losses_total", frozenset())] == 0
    # nothing acknowledged was lost, SIGKILL or not: no process saw the heartbeat fall
    assert metrics[("jobworker_redis_went_back_total", frozenset())] == 0
    for name, text in chaos.logs().items():
        assert "went back in time" not in text, name


def lost_check(chaos: ChaosFleet) -> tuple[int, list[dict[str, Any]]]:
    """`jobworker lost --json` against the fleet's Redis: its exit status and its lines."""
    env = chaos.env(Slot(role="orchestrator", port=0))  # its config: the same Redis and keys
    done = subprocess.run(
        [sys.executable, "-m", "app", "lost", "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_redis_restarted_empty(chaos: ChaosFleet) -> None:
    orchestrator = start_fleet(chaos)  # no AOF, no RDB: a restart loses everything
    before = [f"before-{i}" for i in range(60)]
    submitter = submit_in_background(chaos, before, rate=8, seconds=(0.5, 2.5))
    time.sleep(5)
    chaos.redis_down(signal.SIGKILL)
    down_at = time.monotonic()
    done_before = chaos.ledger_done()  # their records go, but they had ended: not lost work
    notes = probe_outage(chaos, orchestrator)
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    chaos.redis_up(empty=True)
    notes.append(probe_recovered(chaos, orchestrator))
    submitter.join()  # the rest of `before` goes to the empty Redis
    after = [f"after-{i}" for i in range(40)]
    for job_id in after:
        chaos.submit(job_id, seconds=0.2)
    settle = chaos.wait_terminal(after, within=60)

    # every unfinished job Redis forgot ends: noted lost by the orchestrator that held it
    def accounted() -> tuple[set[str], set[str]] | None:
        status, lines = lost_check(chaos)
        lost = {line["job_id"] for line in lines}
        assert status == (1 if lost else 0)
        forgotten = {j for j, s in chaos.states(before).items() if s == "MISSING"} - done_before
        # a job that was taken (by XREADGROUP) in the instant Redis died, reply unread, is held
        # by nobody: one such in a run is possible, more would mean jobs are stuck
        return (forgotten, lost) if len(forgotten - lost) <= 1 else None

    forgotten, lost = wait_for(accounted, timeout=30, what="every forgotten job noted lost")
    report = chaos.report(after, settle)
    report.submitted += len(before)
    report.notes += [
        *notes,
        f"before the restart: {len(before)} submitted, {len(done_before)} had ended (their "
        f"records are gone too), {len(forgotten)} unfinished forgotten by Redis, {len(lost)} "
        f"listed by `jobworker lost`, {len(forgotten - lost)} untraceable",
        f"after the restart: {len(after)} submitted, "
        f"{sum(s == 'SUCCEEDED' for s in chaos.states(after).values())} succeeded",
    ]
    check_logs(chaos, report)
    print_report("Redis restarted empty", report)
    assert lost <= forgotten  # only unfinished jobs really gone are listed
    assert forgotten  # the scenario did lose some: jobs were in hand when it restarted
    assert report.lost == []  # jobs submitted after the restart all ended ...
    assert set(chaos.states(after).values()) == {"SUCCEEDED"}  # ... and ran
    assert report.completed_twice == []
    for name, text in chaos.logs().items():  # every process noticed, and said so once
        assert text.count("Redis lost its data: its epoch marker") == 1, name
        if name.startswith("orchestrator"):
            assert text.count("consumer group was gone") == 1, name
    metrics = scrape(chaos.http_port(orchestrator))  # and counts it
    assert metrics[("jobworker_redis_data_losses_total", frozenset())] == 1
    assert metrics[("jobworker_orchestrator_queue_recreated_total", frozenset())] == 1
    assert metrics[("jobworker_redis_up", frozenset())] == 1


def test_redis_failed_over_to_a_replica(chaos: ChaosFleet) -> None:
    orchestrator = start_fleet(chaos, sentinel=True)
    group = chaos.redis
    assert isinstance(group, SentinelRedis)
    jobs = [f"failover-{i}" for i in range(120)]
    submitter = submit_in_background(chaos, jobs, rate=8, seconds=(0.2, 1.5))
    time.sleep(5)
    killed = group.kill_master()
    chaos.note_fault()
    killed_at = time.monotonic()
    wait_for(lambda: group.master_port() not in (None, killed.port), timeout=30,
             what="the sentinels to promote the replica")  # fmt: skip
    promoted_after = time.monotonic() - killed_at
    chaos.note_fault()  # the fault ends when there is a master again
    chaos.faults -= 1
    back = probe_recovered(chaos, orchestrator)
    submitter.join()
    settle = chaos.wait_terminal(jobs, within=60)
    report = chaos.report(jobs, settle)
    blamed = blamed_workers(chaos, jobs)
    outages = sum(text.count("unreachable (") for text in chaos.logs("orchestrator").values())
    report.notes += [
        f"master SIGKILLed; the sentinels promoted the replica {promoted_after:.1f}s later; {back}",
        f"orchestrators that saw Redis unreachable meanwhile: {outages} outage line(s)",
        f"attempts blamed on a worker: {len(blamed)} {blamed[:5]}",
    ]
    check_logs(chaos, report)
    print_report("Redis failed over to its replica (Sentinel)", report)
    assert report.lost == []
    assert report.completed_twice == []
    assert report.rerun_after_kill == []
    assert blamed == []
    assert report.settle_seconds <= 30
    # The replica had the data of every Submit that was answered OK: none of those is noted
    # lost. Replication is asynchronous, though: a submit the master ran just before its kill,
    # whose reply never came (the client got an error and submitted again), may be missing on
    # the replica, and an orchestrator that had read its entry notes it lost, truly: Redis
    # forgot it. Only such a job may be noted, and it ran after its new submit (terminal above).
    for name, text in chaos.logs().items():
        noted = set(re.findall(r"job (\S+) lost: ", text))
        unexplained = sorted(j for j in noted if not chaos.submit_errors[j])
        assert not unexplained, f"{name}: noted lost after an OK Submit: {unexplained}"
        assert "Redis lost its data" not in text or noted, name


def test_redis_lost_its_last_second(chaos: ChaosFleet) -> None:
    """What a machine that lost power does to Redis with `appendfsync everysec`: the AOF's last
    second is gone (cut at its `#TS:` mark). Jobs submitted in that second are forgotten, and
    listed by the check; jobs whose last writes went are finished by their holder (which
    restores their fence) or by whoever claims them, which asks the workers first and goes to
    the one that ran it: none runs again."""
    # few slots: jobs queue up, and the lost second holds dispatches of jobs submitted earlier
    chaos.extra_env = {"JOBWORKER_WORKER__CORE_SIZE": "3", "JOBWORKER_WORKER__MAX_SIZE": "3"}
    orchestrator = start_fleet(
        chaos, "--appendonly", "yes", "--appendfsync", "everysec", "--aof-timestamp-enabled", "yes"
    )
    jobs = [f"cut-{i}" for i in range(120)]
    submitter = submit_in_background(chaos, jobs, rate=8, seconds=(0.2, 1.5))
    time.sleep(5)
    chaos.redis_down(signal.SIGKILL)
    down_at = time.monotonic()
    cut = chaos.cut_aof(seconds=1.0, before=time.time())
    notes = probe_outage(chaos, orchestrator)
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
    chaos.redis_up()
    notes.append(probe_recovered(chaos, orchestrator))
    submitter.join()

    left: dict[str, Any] = {}

    def settled() -> tuple[set[str], set[str]] | None:
        records = chaos.records(jobs)
        _, lines = lost_check(chaos)
        lost = {line["job_id"] for line in lines}
        # a job that was submitted, run and ended all within the lost second left no trace but
        # its run (its record is gone, its work done): not lost work, and nobody holds it
        done = chaos.ledger_done()
        left.clear()
        left.update({j: r for j, r in records.items() if j not in lost
                     and ((r is None and j not in done) or (r is not None
                          and r["state"] not in TERMINAL))})  # fmt: skip
        return ({j for j, r in records.items() if r is None}, lost) if not left else None

    try:
        forgotten, lost = wait_for(settled, timeout=60, what="every job terminal or noted lost")
    except AssertionError:
        raise AssertionError(f"neither terminal nor noted lost: {left}") from None
    report = chaos.report(jobs, time.monotonic() - chaos.last_fault)
    blamed = blamed_workers(chaos, jobs)
    logs = chaos.logs("orchestrator").values()
    restored = sum(text.count("restored it") for text in logs)
    found = sum(text.count("Redis had no trace of it") for text in logs)
    report.notes += [
        *notes,
        f"AOF cut by {cut} bytes (the last second); {len(forgotten)} jobs forgotten: "
        f"{len(lost)} listed by `jobworker lost`, {len(forgotten - lost)} had run to their end",
        f"fences restored by their holders: {restored}; jobs sent to the worker that had run "
        f"them unrecorded: {found}",
        f"attempts blamed on a worker: {len(blamed)} {blamed[:5]}",
    ]
    check_logs(chaos, report)
    print_report("Redis lost its last second (AOF cut, as a power loss with everysec)", report)
    assert cut > 0
    assert set(report.lost) == forgotten  # the only jobs that did not end are those forgotten
    assert lost <= forgotten  # only jobs really gone are listed
    assert forgotten - lost <= chaos.ledger_done()  # and those not listed had ended
    assert report.completed_twice == []
    assert report.rerun_after_kill == []
    assert blamed == []
    for name, text in chaos.logs().items():  # every process noticed, and said so once
        assert text.count("Redis went back in time") == 1, name
