"""What every role exposes at /metrics about its Redis: up or down, outages, data losses."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.core.outage import OutageState
from app.stores.redis.monitor import RedisMonitorStatistics


def redis_metrics(s: RedisMonitorStatistics) -> list[Metric]:
    """The monitor's view: whether Redis answers now, and how often it went away or lost data."""
    return [
        GaugeMetricFamily(
            "jobworker_redis_up", "1 while Redis answers the process's checks",
            value=int(s.redis is not OutageState.DOWN),
        ),
        CounterMetricFamily("jobworker_redis_outages", "Times Redis stopped answering",
                            value=s.outages),
        CounterMetricFamily(
            "jobworker_redis_data_losses",
            "Times Redis came back without its data (its epoch marker changed)",
            value=s.data_losses,
        ),
        CounterMetricFamily(
            "jobworker_redis_went_back",
            "Times Redis came back without its last writes (its heartbeat fell)",
            value=s.went_back,
        ),
    ]  # fmt: skip
