"""The client commands as people meet them: real processes, the `jobworker` CLI and grpcurl."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from tests.grpc_clients import grpcurl
from tests.helpers import BOTH_PATHS, ROOT, RedisServer, wait_for
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


@pytest.fixture
def start_cli() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start CLI processes (output piped), killed at teardown if the test left them running."""
    started: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
        started.append(subprocess.Popen(
            [sys.executable, "-m", "app", *args], env=env, text=True, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))  # fmt: skip
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)


@BOTH_PATHS
def test_a_client_at_the_wrong_tier_is_told_so(fleet: Fleet) -> None:
    worker = fleet.worker()
    orchestrator = fleet.orchestrator()
    env = fleet.env()
    at_orchestrator = cli(env, "status", "--worker", orchestrator.target)
    assert at_orchestrator.returncode == 1
    assert at_orchestrator.stderr == (
        f"jobworker: {orchestrator.target} is an orchestrator, not a worker (from --worker)\n"
    )
    at_worker = cli(env, "jobs", "get", "j1", "--target", worker.target)
    assert at_worker.returncode == 1
    assert at_worker.stderr == (
        f"jobworker: {worker.target} is a worker, not an orchestrator (from --target)\n"
    )
    for result in (at_orchestrator, at_worker):
        assert "content-type" not in result.stderr
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


def test_waiting_for_a_job_has_no_time_limit_unless_asked(
    fleet: Fleet, start_cli: Callable[..., subprocess.Popen[str]]
) -> None:
    """`--wait` and `jobs watch` ended after 10 s (`TimeoutError: `) while the job ran on."""
    worker = fleet.worker()
    orchestrator = fleet.orchestrator()
    env = fleet.env()
    seconds = "11"  # past the 10 s the waits used to end at
    began = time.monotonic()
    direct = start_cli(env, "submit", "--worker", worker.target, "sleep", "-p",
                       f"seconds={seconds}", "--id", "direct", "--wait", "--json")  # fmt: skip
    fleet_wait = start_cli(env, "submit", "--target", orchestrator.target, "sleep", "-p",
                           f"seconds={seconds}", "--id", "queued", "--wait", "--json")  # fmt: skip
    watched = start_cli(env, "submit", "--target", orchestrator.target, "sleep", "-p",
                        f"seconds={seconds}", "--id", "watched")  # fmt: skip
    assert watched.wait(30) == 0, watched.communicate()[1]
    watch = start_cli(env, "jobs", "watch", "--target", orchestrator.target, "watched", "--json")
    # asked for a limit: it ends then, saying so (exit 6), and the job runs on
    limited = cli(env, "submit", "--target", orchestrator.target, "sleep", "-p",
                  f"seconds={seconds}", "--id", "limited", "--wait", "--timeout", "1")  # fmt: skip
    assert limited.returncode == 6
    assert re.fullmatch(
        r"jobworker: stopped waiting after 1s \(--timeout\): job limited is (DISPATCHED|RUNNING)"
        r" and goes on; `jobworker job limited --wait` follows it again",
        limited.stderr.strip(),
    ), limited.stderr
    got = cli(env, "job", "--target", orchestrator.target, "limited", "--json")
    assert json.loads(got.stdout)["state"] in ("DISPATCHED", "RUNNING"), got.stdout
    outputs = {}
    for name, process in (("direct", direct), ("fleet", fleet_wait), ("watch", watch)):
        out, err = process.communicate(timeout=60)
        outputs[name] = out
        assert process.returncode == 0, f"{name}: {err}"
        assert "TimeoutError" not in err
    assert time.monotonic() - began > 10.5
    assert json.loads(outputs["direct"])["state"] == "SUCCEEDED"
    assert json.loads(outputs["fleet"])["job"]["state"] == "SUCCEEDED"
    states = [json.loads(line)["state"] for line in outputs["watch"].splitlines()]
    assert states[-1] == "SUCCEEDED", states
    assert len(states) >= 2, states  # the state it had when watched, then each change
    final = wait_for(
        lambda: json.loads(cli(env, "job", "--target", orchestrator.target, "limited",
                               "--json").stdout)["state"] == "SUCCEEDED",
        timeout=20, what="the job whose wait was limited to end",
    )  # fmt: skip
    assert final
