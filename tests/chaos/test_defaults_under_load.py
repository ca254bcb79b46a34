"""Issue 12, point 1: the shipped defaults hold under load alone. Many clients at once, each on a
connection of its own, Submit and Execute through one orchestrator to two workers, every process
on its defaults: no call fails, every job SUCCEEDED once on its first attempt, health never
leaves SERVING, and no process logs a traceback.

And the pool those defaults size: a small one (set by config) makes calls wait for a connection
rather than fail; a wait that times out is refused as busy (RESOURCE_EXHAUSTED with a
retry-after), not taken for Redis being away, and never blamed on a worker.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.chaos.harness import ChaosFleet, Slot, print_report
from tests.chaos.load import HealthWatch, LoadResult, run_load
from tests.helpers import scrape

pytestmark = pytest.mark.chaos


def check_every_job_succeeded_once(chaos: ChaosFleet, result: LoadResult) -> None:
    """Every job SUCCEEDED, on one attempt that SUCCEEDED (none recorded against a worker as
    UNREACHABLE, REFUSED or LOST), and ran to its end once."""
    jobs = result.job_ids
    assert len(set(jobs)) == len(jobs)
    settle = chaos.wait_terminal(jobs, within=90)
    report = chaos.report(jobs, settle)
    print_report(f"{result.clients} clients on the defaults", report)
    assert report.lost == []
    assert dict(report.terminal) == {"SUCCEEDED": len(jobs)}
    assert report.completed_twice == []
    attempts = Counter(
        "/".join(a["outcome"] for a in (record or {}).get("attempts", []))
        for record in chaos.records(jobs).values()
    )
    assert attempts == {"SUCCEEDED": len(jobs)}
    assert chaos.ledger_done() >= set(jobs)


def check_logs(chaos: ChaosFleet) -> None:
    assert chaos.tracebacks() == {}
    for name, text in chaos.logs().items():
        assert " unreachable" not in text, name  # no outage was said: there was none
        assert "WARNING" not in text, name
        assert "ERROR" not in text, name


def test_256_submits_and_256_executes_at_once_on_the_defaults(chaos: ChaosFleet) -> None:
    chaos.defaults = True
    chaos.add("worker", 2)
    chaos.add("orchestrator")
    with HealthWatch(chaos) as health:
        result = run_load(chaos, submit_clients=256, execute_clients=256, jobs_per_client=4)
    for line in result.lines():
        print(line)
    assert result.errors == {}, result.error_examples
    assert result.not_succeeded == []
    assert health.checks > 0
    assert health.not_serving == [], health.not_serving
    check_every_job_succeeded_once(chaos, result)
    check_logs(chaos)


def test_a_thousand_clients_at_once_on_the_defaults(chaos: ChaosFleet) -> None:
    chaos.defaults = True
    chaos.add("worker", 2)
    chaos.add("orchestrator")
    with HealthWatch(chaos) as health:
        result = run_load(chaos, submit_clients=500, execute_clients=500, jobs_per_client=1)
    for line in result.lines():
        print(line)
    assert result.errors == {}, result.error_examples
    assert result.not_succeeded == []
    assert health.not_serving == [], health.not_serving
    check_every_job_succeeded_once(chaos, result)
    check_logs(chaos)


def pool_counters(chaos: ChaosFleet, slot: Slot) -> tuple[float, float]:
    """The slot's pool waits and timed-out waits so far, from its /metrics."""
    metrics = scrape(chaos.http_port(slot))
    return (
        metrics[("jobworker_redis_pool_waits_total", frozenset())],
        metrics[("jobworker_redis_pool_exhausted_total", frozenset())],
    )


def test_a_full_pool_makes_calls_wait_not_fail(chaos: ChaosFleet) -> None:
    chaos.defaults = True
    chaos.extra_env = {"JOBWORKER_REDIS__MAX_CONNECTIONS": "2", "JOBWORKER_METRICS__PORT": "0"}
    chaos.add("worker")
    (orchestrator,) = chaos.add("orchestrator")
    with HealthWatch(chaos) as health:
        result = run_load(chaos, submit_clients=100, execute_clients=100, jobs_per_client=2)
    print(*result.lines(), sep="\n")
    assert result.errors == {}, result.error_examples
    assert health.not_serving == [], health.not_serving
    check_every_job_succeeded_once(chaos, result)
    check_logs(chaos)
    waits, exhausted = pool_counters(chaos, orchestrator)
    assert waits > 0  # the pool was full, and calls waited for a connection
    assert exhausted == 0


def test_a_pool_wait_that_times_out_is_busy_not_an_outage(chaos: ChaosFleet) -> None:
    chaos.defaults = True
    chaos.add("worker")
    chaos.extra_env = {
        "JOBWORKER_REDIS__MAX_CONNECTIONS": "3",
        "JOBWORKER_REDIS__POOL_TIMEOUT_SECONDS": "0.005",
        "JOBWORKER_METRICS__PORT": "0",
    }
    (orchestrator,) = chaos.add("orchestrator")
    with HealthWatch(chaos) as health:
        result = run_load(
            chaos, submit_clients=40, execute_clients=10, jobs_per_client=1, retry_exhausted=True
        )
    print(*result.lines(), sep="\n")
    # refused as busy, with a retry-after that the clients honoured; nothing else
    assert result.errors == {}, result.error_examples
    assert result.retried > 0
    assert health.not_serving == [], health.not_serving
    check_every_job_succeeded_once(chaos, result)
    check_logs(chaos)
    _, exhausted = pool_counters(chaos, orchestrator)
    assert exhausted > 0
    metrics = scrape(chaos.http_port(orchestrator))
    assert metrics[("jobworker_redis_outages_total", frozenset())] == 0
    assert metrics[("jobworker_redis_up", frozenset())] == 1
