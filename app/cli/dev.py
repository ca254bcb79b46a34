"""`jobworker dev`: the whole fleet on this machine, in one command.

    jobworker dev
    ├── redis-server        private: a unix socket in a temporary folder (as a worker embeds one)
    ├── orchestrator        127.0.0.1:9090, or a free port when that one is taken
    ├── worker-1, worker-2  127.0.0.1:9091 (where the seed's grpcurl lines call), then 9092
    └── trigger             127.0.0.1:9089, with a demo schedule: `echo` every 10 s

Each role is a child process (`python -m app ROLE`) in a session of its own, so that the
terminal's Ctrl-C reaches this process alone; their output comes out here, each line prefixed by
the child's name. The fleet is a list of `Child` records (`plan_fleet`, pure) that this module
then starts, watches and stops.

Ctrl-C, SIGTERM or SIGHUP drains in order: the trigger, the orchestrator, the workers (each
within its role's drain grace plus a margin, then killed), then Redis. A second one kills what
is left at once. The children die with this process even when it is SIGKILLed: each is started
through the parent-death shim the embedded Redis uses (Linux), and gets SIGTERM.

Once the fleet is ready its addresses are written to a record (`dev_record`), which the client
commands read: `jobworker submit echo --wait` in another terminal needs no flags. The
record is removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from app.cli.console import Console
from app.cli.dev_record import DevRecord, remove_dev_record, write_dev_record
from app.cli.launcher import add_log_options, log_overrides, run_service
from app.cli.logs import log_handler
from app.cli.runtime import EXIT_CONFIG
from app.config import Config, load_config
from app.errors import ConfigError
from app.stores.redis.embedded import EmbeddedRedis, dies_with_this_process

log = logging.getLogger("app.cli.dev")

HOST = "127.0.0.1"
#: worker-1's port: the seed's grpcurl lines call localhost:9091
FIRST_WORKER_PORT = 9091
ORCHESTRATOR_PORT = 9090
TRIGGER_PORT = 9089
#: from the start of the children to a fleet that answers, on a slow machine
READY_TIMEOUT_SECONDS = 60.0
#: past a role's own drain grace, before it is killed
STOP_MARGIN_SECONDS = 5.0
#: a setup command (the trigger's demo schedule)
SETUP_TIMEOUT_SECONDS = 30.0
#: a line longer than this is cut (a child's output is read line by line)
MAX_LINE_BYTES = 64 * 1024

# the trigger's demo schedule, made through its API once the fleet is ready (it lives in the
# private Redis, so it goes with the fleet)
DEMO_SCHEDULE = ("schedules", "create", "demo-echo", "--every", "10", "--job", "echo",
                 "-p", "from=jobworker dev")  # fmt: skip


class Child(msgspec.Struct, frozen=True, kw_only=True):
    """One process of the dev fleet: how to start it, where it answers, when it stops."""

    name: str
    role: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)
    port: int
    # stops before every child of a higher stage
    stage: int
    # its role's drain grace: how long its stop may take before it is killed (plus a margin)
    grace_seconds: float
    # `jobworker` commands run with `--target` this child once the fleet is ready
    setup: tuple[tuple[str, ...], ...] = ()


class DevPorts(msgspec.Struct, frozen=True, kw_only=True):
    """The ports chosen for the fleet (`choose_ports`)."""

    orchestrator: int
    workers: list[int]
    trigger: int


def plan_fleet(
    config: Config,
    ports: DevPorts,
    *,
    role_args: Sequence[str] = (),
    jobs: Sequence[str] = (),
) -> list[Child]:
    """The children of a dev fleet: pure, from the config (drain graces) and the ports.

    `role_args` go to every role (`--profile`, `--config-dir`), `jobs` to the workers.
    """
    orchestrator = f"{HOST}:{ports.orchestrator}"
    children = [
        Child(
            name="orchestrator",
            role="orchestrator",
            args=(*role_args, "--port", str(ports.orchestrator)),
            env={"JOBWORKER_ORCHESTRATOR__HOST": HOST, "JOBWORKER_ORCHESTRATOR__PORT_SEARCH": "0"},
            port=ports.orchestrator,
            stage=1,
            grace_seconds=config.orchestrator.drain_grace_seconds,
        )
    ]
    for n, port in enumerate(ports.workers, start=1):
        children.append(
            Child(
                name=f"worker-{n}",
                role="worker",
                args=(*role_args, "--port", str(port), *(a for m in jobs for a in ("--jobs", m))),
                env={"JOBWORKER_GRPC__HOST": HOST, "JOBWORKER_GRPC__PORT_SEARCH": "0"},
                port=port,
                stage=2,
                grace_seconds=config.worker.drain_grace_seconds,
            )
        )
    children.append(
        Child(
            name="trigger",
            role="trigger",
            args=(*role_args, "--port", str(ports.trigger), "--orchestrator", orchestrator),
            env={"JOBWORKER_TRIGGER__HOST": HOST, "JOBWORKER_TRIGGER__PORT_SEARCH": "0"},
            port=ports.trigger,
            stage=0,
            grace_seconds=config.trigger.drain_grace_seconds,
            setup=(DEMO_SCHEDULE,),
        )
    )
    return children


def _port_free(port: int) -> bool:
    """Whether a server may listen on HOST:port (as the roles bind: with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
        return True


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _preferred_or_free(port: int, taken: set[int]) -> int:
    chosen = port if port not in taken and _port_free(port) else _any_free_port()
    taken.add(chosen)
    return chosen


def choose_ports(workers: int) -> DevPorts:
    """9091 for worker-1 (ConfigError when taken), else the usual ports or free ones."""
    if not _port_free(FIRST_WORKER_PORT):
        raise ConfigError(
            f"port {FIRST_WORKER_PORT}",
            "in use: worker-1 serves there (the seed's grpcurl lines call localhost:9091);"
            " stop what listens on it, e.g. another `jobworker worker` or `jobworker dev`",
        )
    taken = {FIRST_WORKER_PORT}
    worker_ports = [FIRST_WORKER_PORT]
    for n in range(1, workers):
        worker_ports.append(_preferred_or_free(FIRST_WORKER_PORT + n, taken))
    return DevPorts(
        orchestrator=_preferred_or_free(ORCHESTRATOR_PORT, taken),
        workers=worker_ports,
        trigger=_preferred_or_free(TRIGGER_PORT, taken),
    )


class _Running:
    """A child's process, the task that pumps its output, and how it ended."""

    def __init__(self, child: Child, console: Console) -> None:
        self.child = child
        self._console = console
        self.process: anyio.abc.Process | None = None
        self.exited = anyio.Event()
        self.stopping = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    async def run(
        self,
        env: dict[str, str],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the child, report started, write its lines until it exits; kill it if cancelled."""
        command = [*dies_with_this_process(), sys.executable, "-m", "app", self.child.role,
                   *self.child.args]  # fmt: skip
        self.process = process = await anyio.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**env, **self.child.env},
            start_new_session=True,  # the terminal's Ctrl-C is ours to hand on, in order
        )
        task_status.started()
        try:
            assert process.stdout is not None
            await self._pump(BufferedByteReceiveStream(process.stdout))
            await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    with anyio.move_on_after(STOP_MARGIN_SECONDS):
                        await process.wait()
                with anyio.move_on_after(1):
                    await process.aclose()
            self.exited.set()
            if not self.stopping:
                log.warning("%s exited with code %s", self.child.name, process.returncode)

    async def _pump(self, stream: BufferedByteReceiveStream) -> None:
        while True:
            try:
                line = await stream.receive_until(b"\n", MAX_LINE_BYTES)
            except anyio.DelimiterNotFound:
                line = await stream.receive(MAX_LINE_BYTES)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError):
                rest = stream.buffer
                if rest:
                    self._console.write(self.child.name, rest.decode(errors="replace"))
                return
            self._console.write(self.child.name, line.decode(errors="replace").rstrip("\r"))

    def send_signal(self, signum: signal.Signals) -> None:
        """Send `signum` if the child still runs."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                self.process.send_signal(signum)


class DevFleet:
    """Runs the planned children over a private Redis until a signal stops them in order."""

    def __init__(self, children: list[Child], console: Console, env: dict[str, str]) -> None:
        self._console = console
        self._env = env
        self._running = [_Running(child, console) for child in children]
        self._stop = anyio.Event()
        self._killed = False
        self.exit_code = 0

    def __repr__(self) -> str:
        alive = sum(r.returncode is None and r.process is not None for r in self._running)
        return f"<DevFleet children={len(self._running)} alive={alive}>"

    async def run(self) -> int:
        """Run the fleet until a signal; the exit code (0, or that of a child that failed to
        start: 2 for its config error)."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, signals)
                redis = EmbeddedRedis()
                redis_url: str = await tg.start(redis.run)
                log.info("redis-server at %s (pid %d)", redis_url, redis.pid)
                env = {**self._env, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
                record: DevRecord | None = None
                try:
                    async with anyio.create_task_group() as children:
                        for running in self._running:
                            await children.start(running.run, env)
                        record = await self._until_ready(redis_url)
                        if record is not None:
                            await self._stop.wait()
                        await self._stop_in_order()
                        children.cancel_scope.cancel()
                finally:
                    if record is not None:
                        remove_dev_record(os.getpid(), self._env)
                    tg.cancel_scope.cancel()  # Redis last
        log.info("dev fleet stopped")
        return self.exit_code

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            if not self._stop.is_set():
                log.info("%s: stopping the fleet in order (again: at once)", signum.name)
                self._stop.set()
            else:
                log.warning("%s again: killing what is left", signum.name)
                self._killed = True
                for running in self._running:
                    running.stopping = True
                    running.send_signal(signal.SIGKILL)

    async def _until_ready(self, redis_url: str) -> DevRecord | None:
        """Wait for every child to serve and the orchestrator to list every worker, then write
        the record; None when a child exited, time ran out or a signal came first."""
        began = time.monotonic()
        problem = ""
        async with anyio.create_task_group() as tg:

            async def stop_waiting_on_signal() -> None:
                await self._stop.wait()
                tg.cancel_scope.cancel()

            async def wait_ready() -> None:
                nonlocal problem
                with anyio.move_on_after(READY_TIMEOUT_SECONDS) as waiting:
                    problem = await self._wait_ready()
                if waiting.cancelled_caught:
                    problem = f"the fleet was not ready within {READY_TIMEOUT_SECONDS:g}s"
                tg.cancel_scope.cancel()

            tg.start_soon(stop_waiting_on_signal)
            tg.start_soon(wait_ready)
        if self._stop.is_set():
            return None
        if problem:
            log.error("%s: stopping", problem)
            failed = [r.returncode for r in self._running if r.exited.is_set()]
            self.exit_code = EXIT_CONFIG if EXIT_CONFIG in failed else 1
            self._stop.set()
            return None
        await self._set_up()
        record = self._record(redis_url)
        path = write_dev_record(record, self._env)
        self._say_ready(record, time.monotonic() - began, path)
        return record

    async def _wait_ready(self) -> str:
        """'' once every child serves and the orchestrator lists every worker, else what went
        wrong (a child exited)."""
        for running in self._running:
            problem = await self._wait_serving(running)
            if problem:
                return problem
        orchestrator = next(r for r in self._running if r.child.role == "orchestrator")
        workers = sum(r.child.role == "worker" for r in self._running)
        while await _listed_workers(orchestrator.child.port) < workers:
            if orchestrator.exited.is_set():
                return f"orchestrator exited with code {orchestrator.returncode} while starting"
            await anyio.sleep(0.1)
        return ""

    async def _wait_serving(self, running: _Running) -> str:
        while not await _serving(running.child.port):
            if running.exited.is_set():
                return f"{running.child.name} exited with code {running.returncode} while starting"
            await anyio.sleep(0.1)
        return ""

    async def _set_up(self) -> None:
        """Run each child's setup commands (the trigger's demo schedule); a failure is said."""
        for running in self._running:
            for args in running.child.setup:
                command = " ".join(args)
                target = ("--target", f"{HOST}:{running.child.port}")
                result: subprocess.CompletedProcess[bytes] | None = None
                with anyio.move_on_after(SETUP_TIMEOUT_SECONDS):
                    result = await anyio.run_process(
                        [sys.executable, "-m", "app", *args, *target],
                        env=self._env, stdin=subprocess.DEVNULL, check=False,
                    )  # fmt: skip
                if result is None:
                    log.warning("`jobworker %s` took over %gs", command, SETUP_TIMEOUT_SECONDS)
                elif result.returncode:
                    said = (result.stderr or result.stdout).decode(errors="replace").strip()
                    log.warning("`jobworker %s` failed: %s", command, said)
                else:
                    log.info("set up: jobworker %s", command)

    def _record(self, redis_url: str) -> DevRecord:
        def address(role: str) -> list[str]:
            return [f"{HOST}:{r.child.port}" for r in self._running if r.child.role == role]

        return DevRecord(
            pid=os.getpid(),
            redis_url=redis_url,
            orchestrator=address("orchestrator")[0],
            workers=address("worker"),
            trigger=next(iter(address("trigger")), ""),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def _say_ready(self, record: DevRecord, took: float, path: Path) -> None:
        lines = [
            f"fleet ready in {took:.1f}s: orchestrator {record.orchestrator}, workers"
            f" {', '.join(record.workers)}"
            + (f", trigger {record.trigger}" if record.trigger else ""),
            f"redis {record.redis_url}; the clients find this fleet in {path}",
            "try, in another terminal:",
            "  jobworker submit echo -p a=1 --wait",
            "  jobworker jobs",
            "  jobworker workers",
            '  grpcurl -plaintext -d \'{"id":"job-1","name":"demo"}\' localhost:9091'
            " worker.WorkerService/SendWork",
            "Ctrl-C stops the fleet (a second Ctrl-C: at once)",
        ]
        for line in lines:  # whatever log.level says: this is what the command is for
            self._console.write("dev", line)

    async def _stop_in_order(self) -> None:
        """SIGTERM stage by stage, each within its grace plus a margin, then SIGKILL."""
        for stage in sorted({r.child.stage for r in self._running}):
            group = [r for r in self._running if r.child.stage == stage and r.pid]
            live = [r for r in group if not r.exited.is_set()]
            if not live:
                continue
            grace = max(r.child.grace_seconds for r in live) + STOP_MARGIN_SECONDS
            log.info("stopping %s", ", ".join(r.child.name for r in live))
            for running in live:
                running.stopping = True
                running.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace):
                for running in live:
                    await running.exited.wait()
            for running in live:
                if not running.exited.is_set():
                    if not self._killed:
                        log.warning("%s did not stop within %gs: killed", running.child.name, grace)
                    running.send_signal(signal.SIGKILL)
            with anyio.move_on_after(STOP_MARGIN_SECONDS):
                for running in live:
                    await running.exited.wait()
        for running in self._running:
            running.stopping = True


async def _serving(port: int) -> bool:
    """Whether the gRPC server on HOST:port answers its health check SERVING."""
    from grpclib.client import Channel
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    channel = Channel(HOST, port)
    try:
        with anyio.move_on_after(2):
            reply = await HealthStub(channel).Check(HealthCheckRequest())
            return bool(reply.status == HealthCheckResponse.SERVING)
        return False
    except Exception:  # refused, reset, not serving yet: not ready
        return False
    finally:
        channel.close()


async def _listed_workers(port: int) -> int:
    """How many workers the orchestrator on HOST:port lists (0 when it does not answer)."""
    from grpclib.client import Channel

    from app.pb import orchestrator as pb

    channel = Channel(HOST, port)
    try:
        with anyio.move_on_after(2):
            reply = await pb.OrchestratorServiceStub(channel).list_workers(pb.ListWorkersRequest())
            return len(reply.workers)
        return 0
    except Exception:  # not answering yet
        return 0
    finally:
        channel.close()


def _dev(args: argparse.Namespace) -> int:
    overrides = log_overrides(args)
    env = dict(os.environ)
    config = load_config(env, profile=args.profile, config_dir=args.config_dir, overrides=overrides)
    if args.workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {args.workers}")
    ports = choose_ports(args.workers)
    role_args: list[str] = []
    if args.profile:
        role_args += ["--profile", args.profile]
    if args.config_dir:
        role_args += ["--config-dir", str(args.config_dir.resolve())]
    children = plan_fleet(config, ports, role_args=role_args, jobs=args.jobs)
    console = Console(["dev", *(c.name for c in children)], json_lines=config.log.format == "json")
    _log_to(console, config)
    env["JOBWORKER_LOG__FORMAT"] = config.log.format
    return run_service(DevFleet(children, console, env).run)


def _log_to(console: Console, config: Config) -> None:
    """This process's own lines go to the console as `dev`'s."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(config.log.format, console.stream_for("dev"))]
    root.setLevel(config.log.level.upper())
    # EmbeddedRedis says "no Redis configured"; the fleet's own line says where it is
    logging.getLogger("app.stores.redis.embedded").setLevel(logging.WARNING)


DEV_EPILOG = """\
environment:
  PROFILE                        the config profile of every role (as --profile)
  JOBWORKER_CONFIG_DIR           a folder of application*.toml (as --config-dir)
  JOBWORKER_<SECTION>__<KEY>     any config key, handed to every role
  XDG_STATE_HOME                 where the fleet's record goes
                                 ($XDG_STATE_HOME/jobworker/dev.json), which the client
                                 commands read to find it
REDIS_URL is not used: the fleet runs on a private redis-server of its own.
"""


def add_parsers(sub: Any) -> None:
    """`dev`, on the `jobworker` subparsers `sub`."""
    dev = sub.add_parser(
        "dev",
        help="run the whole fleet here: a private Redis, an orchestrator, two workers, a trigger",
        description=(
            "Start a private redis-server, an orchestrator, workers (the first on 9091) and a"
            " trigger with a demo schedule (echo every 10 s); each a child process whose"
            " output is prefixed by its name. Ctrl-C drains and stops them in order; a second"
            " Ctrl-C stops them at once. The client commands find the fleet with no flags."
        ),
        epilog=DEV_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev.add_argument(
        "--profile", help="config profile of every role (default: $PROFILE, else local)"
    )
    dev.add_argument("--config-dir", type=Path, help="folder of external application*.toml")
    dev.add_argument(
        "--jobs",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE in the workers so its @job functions register (repeatable)",
    )
    dev.add_argument("--workers", type=int, default=2, help="how many workers (default 2)")
    add_log_options(dev)
    dev.set_defaults(func=_dev)
