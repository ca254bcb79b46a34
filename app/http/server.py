"""The HTTP listener every role runs: an ASGI app on Hypercorn, inside the role's task group.

Hypercorn serves from a task of ours and stops through its shutdown trigger, so stopping stays
one cancellation: when `run` is cancelled it pulls the trigger, Hypercorn stops accepting and
closes idle keep-alive connections, requests in flight get `close_grace_seconds` to finish (a
deadline on each one's cancel scope), and `run` returns once Hypercorn is done.

Port 0 picks a free port: `run` binds the listening sockets itself (anyio's listener: every
address of `host`, one port) and hands Hypercorn duplicates of them as `fd://` binds, since
Hypercorn's `serve` cannot tell which port it got.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import Counter
from typing import Any, cast

import anyio
import anyio.abc
import msgspec
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.logging import Logger
from hypercorn.typing import ASGIFramework, ResponseSummary, WWWScope
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.lifecycle import Lifecycle

log = logging.getLogger(__name__)

# a connection that sends nothing this long is closed (a stalled body would hold its request)
READ_TIMEOUT_SECONDS = 10
# beyond the grace: for Hypercorn to answer the requests cut at it and close their connections
_SHUTDOWN_MARGIN_SECONDS = 0.5


class HttpServerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of an HttpServer: its state, its port, and the requests its app answered."""

    state: Lifecycle
    host: str
    port: int
    requests: int
    in_flight: int
    responses_2xx: int
    responses_3xx: int
    responses_4xx: int
    responses_5xx: int


class _HypercornLog(Logger):
    """Hypercorn's log calls, quieter: its INFO lines and access lines at DEBUG."""

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        # its only INFO lines are "Running on ... (CTRL + C to quit)"; HttpServer logs its own
        await self.debug(message, *args, **kwargs)

    async def access(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> None:
        logger = self.access_logger
        if logger is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug(self.access_log_format, self.atoms(request, response, request_time))


class HttpServer:
    """Serves an ASGI app on `host:port` until cancelled; port 0 picks a free one."""

    def __init__(
        self, app: ASGIApp, *, host: str, port: int, close_grace_seconds: float = 2.0
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._grace = close_grace_seconds
        self._state = Lifecycle.CREATED
        self._listening = anyio.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        # responses by status class (2 for 2xx, ...)
        self._responses: Counter[int] = Counter()
        self._requests: set[anyio.CancelScope] = set()
        self._deadline = math.inf
        self._cut = 0
        self.port = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<HttpServer {_url_host(s.host)}:{s.port} {s.state.value} requests={s.requests}"
            f" in_flight={s.in_flight} 2xx={s.responses_2xx} 4xx={s.responses_4xx}"
            f" 5xx={s.responses_5xx}>"
        )

    @property
    def state(self) -> Lifecycle:
        """Where the server is in its life."""
        return self._state

    def statistics(self) -> HttpServerStatistics:
        """The state, the bound port, requests answered (by status class) and in flight."""
        r = self._responses
        return HttpServerStatistics(
            state=self._state,
            host=self._host,
            port=self.port,
            requests=r.total(),
            in_flight=len(self._requests),
            responses_2xx=r[2],
            responses_3xx=r[3],
            responses_4xx=r[4],
            responses_5xx=r[5],
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the port once accepting, serve until cancelled, then stop gracefully."""
        if self._state is not Lifecycle.CREATED:
            raise RuntimeError(f"{self!r} runs once")
        self._state = Lifecycle.STARTING
        try:
            listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
            raw = anyio.abc.SocketAttribute.raw_socket
            sockets = [item.extra(raw) for item in listener.listeners]
            self.port = int(sockets[0].getsockname()[1])
            # Hypercorn's drain must not be cut by the cancellation that starts it: its task is
            # shielded; `finally` below pulls its trigger, bounds the drain, then cancels it
            serving = anyio.CancelScope(shield=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve, sockets, serving)
                try:
                    # our copies close once Hypercorn accepts on its duplicates (or never will),
                    # so that its close stops the port
                    async with listener:
                        await self._listening.wait()
                    self._state = Lifecycle.RUNNING
                    log.info("http on http://%s:%d", _url_host(self._host), self.port)
                    task_status.started(self.port)
                    await anyio.sleep_forever()
                finally:
                    self._state = Lifecycle.DRAINING
                    # requests in flight get the grace: a deadline, not a cancellation
                    self._deadline = anyio.current_time() + self._grace
                    for request in self._requests:
                        request.deadline = self._deadline
                    self._stopping.set()
                    with anyio.move_on_after(self._grace + _SHUTDOWN_MARGIN_SECONDS, shield=True):
                        await self._stopped.wait()
                    serving.cancel()
        finally:
            self._state = Lifecycle.STOPPED
            if self._listening.is_set():
                cut = f", {self._cut} requests cut at the grace" if self._cut else ""
                log.log(
                    logging.WARNING if cut else logging.INFO,
                    "http on port %d closed%s", self.port, cut,
                )  # fmt: skip

    def _config(self, binds: list[str]) -> Config:
        config = Config()
        config.bind = binds
        config.logger_class = _HypercornLog
        config.errorlog = logging.getLogger(f"{__name__}.hypercorn")
        config.accesslog = logging.getLogger(f"{__name__}.access")
        # our deadline ends requests at the grace; Hypercorn's own timeout is only a backstop
        # (where it fires, it cancels connection tasks, which asyncio 3.11 logs as an error)
        config.graceful_timeout = self._grace + _SHUTDOWN_MARGIN_SECONDS / 2
        config.read_timeout = READ_TIMEOUT_SECONDS
        return config

    async def _serve(self, sockets: list[socket.socket], scope: anyio.CancelScope) -> None:
        try:
            with scope:
                # duplicated only once shielded: from here Hypercorn runs and closes them
                config = self._config([f"fd://{os.dup(sock.fileno())}" for sock in sockets])
                app = cast("ASGIFramework", self._asgi)
                await serve(app, config, shutdown_trigger=self._until_stopping, mode="asgi")
                if not self._stopping.is_set():
                    raise RuntimeError("Hypercorn stopped serving by itself")
        finally:
            self._stopped.set()

    async def _until_stopping(self) -> None:
        # Hypercorn awaits its shutdown trigger once every listener accepts connections
        self._listening.set()
        await self._stopping.wait()

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with each request under a cancel scope that shutdown gives a deadline."""
        if scope["type"] == "lifespan":
            # the role's task group is the lifespan: answer start-up and return, so that
            # Hypercorn's lifespan task ends now and cannot outlive a shutdown cut short
            if (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._responses[int(message["status"]) // 100] += 1
            await send(message)

        # each request runs in a task of Hypercorn's; cut at the deadline, it returns without
        # a response and Hypercorn answers 500 and closes the connection by itself
        with anyio.CancelScope(deadline=self._deadline) as request:
            self._requests.add(request)
            try:
                await self._app(scope, receive, counting_send)
            finally:
                self._requests.discard(request)
        if request.cancelled_caught:
            self._cut += 1


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
