"""Shared test machinery: free ports, condition waits, real redis-server and worker processes."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# for the tests that exercise the gRPC wire: run them with the fast path on and off (the
# `fast_path` fixture, which the worker and fleet environments read)
BOTH_PATHS = pytest.mark.parametrize(
    "fast_path", [True, False], ids=["fast-path-on", "fast-path-off"], indirect=True
)


def twin_jobs() -> dict[str, Callable[..., Awaitable[Any]]]:
    """The built-ins the in-process worker twin runs in tests: `echo` and `sleep`, as a real
    worker's (parameters arrive as strings)."""

    async def echo(**params: str) -> dict[str, str]:
        return params

    async def sleep(seconds: str = "1") -> dict[str, float]:
        await anyio.sleep(float(seconds))
        return {"slept": float(seconds)}

    return {"echo": echo, "sleep": sleep}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], T | None], *, timeout: float = 10.0, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def eventually(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]], *, within: float = 5.0
) -> None:
    """Poll `condition` (sync or async) on the event loop until true; fail after `within` s."""
    with anyio.fail_after(within):
        while True:
            result = condition()
            if await result if inspect.isawaitable(result) else result:
                return
            await anyio.sleep(0.002)


def redis_server_binary() -> str:
    path = shutil.which("redis-server") or shutil.which("valkey-server")
    if path is None:
        raise RuntimeError("the tests need redis-server on PATH (apt-get install redis-server)")
    return path


class RedisServer:
    """A real redis-server subprocess on 127.0.0.1, nothing on disk."""

    def __init__(
        self,
        tmp: Path,
        *,
        port: int | None = None,
        extra: list[str] | None = None,
        client: Callable[[], redis.Redis] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.tmp = tmp
        self.extra = extra or []
        self._client = client
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.tmp),
            "--logfile", str(self.tmp / f"redis-{self.port}.log"), *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        wait_for(self._ping, timeout=10, what=f"redis-server on port {self.port}")

    def _ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.process.returncode}")
        client = self.client()
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.AuthenticationError, redis.ResponseError):
            return False
        finally:
            client.close()

    def client(self) -> redis.Redis:
        """A new client (the factory given, else plain TCP on `port`); close it after use."""
        if self._client is not None:
            return self._client()
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


class WorkerProcess:
    """A real `python -m app worker` (or another role's) subprocess; its log goes to a file."""

    def __init__(
        self, env: dict[str, str], log_path: Path, args: list[str], role: str = "worker"
    ) -> None:
        self.role = role
        self.env = env
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", role, *args],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,  # so that a SIGSTOPped one stays stopped under any supervisor
        )  # fmt: skip
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, *, timeout: float = 15.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.process.poll() is not None:
                match = re.search(pattern, self.log())
                if match:
                    return match
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.log()}")
            return re.search(pattern, self.log())

        return wait_for(found, timeout=timeout, what=f"log line {pattern!r}")

    def wait_ready(self, timeout: float = 15.0) -> WorkerProcess:
        self.port = int(
            self.wait_log(r"->SVC::gRPC server started on port (\d+)", timeout=timeout)[1]
        )
        self.wait_log(rf"{self.role} ready", timeout=timeout)
        switch = self.env.get("JOBWORKER_GRPC__FAST_PATH")
        if switch is not None:  # the server serves the way the test asked
            mode = "on" if switch == "true" else "off"
            self.wait_log(rf"{self.role} ready: .*<GrpcServer \S+ RUNNING fast_path={mode} ")
        return self

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit in {timeout}s:\n{self.log()}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A worker environment isolated from the developer's: its own state dir, 127.0.0.1 only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    env.pop("REDIS_URL", None)
    env.pop("PROFILE", None)
    env.update(
        XDG_STATE_HOME=str(tmp / "state"),
        JOBWORKER_GRPC__HOST="127.0.0.1",
        JOBWORKER_LOG__LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


@contextmanager
def running_worker(env: dict[str, str], log_path: Path, *args: str) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(env, log_path, list(args))
    try:
        yield worker.wait_ready()
    finally:
        worker.close()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics on 127.0.0.1:port, parsed: (sample name, labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
