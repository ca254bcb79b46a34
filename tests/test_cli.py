"""The client commands as people meet them: real processes, the `jobworker` CLI and grpcurl."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from tests.grpc_clients import grpcurl
from tests.helpers import BOTH_PATHS, ROOT, RedisServer
from tests.test_orchestrator import Fleet


@pytest.fixture
def fleet(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
    stubs: SimpleNamespace, orch_stubs: SimpleNamespace, fast_path: bool,
) -> Iterator[Fleet]:  # fmt: skip
    fleet = Fleet(tmp_path, redis_server.url, stubs, orch_stubs, fast_path=fast_path)
    try:
        yield fleet
    finally:
        fleet.close()


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)  # fmt: skip


@BOTH_PATHS
def test_a_client_at_the_wrong_tier_is_told_so(fleet: Fleet) -> None:
    worker = fleet.worker()
    orchestrator = fleet.orchestrator()
    env = fleet.env()
    at_orchestrator = cli(env, "status", "--target", orchestrator.target)
    assert at_orchestrator.returncode == 1
    assert at_orchestrator.stderr.startswith(
        "jobworker: UNIMPLEMENTED: unknown method /worker.WorkerService/GetStatus: this server"
        " serves orchestrator.OrchestratorService; is --target the right tier?"
    ), at_orchestrator.stderr
    at_worker = cli(env, "jobs", "get", "j1", "--target", worker.target)
    assert at_worker.returncode == 1
    assert at_worker.stderr.startswith(
        "jobworker: UNIMPLEMENTED: unknown method /orchestrator.OrchestratorService/GetJob: this"
        " server serves worker.WorkerService;"
    ), at_worker.stderr
    for result in (at_orchestrator, at_worker):
        assert "content-type" not in result.stderr
        assert len(result.stderr.splitlines()) == 1
    # grpcurl (grpc-go) read it as UNKNOWN "malformed header: missing HTTP content-type" too
    listed = grpcurl("-plaintext", orchestrator.target, "worker.WorkerService/GetStatus")
    assert "Code: Unimplemented" in listed.stderr, listed.stderr
    assert "this server serves orchestrator.OrchestratorService" in listed.stderr
    # the servers go on serving the right calls on the same connections' servers
    assert cli(env, "health", "--target", orchestrator.target).stdout.strip() == "SERVING"


@BOTH_PATHS
def test_health_of_an_unknown_service_names_the_known(fleet: Fleet) -> None:
    worker = fleet.worker()
    env = fleet.env()
    unknown = cli(env, "health", "--target", worker.target, "--service", "nosuch")
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr.strip() == (
        "jobworker: NOT_FOUND: no health status for service 'nosuch'; known:"
        ' "" (the whole server), worker.WorkerService'
    )
    known = cli(env, "health", "--target", worker.target, "--service", "worker.WorkerService")
    assert (known.returncode, known.stdout.strip()) == (0, "SERVING")
