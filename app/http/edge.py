"""A role's HTTP edge in one call: its app (metrics, probes) on an HttpServer in its task group."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio.abc
from prometheus_client.core import Metric

from app.http.application import build_application
from app.http.server import HttpServer


async def start_http_edge(
    tg: anyio.abc.TaskGroup,
    *,
    host: str,
    port: int,
    collect: Callable[[], Iterable[Metric]],
    draining: Callable[[], bool],
    grpc_port: Callable[[], int],
    unready: Callable[[], str | None] | None = None,
) -> HttpServer:
    """Serve /metrics (from `collect`), /healthz and /readyz in `tg`; the server, listening.

    /readyz is ready while the role's gRPC server has a port, the role is not draining, and
    `unready` (what the role needs, e.g. its Redis) gives no reason not to be.
    """

    def not_ready() -> str | None:
        if draining():
            return "draining"
        if not grpc_port():
            return "starting"
        return unready() if unready is not None else None

    server = HttpServer(build_application(collect, not_ready), host=host, port=port)
    await tg.start(server.run)
    return server
