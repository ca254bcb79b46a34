"""What every role exposes at /metrics about its Redis: up or down, outages, data losses."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.core.outage import OutageState
from app.stores.redis.monitor import RedisMonitorStatistics
from app.stores.redis.pool import PoolStatistics


def redis_metrics(s: RedisMonitorStatistics, pool: PoolStatistics | None = None) -> list[Metric]:
    """The monitor's view: whether Redis answers now, and how often it went away or lost data;
    and the process's pool of connections to it (`pool`), to size `redis.max_connections` by."""
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
        *_pool_metrics(pool),
    ]  # fmt: skip


def _pool_metrics(pool: PoolStatistics | None) -> list[Metric]:
    if pool is None:
        return []
    connections = GaugeMetricFamily(
        "jobworker_redis_pool_connections", "Connections to Redis of the process's main pool",
        labels=["state"],
    )  # fmt: skip
    connections.add_metric(["in_use"], pool.in_use)
    connections.add_metric(["idle"], pool.open - pool.in_use)
    return [
        connections,
        GaugeMetricFamily("jobworker_redis_pool_max_connections", "redis.max_connections",
                          value=pool.max_connections),
        CounterMetricFamily(
            "jobworker_redis_pool_waits",
            "Calls that found every connection in use and waited for one", value=pool.waits,
        ),
        CounterMetricFamily(
            "jobworker_redis_pool_exhausted",
            "Waits for a connection that timed out (the call refused as busy)",
            value=pool.exhausted,
        ),
    ]  # fmt: skip
