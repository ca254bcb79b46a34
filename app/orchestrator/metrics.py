"""What the orchestrator exposes at /metrics: dispatches, retries, claims, breakers per worker."""

from __future__ import annotations

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from app.core.breaker import BreakerState
from app.grpc.metrics import grpc_metrics
from app.grpc.server import GrpcServer
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.index_trimmer import IndexTrimmer
from app.stores.bad_data import BadData
from app.stores.redis.metrics import redis_metrics
from app.stores.redis.monitor import RedisMonitor
from app.stores.redis.pool import PoolStatistics


def orchestrator_metrics(
    dispatcher: Dispatcher,
    directory: WorkerDirectory,
    server: GrpcServer | None = None,
    bad_data: BadData | None = None,
    monitor: RedisMonitor | None = None,
    trimmer: IndexTrimmer | None = None,
    pool: PoolStatistics | None = None,
) -> list[Metric]:
    """The dispatcher's counters, each known worker's eligibility and breaker, gRPC's counters,
    the junk found in the store, Redis as the monitor sees it and the pool of connections, and
    the job index's trimming."""
    s = dispatcher.statistics()
    jobs = CounterMetricFamily(
        "jobworker_orchestrator_jobs", "Jobs this orchestrator ended", labels=["state"]
    )
    for state, value in (
        ("succeeded", s.succeeded),
        ("failed", s.failed),
        ("timed_out", s.timed_out),
        ("cancelled", s.cancelled),
    ):
        jobs.add_metric([state], value)
    out: list[Metric] = [
        GaugeMetricFamily(
            "jobworker_orchestrator_registry_skipped",
            "Registry entries skipped as no worker's (junk, or no usable address)",
            value=directory.statistics().skipped,
        ),
        GaugeMetricFamily("jobworker_orchestrator_jobs_inflight", "Jobs in hand", value=s.inflight),
        GaugeMetricFamily(
            "jobworker_orchestrator_jobs_waiting_for_worker",
            "Jobs waiting for an eligible worker",
            value=s.waiting_for_worker,
        ),
        jobs,
    ]
    for name, help_, value in (
        ("dispatched", "Attempts sent to a worker", s.dispatched),
        ("retries", "Attempts that were retries", s.retries),
        ("claimed", "Jobs claimed from an orchestrator that stopped", s.claimed),
        ("recovered", "Run outcomes read back from the store (the answer was lost)", s.recovered),
        ("superseded", "Results refused for a superseded fencing token", s.superseded),
        ("followed", "Broken calls followed to a run the worker still listed", s.followed),
        ("consumers_removed", "Stopped orchestrators removed from the queue's consumer group",
         s.consumers_removed),
        ("retry_budget_refused", "Retries the budget held back", s.retry_budget_refused),
        ("queue_recreated", "Times the queue's consumer group was gone and made again",
         s.queue_recreated),
        ("lost", "Jobs whose record vanished in hand (Redis lost them), noted for the check",
         s.lost),
        ("fences_restored", "Fences restored by their holder after Redis went back in time",
         s.fences_restored),
        ("found_on_worker", "Jobs Redis had no run of that a worker had: sent there",
         s.found_on_worker),
        ("copies_out_of_date", "Jobs whose queue entry's copy of the record was out of date"
         " at the first write: taken again from the record", s.copies_out_of_date),
        ("taken_on_submit", "Jobs whose submit here delivered their queue entry to this"
         " orchestrator (no read of the queue)", s.taken_on_submit),
        ("dispatched_on_submit", "Jobs whose submit here made their first attempt too (no"
         " DISPATCHED write)", s.dispatched_on_submit),
        ("store_waits", "Store calls of jobs in hand that waited out a Redis outage",
         s.store_waits),
        ("store_busy", "Store calls of jobs in hand made again after every Redis connection"
         " stayed in use for the pool's wait (load)", s.store_busy),
    ):  # fmt: skip
        out.append(CounterMetricFamily(f"jobworker_orchestrator_{name}", help_, value=value))
    breaker = StateSetMetricFamily(
        "jobworker_orchestrator_breaker_state", "Circuit breaker per worker", labels=["worker"]
    )
    opened = CounterMetricFamily(
        "jobworker_orchestrator_breaker_opened", "Times a breaker opened", labels=["worker"]
    )
    eligible = GaugeMetricFamily(
        "jobworker_orchestrator_worker_eligible", "1 when a worker gets new work", labels=["worker"]
    )
    for entry in directory.entries():
        stats = dispatcher.breaker(entry.address).statistics()
        breaker.add_metric([entry.address], {b.value: b is stats.state for b in BreakerState})
        opened.add_metric([entry.address], stats.opened_count)
        eligible.add_metric([entry.address], int(dispatcher.eligibility(entry) is None))
    if bad_data is not None:
        b = bad_data.statistics()
        found = CounterMetricFamily(
            "jobworker_orchestrator_bad_data",
            "Unreadable items found in the store (each said once in the log)",
            labels=["kind"],
        )
        quarantined = CounterMetricFamily(
            "jobworker_orchestrator_quarantined",
            "Queue entries moved to the quarantine stream",
            labels=["kind"],
        )
        for kind, value in b.found.items():
            found.add_metric([kind], value)
        for kind, value in b.quarantined.items():
            quarantined.add_metric([kind], value)
        out += [found, quarantined]
    if trimmer is not None:
        t = trimmer.statistics()
        out.append(CounterMetricFamily(
            "jobworker_orchestrator_index_trimmed",
            "Job index entries dropped because their record had expired", value=t.trimmed,
        ))  # fmt: skip
    grpc = grpc_metrics(server.statistics()) if server is not None else []
    redis = redis_metrics(monitor.statistics(), pool) if monitor is not None else []
    return [*out, breaker, opened, eligible, *grpc, *redis]
