"""What a trigger replica exposes at /metrics: decisions by kind, misses by cause, leases."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.grpc.metrics import grpc_metrics
from app.grpc.server import GrpcServer
from app.stores.bad_data import BadData
from app.trigger.replica import TriggerReplica


def trigger_metrics(
    replica: TriggerReplica, server: GrpcServer | None = None, bad_data: BadData | None = None
) -> list[Metric]:
    """This replica's decisions, misses, submits and leases; gRPC's counters."""
    s = replica.statistics()
    decided = CounterMetricFamily(
        "jobworker_trigger_decisions",
        "Fire times this replica decided, by what became of them",
        labels=["kind"],
    )
    for kind, value in s.decided.items():
        decided.add_metric([kind], value)
    missed = CounterMetricFamily(
        "jobworker_trigger_missed",
        "Fire times this replica recorded as missed, by why (never silently lost)",
        labels=["cause"],
    )
    for cause, value in s.missed.items():
        missed.add_metric([cause], value)
    out: list[Metric] = [
        decided,
        missed,
        GaugeMetricFamily(
            "jobworker_trigger_schedules", "Schedules in the store", value=s.schedules
        ),
        GaugeMetricFamily(
            "jobworker_trigger_schedules_owned", "Schedules this replica works now", value=s.owned
        ),
        GaugeMetricFamily("jobworker_trigger_replicas", "Trigger replicas up", value=s.replicas),
    ]
    for name, help_, value in (
        ("submits", "Fire times submitted to an orchestrator", s.submits),
        ("call_failures", "Calls to an orchestrator that failed (each retried within the grace)",
         s.submit_failures),
        ("existing", "Submits the orchestrator answered with an existing job (a take-over)",
         s.existing),
        ("leases_acquired", "Schedules this replica took up", s.acquired),
        ("leases_lost", "Schedules this replica stopped working (lease lost or expired)", s.lost),
        ("leases_handed_off", "Schedules given back to their preferred replica", s.handed_off),
        ("store_failures", "Calls to the schedule store that failed", s.store_failures),
    ):  # fmt: skip
        out.append(CounterMetricFamily(f"jobworker_trigger_{name}", help_, value=value))
    if bad_data is not None:
        found = CounterMetricFamily(
            "jobworker_trigger_bad_data",
            "Unreadable items found in the store (each said once in the log)",
            labels=["kind"],
        )
        for kind, value in bad_data.statistics().found.items():
            found.add_metric([kind], value)
        out.append(found)
    return [*out, *(grpc_metrics(server.statistics()) if server is not None else [])]
