"""The HTTP edge: HttpServer in this process (asyncio), then the roles' /metrics, /healthz, /readyz.

In-process tests run Hypercorn on the test's event loop and speak raw HTTP/1.1 to it, so they
see exactly what goes over the wire; the process tests start real workers and orchestrators.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import grpc
import pytest
import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from app.core.lifecycle import Lifecycle
from app.http.application import build_application
from app.http.server import HttpServer
from tests.grpc_clients import Client
from tests.helpers import (
    RedisServer,
    WorkerProcess,
    base_env,
    eventually,
    free_port,
    scrape,
    wait_for,
)

HTTP_PORT = r"http on http://\S+:(\d+)"

# --- in process: HttpServer on the asyncio backend ----------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # what the roles run on (Hypercorn's asyncio worker)


class Probe:
    """What the in-process app reports, and a slow route whose requests the test can hold."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.scrapes = 0
        self.slow_seconds = 0.2
        self.slow_entered = anyio.Event()

    def collect(self) -> list[Metric]:
        self.scrapes += 1
        return [GaugeMetricFamily("probe_scrapes", "Scrapes so far", value=self.scrapes)]

    def readiness(self) -> str | None:
        return self.reason

    async def slow(self, request: Request) -> Response:
        self.slow_entered.set()
        await anyio.sleep(self.slow_seconds)
        return PlainTextResponse("slow done\n")

    def server(self, grace: float = 2.0) -> HttpServer:
        app = build_application(
            self.collect, self.readiness, routes=[Route("/slow", self.slow, methods=["GET"])]
        )
        return HttpServer(app, host="127.0.0.1", port=0, close_grace_seconds=grace)


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection (or resets it)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        return await read_to_end(stream)


async def read_to_end(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    with anyio.fail_after(5):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode()


def status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def refused(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


@pytest.mark.anyio
async def test_started_server_answers_and_stops_on_cancel_leaving_nothing() -> None:
    probe = Probe()
    server = probe.server()
    tasks_before = asyncio.all_tasks()
    assert server.state is Lifecycle.CREATED
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        assert port == server.port != 0
        assert server.statistics().state is Lifecycle.RUNNING
        assert status_and_body(await exchange(port, get("/healthz"))) == (200, b"ok\n")
        status, body = status_and_body(await exchange(port, get("/metrics")))
        assert status == 200
        assert b"probe_scrapes 1.0" in body
        # a second scrape calls collect again: read live, nothing kept between scrapes
        assert b"probe_scrapes 2.0" in status_and_body(await exchange(port, get("/metrics")))[1]
        assert status_and_body(await exchange(port, get("/nope")))[0] == 404
        stats = server.statistics()
        assert (stats.requests, stats.responses_2xx, stats.responses_4xx) == (4, 3, 1)
        assert f"127.0.0.1:{port} RUNNING requests=4 in_flight=0 2xx=3 4xx=1" in repr(server)
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 1.0  # nothing in flight: no grace to wait out
    assert server.statistics().state is Lifecycle.STOPPED
    assert await refused(port)
    assert asyncio.all_tasks() == tasks_before  # Hypercorn's tasks all ended


@pytest.mark.anyio
async def test_readyz_says_why_not_ready() -> None:
    probe = Probe()
    async with anyio.create_task_group() as tg:
        port = await tg.start(probe.server().run)
        assert status_and_body(await exchange(port, get("/readyz"))) == (200, b"ready\n")
        probe.reason = "draining"
        assert status_and_body(await exchange(port, get("/readyz"))) == (503, b"draining\n")
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_request_in_flight_finishes_and_an_idle_connection_closes() -> None:
    probe = Probe()
    server = probe.server(grace=5.0)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        idle = await anyio.connect_tcp("127.0.0.1", port)  # keep-alive, answered, then idle
        await idle.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        with anyio.fail_after(5):
            while not answer.endswith(b"\r\n\r\nok\n"):
                answer += await idle.receive()
        assert answer.startswith(b"HTTP/1.1 200")
        in_flight = await anyio.connect_tcp("127.0.0.1", port)
        await in_flight.send(get("/slow"))
        with anyio.fail_after(5):
            await probe.slow_entered.wait()
        started = time.monotonic()
        tg.cancel_scope.cancel()
    took = time.monotonic() - started
    # it waited for the slow request, not for the grace nor the idle keep-alive timeout (5 s)
    assert probe.slow_seconds * 0.9 <= took < 2.0
    assert status_and_body(await read_to_end(in_flight)) == (200, b"slow done\n")
    assert await read_to_end(idle) == b""  # closed by the server, not left open
    await in_flight.aclose()
    await idle.aclose()
    assert await refused(port)


@pytest.mark.anyio
async def test_a_request_past_the_grace_is_cut_and_the_server_still_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = Probe()
    probe.slow_seconds = 60
    server = probe.server(grace=0.3)
    tasks_before = asyncio.all_tasks()
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run)
        stuck = await anyio.connect_tcp("127.0.0.1", port)
        await stuck.send(get("/slow"))
        with anyio.fail_after(5):
            await probe.slow_entered.wait()
        assert server.statistics().in_flight == 1
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert 0.25 <= time.monotonic() - started < 2.0  # the grace, then no longer
    assert server.statistics().state is Lifecycle.STOPPED
    assert server.statistics().in_flight == 0
    # cut by our deadline, not by Hypercorn cancelling its connection tasks (asyncio logs that)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"http on port {port} closed, 1 requests cut at the grace"
    ]
    # Hypercorn answers a request it had to cut with a 500, and closes the connection
    assert status_and_body(await read_to_end(stuck))[0] == 500
    await stuck.aclose()
    assert await refused(port)
    await eventually(lambda: asyncio.all_tasks() == tasks_before, within=1)


@pytest.mark.anyio
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 8, 13, 21, 34])
async def test_cancelled_at_any_point_of_its_start_it_leaves_nothing(steps: int) -> None:
    """Cancel after `steps` event-loop steps: no port left listening, no task, no descriptor."""
    server = Probe().server()
    tasks_before = asyncio.all_tasks()
    fds_before = len(os.listdir("/proc/self/fd"))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.run)
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert server.state in (Lifecycle.CREATED, Lifecycle.STOPPED)
    if server.port:
        assert await refused(server.port)
    assert asyncio.all_tasks() == tasks_before
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.anyio
async def test_a_taken_port_fails_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = build_application(list, lambda: None)
        server = HttpServer(app, host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(OSError, match="in use"):
            await server.run()
    assert server.state is Lifecycle.STOPPED


@pytest.mark.anyio
async def test_bad_requests_get_a_4xx_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(Probe().server().run)
        for request in (
            get("/metrics", "POST"),  # wrong method
            b"\x00\x01\x02 junk \xff\r\n\r\n",  # not HTTP
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",  # a request line past the limit
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: \xff\xfe\r\nConnection: close\r\n\r\n",
            b"GET /metrics?\xff HTTP/1.1\r\nHost: t\r\n\r\n",  # raw bytes in the target
        ):
            response = await exchange(port, request)
            assert response == b"" or 400 <= status_and_body(response)[0] < 500, response[:200]
        assert status_and_body(await exchange(port, get("/healthz")))[0] == 200
        tg.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


# --- real processes: the worker's and the orchestrator's edge -----------------------------------


def request(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of one HTTP request to 127.0.0.1:port; 4xx and 5xx included."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send raw bytes; what comes back before the server closes (or resets) the connection."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def connection_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.fixture
def clients(stubs: SimpleNamespace) -> Iterator[Callable[[WorkerProcess], Client]]:
    made: list[Client] = []

    def make(worker: WorkerProcess) -> Client:
        made.append(Client(stubs, worker.target))
        return made[-1]

    yield make
    for client in made:
        client.channel.close()


StartWorker = Callable[..., WorkerProcess]


def test_worker_on_port_0_logs_its_port_and_serves_the_edge(
    worker_env: dict[str, str], start_worker: StartWorker
) -> None:
    worker = start_worker({**worker_env, "JOBWORKER_METRICS__PORT": "0"})
    port = int(worker.wait_log(HTTP_PORT)[1])
    assert worker.log().count("http on http://") == 1
    metrics = scrape(port)
    assert metrics[("jobworker_status", frozenset({("jobworker_status", "IDLE")}))] == 1
    assert request(port, "/healthz")[:2] == (200, "ok\n")
    assert request(port, "/readyz")[:2] == (200, "ready\n")
    assert request(port, "/metrics", "HEAD")[:2] == (200, "")
    status, body, _ = request(port, "/nope")
    assert (status, body) == (404, "not found; try /metrics, /healthz, /readyz\n")
    status, body, headers = request(port, "/metrics", "POST")
    assert status == 405
    assert set(headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert "method not allowed" in body


def test_junk_gets_a_4xx_or_a_closed_connection_and_no_traceback(
    worker_env: dict[str, str], start_worker: StartWorker
) -> None:
    worker = start_worker({**worker_env, "JOBWORKER_METRICS__PORT": "0"})
    port = int(worker.wait_log(HTTP_PORT)[1])
    for junk in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
        b"\x00\xff garbage \r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: \xff\r\nConnection: close\r\n\r\n",
    ):
        answer = raw(port, junk)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    # a body announced and never sent does not hold a scrape open (nor the drain later)
    stalled = raw(port, b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n")
    assert stalled.startswith(b"HTTP/1.1 200")
    assert request(port, "/healthz")[:2] == (200, "ok\n")  # still serving
    assert scrape(port)[("jobworker_max_size", frozenset())] == 8
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit() == 0
    log = worker.log()
    assert "Traceback" not in log
    assert " ERROR " not in log
    assert " WARNING " not in log


def test_readyz_turns_503_draining_while_a_job_drains(
    worker_env: dict[str, str], start_worker: StartWorker, clients: Callable[..., Client]
) -> None:
    env = {
        **worker_env,
        "JOBWORKER_METRICS__PORT": "0",
        "JOBWORKER_WORKER__DRAIN_GRACE_SECONDS": "60",
    }
    worker = start_worker(env)
    port = int(worker.wait_log(HTTP_PORT)[1])
    client = clients(worker)
    client.send("sleep", "long", seconds="600")
    wait_for(lambda: client.status().active == 1, what="the job to start")
    assert request(port, "/readyz")[:2] == (200, "ready\n")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: request(port, "/readyz")[:2] == (503, "draining\n"), what="503 draining")
    # draining, the process still answers: alive, not ready, and its metrics say why
    assert request(port, "/healthz")[:2] == (200, "ok\n")
    assert scrape(port)[("jobworker_status", frozenset({("jobworker_status", "DRAINING")}))] == 1
    assert client.status().active == 1  # the job is still draining
    worker.signal(signal.SIGTERM)  # a second signal cancels it: the worker stops, the edge too
    assert worker.wait_exit() == 0
    assert connection_refused(port)
    assert re.search(rf"http on port {port} closed", worker.log())


def test_orchestrator_readyz_turns_503_draining_while_its_job_drains(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    orch_stubs: SimpleNamespace,
) -> None:
    fast = {
        "REDIS_URL": redis_server.url,
        "JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS": "0.3",
        "JOBWORKER_ORCHESTRATOR__WORKER_REPORT_INTERVAL_SECONDS": "0.3",
        "JOBWORKER_ORCHESTRATOR__DISCOVERY_INTERVAL_SECONDS": "0.2",
    }
    worker = WorkerProcess(
        base_env(tmp_path / "w", JOBWORKER_GRPC__PORT=str(free_port()), **fast),
        tmp_path / "worker.log",
        [],
    )
    orch_env = base_env(
        tmp_path / "o",
        JOBWORKER_ORCHESTRATOR__HOST="127.0.0.1",
        JOBWORKER_ORCHESTRATOR__PORT=str(free_port()),
        JOBWORKER_ORCHESTRATOR__DRAIN_GRACE_SECONDS="60",
        JOBWORKER_METRICS__PORT="0",
        JOBWORKER_METRICS__HOST="127.0.0.1",
        **fast,
    )
    orch = WorkerProcess(orch_env, tmp_path / "orchestrator.log", [], role="orchestrator")
    channel = grpc.insecure_channel(f"127.0.0.1:{orch_env['JOBWORKER_ORCHESTRATOR__PORT']}")
    try:
        worker.wait_ready()
        orch.wait_ready()
        port = int(orch.wait_log(HTTP_PORT)[1])
        assert request(port, "/readyz")[:2] == (200, "ready\n")
        assert ("jobworker_orchestrator_jobs_inflight", frozenset()) in scrape(port)
        stub = orch_stubs.grpc.OrchestratorServiceStub(channel)
        pb2 = orch_stubs.pb2
        job = pb2.BatchExecutionRequest(job_id="long", job_type="sleep", params={"seconds": "600"})
        wait_for(lambda: _submitted(stub, job), what="a worker to take the job")

        def running() -> bool:
            found = stub.GetJob(pb2.JobRequest(job_id="long"), timeout=5)
            return bool(pb2.JobState.Name(found.state) == "RUNNING")

        wait_for(running, timeout=30, what="the job running")
        orch.signal(signal.SIGTERM)  # the job in hand keeps the orchestrator draining
        wait_for(lambda: request(port, "/readyz")[:2] == (503, "draining\n"), what="503")
        assert request(port, "/healthz")[:2] == (200, "ok\n")
        assert scrape(port)[("jobworker_orchestrator_jobs_inflight", frozenset())] == 1
        orch.signal(signal.SIGTERM)  # a second one leaves the job to others: it stops now
        assert orch.wait_exit() == 0
        assert connection_refused(port)
        assert "Traceback" not in orch.log()
    finally:
        channel.close()
        orch.close()
        worker.close()


def _submitted(stub: Any, job: Any) -> bool:
    """Submit until the job type is known (a worker registered); True once accepted."""
    try:
        stub.Submit(job, timeout=5)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return True
