"""The Starlette application a role serves: metrics and probes (and, later, its console).

    GET /metrics   Prometheus metrics, read live at scrape time (prometheus_client's ASGI app)
    GET /healthz   200 "ok": the process answers (liveness)
    GET /readyz    200 "ready", or 503 and the one-line reason the role is not (e.g. "draining")

Any other path is a 404 page naming these, another method a 405 (HEAD is allowed with GET).
A scrape calls the `collect` function it is given, which reads the components' `statistics()`:
nothing is counted twice, nothing goes stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: What a role gives /readyz: None when ready, else the one-line reason it is not.
Readiness = Callable[[], str | None]


class _LiveCollector(Collector):
    """Calls the role's `collect` at every scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


class _MetricsEndpoint:
    """prometheus_client's ASGI app, behind a check of the bytes it decodes as UTF-8."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._app = cast("ASGIApp", make_asgi_app(registry))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # it decodes the query and these headers as UTF-8 and would fail on other bytes (HTTP
        # allows them in a header value), a 500 with a traceback for a client's junk
        raw = [scope["query_string"]] + [
            value for name, value in scope["headers"] if name in (b"accept", b"accept-encoding")
        ]
        try:
            for item in raw:
                item.decode()
        except UnicodeDecodeError:
            response = PlainTextResponse("bad request: query or Accept header not UTF-8\n", 400)
            await response(scope, receive, send)
            return
        # it awaits one request message before answering: a GET's body (a client may announce
        # one and send nothing) is not waited for, so no client can hold a scrape open
        await self._app(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def build_application(
    collect: Callable[[], Iterable[Metric]],
    readiness: Readiness,
    *,
    routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The role's HTTP app: /metrics from `collect`, /healthz, /readyz from `readiness`.

    `routes` go beside them (a console); the 404 page lists every path.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LiveCollector(collect))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        reason = readiness()
        if reason is None:
            return PlainTextResponse("ready\n")
        return PlainTextResponse(f"{reason}\n", 503)

    all_routes: list[BaseRoute] = [
        # a Route, not a Mount: a Mount answers /metrics with a redirect to /metrics/
        Route("/metrics", _MetricsEndpoint(registry), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *routes,
    ]
    paths = ", ".join(path for r in all_routes if (path := getattr(r, "path", "")))

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(f"not found; try {paths}\n", 404)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        headers = exc.headers if isinstance(exc, HTTPException) else None
        allowed = (headers or {}).get("Allow", "GET, HEAD")
        return PlainTextResponse(f"method not allowed: {allowed} only\n", 405, headers=headers)

    return Starlette(
        routes=all_routes, exception_handlers={404: not_found, 405: method_not_allowed}
    )
