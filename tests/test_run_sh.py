"""`tools/run.sh` end to end: the seed's start/stop/status/restart on a SERVICE_HOME in tmp.

The project's wheel is built once per module (from a copy of the sources, so the work tree gets
no build/ folder); `start` makes the SERVICE_HOME's venv from it, with the dependencies from the
package index. Every worker runs against the session's redis-server on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.fleet.pod_info import decode_pod_info
from tests.helpers import ROOT, RedisServer, free_port, wait_for

RUN_SH = ROOT / "tools" / "run.sh"
# making the venv is the slow part of a first start (pip install of the dependencies)
START_SECONDS = 180
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built with --no-deps from a copy of pyproject.toml, README and app/."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "app", src / "app", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
         str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"pip wheel failed:\n{result.stderr[-3000:]}"
    (built,) = out.glob("job_worker_app-*.whl")
    return built


@pytest.fixture(scope="module")
def service_home(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """The seed's layout: run.sh copied in, libs/ with the wheel, config/ with a profile."""
    home = tmp_path_factory.mktemp("service-home")
    (home / "libs").mkdir()
    shutil.copy2(wheel, home / "libs" / wheel.name)
    (home / "config").mkdir()
    # a profile that only the external folder has, so PROFILES_ACTIVE and config/ are both seen
    (home / "config" / "application-e2e.toml").write_text(
        "[worker]\ncore_size = 3\nmax_size = 6\n[schedule]\nreport_interval_seconds = 0.5\n"
    )
    shutil.copy2(RUN_SH, home / "run.sh")
    return home


class RunSh:
    """Runs `SERVICE_HOME/run.sh VERB` with a test environment; kills what it left at the end."""

    def __init__(self, home: Path, redis_server: RedisServer) -> None:
        self.home = home
        self.port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("JOBWORKER_") and k not in ("REDIS_URL", "PROFILE", "PYTHONPATH")
        }
        env.update(
            SERVICE_HOME=str(home),
            PROFILES_ACTIVE="e2e",
            PYTHON=sys.executable,
            REDIS_URL=redis_server.url,
            JOBWORKER_GRPC__HOST="127.0.0.1",
            JOBWORKER_GRPC__PORT=str(self.port),
            JOBWORKER_WORKER__DRAIN_GRACE_SECONDS="30",
        )
        self.env = env

    def __call__(
        self, verb: str, *, timeout: float = 60, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        # the worker's output goes to logs/, so these pipes close when run.sh itself exits
        return subprocess.run(
            [str(self.home / "run.sh"), verb], env={**self.env, **extra}, capture_output=True,
            text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def pid_file(self) -> Path:
        return self.home / "run" / "jobworker.pid"

    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def log(self) -> str:
        return (self.home / "logs" / "jobworker.log").read_text(errors="replace")

    def jobworker(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The SERVICE_HOME venv's own CLI, against this worker (a job command's `--worker`)."""
        return subprocess.run(
            [str(self.home / "venv" / "bin" / "jobworker"), *args, "--worker",
             f"127.0.0.1:{self.port}"],
            capture_output=True, text=True, timeout=30, check=False, env=self.env,
        )  # fmt: skip

    def kill_leftover(self) -> None:
        try:
            pid = self.pid()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"jobworker" in cmdline:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def run_sh(
    service_home: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> Iterator[RunSh]:
    runner = RunSh(service_home, redis_server)
    try:
        yield runner
    finally:
        runner.kill_leftover()
        runner.pid_file.unlink(missing_ok=True)


def _get(client: redis.Redis, key: str) -> bytes | None:
    raw = client.get(key)
    assert raw is None or isinstance(raw, bytes)
    return raw


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _ok(result: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def test_start_status_restart_stop(run_sh: RunSh, redis_client: redis.Redis) -> None:
    out = _ok(run_sh("start", timeout=START_SECONDS))
    pid = run_sh.pid()
    assert f"started (pid {pid}, port {run_sh.port}, profile e2e)" in out
    key = f"wpm-apps:127.0.0.1:{pid}"
    raw = wait_for(lambda: _get(redis_client, key), timeout=10, what=f"PodInfo {key}")
    info = decode_pod_info(raw)
    assert (info.grpc_port, info.pid, info.core_size) == (run_sh.port, pid, 3)
    # the venv runs the wheel's code, not the work tree's
    where = subprocess.run(
        [str(run_sh.home / "venv" / "bin" / "python"), "-c", "import app; print(app.__file__)"],
        capture_output=True, text=True, timeout=30, check=True, env=run_sh.env, cwd=run_sh.home,
    ).stdout  # fmt: skip
    assert where.startswith(str(run_sh.home / "venv"))

    # a second start refuses to start another and leaves the first alone
    assert "already running" in _ok(run_sh("start"))
    assert run_sh.pid() == pid

    assert f"running (pid {pid}, port {run_sh.port}, health SERVING)" in _ok(run_sh("status"))

    out = _ok(run_sh("restart", timeout=START_SECONDS))
    new_pid = run_sh.pid()
    assert new_pid != pid
    assert _gone(pid)
    assert redis_client.get(key) is None, "the old worker deleted its key on the way out"
    new_key = f"wpm-apps:127.0.0.1:{new_pid}"
    wait_for(lambda: redis_client.get(new_key), timeout=10, what=f"PodInfo {new_key}")
    assert "making" not in out, "a restart reuses the venv while libs/ is unchanged"

    out = _ok(run_sh("stop"))
    assert f"stopped (pid {new_pid} drained and exited)" in out
    assert _gone(new_pid)
    assert redis_client.get(new_key) is None
    assert not run_sh.pid_file.exists()
    assert "worker stopped" in run_sh.log()

    assert "stopped" in _ok(run_sh("status"), 3)
    assert "not running" in _ok(run_sh("stop"))


def test_stop_waits_for_running_jobs_to_finish(run_sh: RunSh) -> None:
    _ok(run_sh("start", timeout=START_SECONDS))
    pid = run_sh.pid()
    submitted = run_sh.jobworker("submit", "sleep", "-p", "seconds=1.5", "--id", "drain-me")
    assert submitted.returncode == 0, submitted.stderr
    began = time.monotonic()
    _ok(run_sh("stop"))
    # the drain let the job run its 1.5 s instead of cancelling it
    assert time.monotonic() - began >= 1.0
    assert _gone(pid)
    log = run_sh.log()
    assert "SIGTERM: draining" in log
    assert "worker stopped" in log


def test_stop_gives_up_on_a_drain_that_takes_too_long(
    run_sh: RunSh, redis_client: redis.Redis
) -> None:
    _ok(run_sh("start", timeout=START_SECONDS))
    pid = run_sh.pid()
    submitted = run_sh.jobworker("submit", "sleep", "-p", "seconds=60", "--id", "slow")
    assert submitted.returncode == 0, submitted.stderr
    result = run_sh("stop", STOP_TIMEOUT="1")
    assert result.returncode == 1
    assert f"pid {pid} did not drain within 1s: sent SIGKILL" in result.stderr
    wait_for(lambda: _gone(pid), timeout=10, what=f"pid {pid} to die")
    assert not run_sh.pid_file.exists()
    # a killed worker could not delete its key: it lives out its TTL
    assert redis_client.get(f"wpm-apps:127.0.0.1:{pid}") is not None


def test_status_and_stop_with_a_stale_pid_file(run_sh: RunSh) -> None:
    run_sh.pid_file.parent.mkdir(exist_ok=True)
    # a PID that is certainly not a jobworker: this test process
    run_sh.pid_file.write_text(f"{os.getpid()}\n")
    assert "not running, but" in _ok(run_sh("status"), 1)
    assert "stale" in _ok(run_sh("stop"))
    assert not run_sh.pid_file.exists()


def test_start_fails_clearly_without_a_wheel(tmp_path: Path, run_sh: RunSh) -> None:
    (tmp_path / "libs").mkdir()
    shutil.copy2(RUN_SH, tmp_path / "run.sh")
    result = subprocess.run(
        [str(tmp_path / "run.sh"), "start"], env={**run_sh.env, "SERVICE_HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no job_worker_app-*.whl in" in result.stderr


def test_usage(run_sh: RunSh) -> None:
    result = run_sh("jump")
    assert result.returncode == 2
    assert "start|stop|status|restart" in result.stderr
