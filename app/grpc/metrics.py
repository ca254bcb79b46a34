"""The gRPC server's part of /metrics, the same for every role that serves gRPC."""

from __future__ import annotations

import msgspec
from prometheus_client.core import CounterMetricFamily, Metric, StateSetMetricFamily

from app.grpc.statistics import FastPathMode, GrpcServerStatistics


def grpc_metrics(s: GrpcServerStatistics) -> list[Metric]:
    """Calls by the path that served them, the codec's fallbacks and errors, the fast path mode."""
    calls = CounterMetricFamily(
        "jobworker_grpc_calls",
        "gRPC calls by the server path that served them (fast: the unary fast path; general: "
        "grpclib's own)",
        labels=["path"],
    )
    calls.add_metric(["fast"], s.fast_calls)
    calls.add_metric(["general"], s.general_calls)
    codec = CounterMetricFamily(
        "jobworker_grpc_codec_events",
        "Messages the codec handed to betterproto2's own code, and requests it could not decode",
        labels=["kind"],
    )
    for kind, value in msgspec.structs.asdict(s.codec).items():
        codec.add_metric([kind], value)
    mode = StateSetMetricFamily(
        "jobworker_grpc_fast_path", "on, off (configured) or fallen_back (internals missing)"
    )
    mode.add_metric([], {m.value: m is s.fast_path for m in FastPathMode})
    return [calls, codec, mode]
