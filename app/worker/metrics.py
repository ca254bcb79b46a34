"""What the worker exposes at /metrics: the job master's load and outcomes, the registry."""

from __future__ import annotations

import msgspec
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from app.fleet.pod_info import PodStatus
from app.grpc.metrics import grpc_metrics
from app.grpc.server import GrpcServer
from app.stores.redis.metrics import redis_metrics
from app.stores.redis.monitor import RedisMonitor
from app.stores.redis.pool import PoolStatistics
from app.worker.job_master import JobMaster
from app.worker.reporter import ApplicationInfoReportJob


def worker_metrics(
    job_master: JobMaster,
    report: ApplicationInfoReportJob | None,
    server: GrpcServer | None = None,
    monitor: RedisMonitor | None = None,
    pool: PoolStatistics | None = None,
) -> list[Metric]:
    """The job master's load and counters, the registry's health, the gRPC server's counters,
    Redis as the monitor sees it, and the pool of connections."""
    s = job_master.statistics()
    load = s.load
    out: list[Metric] = [
        GaugeMetricFamily("jobworker_jobs_active", "Jobs running now", value=load.active),
        GaugeMetricFamily("jobworker_jobs_queued", "Jobs waiting for a token", value=load.queued),
        GaugeMetricFamily("jobworker_capacity", "The limiter's tokens now", value=load.capacity),
        GaugeMetricFamily("jobworker_max_size", "The limiter's most tokens", value=load.max_size),
    ]
    status = StateSetMetricFamily("jobworker_status", "IDLE, BUSY or DRAINING")
    status.add_metric([], {p.value: p is load.status for p in PodStatus})
    jobs = CounterMetricFamily(
        "jobworker_jobs", "Jobs by how admission or the run ended", labels=["outcome"]
    )
    for outcome, value in msgspec.structs.asdict(s.jobs).items():
        jobs.add_metric([outcome], value)
    out += [status, jobs]
    if report is not None:
        out.append(
            GaugeMetricFamily(
                "jobworker_registry_connected", "PodInfo reaches Redis", value=int(report.connected)
            )
        )
        out.append(
            CounterMetricFamily(
                "jobworker_registry_failures", "Failed PodInfo writes", value=report.failures
            )
        )
    if server is not None:
        out += grpc_metrics(server.statistics())
    if monitor is not None:
        out += redis_metrics(monitor.statistics(), pool)
    return out
