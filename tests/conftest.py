"""Fixtures: one real redis-server per session (FLUSHDB per test), worker processes, backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from tests.grpc_clients import generate_grpcio_stubs, import_stubs, orchestrator_stubs
from tests.helpers import ROOT, RedisServer, WorkerProcess, base_env, free_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def async_redis(
    redis_server: RedisServer, redis_client: redis.Redis
) -> AsyncIterator[aioredis.Redis]:
    """redis-py's asyncio client on the session's server (flushed first, as `redis_client`)."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def fast_path(request: pytest.FixtureRequest) -> bool:
    """`grpc.fast_path` for the processes a test starts: on, unless it asks for both paths."""
    return bool(getattr(request, "param", True))


@pytest.fixture
def worker_env(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis, fast_path: bool
) -> dict[str, str]:
    """Environment for a worker on the session's redis-server and a free port."""
    return base_env(
        tmp_path,
        REDIS_URL=redis_server.url,
        JOBWORKER_GRPC__PORT=str(free_port()),
        JOBWORKER_GRPC__FAST_PATH=str(fast_path).lower(),
        JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS="0.5",
        JOBWORKER_REDIS__RETRY_MAX_SECONDS="0.5",
    )


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes that are killed at teardown if the test left them running."""
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], *args: str, ready: bool = True) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log", list(args))
        workers.append(worker)
        return worker.wait_ready() if ready else worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.close()


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """grpcio stubs for proto/worker.proto (the official client, generated at test time)."""
    out = tmp_path_factory.mktemp("grpcio_worker")
    generate_grpcio_stubs(ROOT / "proto", out)
    pb2, pb2_grpc = import_stubs(out)
    return SimpleNamespace(pb2=pb2, grpc=pb2_grpc)


@pytest.fixture(scope="session")
def orch_stubs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """grpcio stubs for proto/orchestrator.proto."""
    return orchestrator_stubs(tmp_path_factory.mktemp("grpcio_orchestrator"))


# The core (job master, scheduler, retry, breaker) is tested on both anyio backends.
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
