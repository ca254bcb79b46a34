"""Prometheus metrics over HTTP, read live from the components at scrape time.

`prometheus_client` writes the exposition format; the HTTP side is a small anyio listener
(prometheus_client's own server runs in a thread). A scrape calls the `collect` function it is
given, which reads the components' `statistics()`: nothing is counted twice, nothing goes stale.

    GET /metrics   the metrics (text format 0.0.4)
    GET /healthz   200 "ok" (for plain HTTP probes)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from app.core.breaker import BreakerState
from app.dispatcher import Dispatcher
from app.worker_directory import WorkerDirectory

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_SECONDS = 5.0


class _LiveCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


class MetricsServer:
    """Serves `/metrics` on `host:port` until cancelled; `port` 0 picks a free one."""

    def __init__(self, collect: Callable[[], Iterable[Metric]], *, host: str, port: int) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_LiveCollector(collect))
        self._host = host
        self._port = port
        self.port = 0

    def __repr__(self) -> str:
        return f"<MetricsServer {self._host}:{self.port}>"

    def render(self) -> bytes:
        return generate_latest(self._registry)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        async with listener:
            self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
            log.info("metrics on http://%s:%d/metrics", self._host, self.port)
            task_status.started(self.port)
            await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            with anyio.move_on_after(READ_TIMEOUT_SECONDS):
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    try:
                        request += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            parts = request.split(b" ", 2)
            method, path = (parts[0], parts[1].split(b"?")[0]) if len(parts) > 2 else (b"", b"")
            if method != b"GET":
                status, body, kind = b"405 Method Not Allowed", b"GET only\n", b"text/plain"
            elif path == b"/metrics":
                status, body, kind = b"200 OK", self.render(), CONTENT_TYPE.encode()
            elif path == b"/healthz":
                status, body, kind = b"200 OK", b"ok\n", b"text/plain"
            else:
                status, body, kind = b"404 Not Found", b"try /metrics\n", b"text/plain"
            head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n"
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(head % (status, kind, len(body)) + b"\r\n" + body)


# --- what each role exposes ---------------------------------------------------------------------


def orchestrator_metrics(dispatcher: Dispatcher, directory: WorkerDirectory) -> list[Metric]:
    """The dispatcher's counters, and each known worker's eligibility and circuit breaker."""
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
        ("superseded", "Results refused for a superseded fencing token", s.superseded),
        ("retry_budget_refused", "Retries the budget held back", s.retry_budget_refused),
    ):
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
    return [*out, breaker, opened, eligible]
