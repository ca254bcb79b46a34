"""Fixtures: one real redis-server per session (FLUSHDB per test), worker processes, backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import RedisServer, WorkerProcess, base_env, free_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def worker_env(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> dict[str, str]:
    """Environment for a worker on the session's redis-server and a free port."""
    return base_env(
        tmp_path,
        REDIS_URL=redis_server.url,
        JOBWORKER_GRPC__PORT=str(free_port()),
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


# The core (job master, scheduler, retry, breaker) is tested on both anyio backends.
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
