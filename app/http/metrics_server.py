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
    Metric,
)
from prometheus_client.registry import Collector

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
