"""`jobworker status` and the client commands' targets, as an operator meets them.

Real processes on the session's redis-server: a worker, an orchestrator and a trigger replica
register; `status` shows them as a table and as JSON, marks a frozen (SIGSTOPped) one and a
back-dated record stale, drops a cleanly stopped one, refreshes in place on a terminal (a pty)
and once per refresh in a pipe, and ends on Ctrl-C with exit 0. Redis that cannot be reached is
one line and exit 1. Targets come from the config folder and the environment in the agreed
order, and a command sent to the wrong tier is told which tier answered. Last, every option of
every command has a help text, and each client command's help names its variables.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from app import __version__
from app.cli import build_parser, targets
from app.cli.dev_record import DevRecord, write_dev_record
from app.fleet.role_info import Role, RoleInfo, RoleStatus, encode_role_info
from tests.helpers import (
    BOTH_PATHS,
    ROOT,
    RedisServer,
    WorkerProcess,
    base_env,
    free_port,
    wait_for,
)

REPORT = "0.3"  # every role's report interval here: stale after 0.6 s


class StatusFleet:
    """A worker, an orchestrator and a trigger replica (started on demand) on the session's
    redis-server, each a real process."""

    def __init__(self, tmp: Path, server: RedisServer, fast_path: bool) -> None:
        self.tmp = tmp
        self.server = server
        self.fast_path = fast_path
        self.procs: list[WorkerProcess] = []
        self.orchestrator_port = free_port()

    def env(self, **extra: str) -> dict[str, str]:
        settings = dict(
            REDIS_URL=self.server.url,
            JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS=REPORT,
            JOBWORKER_ORCHESTRATOR__WORKER_REPORT_INTERVAL_SECONDS=REPORT,
            JOBWORKER_ORCHESTRATOR__DISCOVERY_INTERVAL_SECONDS="0.2",
            JOBWORKER_ORCHESTRATOR__HOST="127.0.0.1",
            JOBWORKER_ORCHESTRATOR__PORT=str(self.orchestrator_port),
            JOBWORKER_TRIGGER__HOST="127.0.0.1",
            JOBWORKER_TRIGGER__ORCHESTRATORS=f'["127.0.0.1:{self.orchestrator_port}"]',
            JOBWORKER_GRPC__FAST_PATH=str(self.fast_path).lower(),
        )
        return base_env(self.tmp / "state", **(settings | extra))

    def start(self, role: str) -> WorkerProcess:
        env = {"worker": {"JOBWORKER_GRPC__PORT": str(free_port())},
               "trigger": {"JOBWORKER_TRIGGER__PORT": str(free_port())}}.get(role, {})  # fmt: skip
        proc = WorkerProcess(self.env(**env), self.tmp / f"{role}-{len(self.procs)}.log", [], role)
        self.procs.append(proc)
        return proc.wait_ready(timeout=30)

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(env or self.env(), *args)

    def close(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped one would not die of SIGKILL's wait
            proc.close()


@pytest.fixture
def status_fleet(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis, fast_path: bool
) -> Iterator[StatusFleet]:
    fleet = StatusFleet(tmp_path, redis_server, fast_path)
    try:
        yield fleet
    finally:
        fleet.close()


def fleet_json(fleet: StatusFleet, *args: str) -> dict[str, Any]:
    result = fleet.cli("status", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def fleet_with(fleet: StatusFleet, *, members: int | None = None,
               stale: int | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The fleet's JSON when it has that many members (stale ones), else None."""
    snapshot = fleet_json(fleet)
    if members is not None and len(snapshot["members"]) != members:
        return None
    if stale is not None and snapshot["stale"] != stale:
        return None
    return snapshot


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip


def by_role(snapshot: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for member in snapshot["members"]:
        found.setdefault(member["role"], []).append(member)
    return found


def test_status_shows_the_live_fleet_and_marks_the_stale(status_fleet: StatusFleet) -> None:
    worker = status_fleet.start("worker")
    orchestrator = status_fleet.start("orchestrator")
    trigger = status_fleet.start("trigger")
    processes = {"worker": worker, "orchestrator": orchestrator, "trigger": trigger}

    snapshot = wait_for(lambda: fleet_with(status_fleet, members=3), what="three records")
    assert snapshot["redis"] == status_fleet.server.url
    assert snapshot["redisSource"] == "$REDIS_URL"
    assert snapshot["stale"] == 0
    roles = by_role(snapshot)
    assert list(roles) == ["trigger", "orchestrator", "worker"]  # from where jobs start
    for role, proc in processes.items():
        (member,) = roles[role]
        assert member["address"] == proc.target
        assert (member["pid"], member["port"]) == (proc.pid, proc.port)
        assert member["version"] == __version__
        assert member["startedAt"]
        assert member["key"]
        assert member["reportIntervalSeconds"] == float(REPORT)
        assert 0 <= member["reportAgeSeconds"] < 5
        assert 50 < member["ttlLeftSeconds"] <= 60
        assert (member["stale"], member["staleReason"]) == (False, "")
    assert roles["worker"][0]["status"] == "IDLE"
    assert roles["worker"][0]["loadDetail"]["maxSize"] == 8
    assert roles["orchestrator"][0]["status"] == "SERVING"
    assert roles["orchestrator"][0]["loadDetail"] == {"inflight": 0, "maxInflight": 256,
                                                      "waiting": 0}  # fmt: skip
    assert roles["trigger"][0]["status"] == "SERVING"
    assert roles["trigger"][0]["loadDetail"]["replicas"] == 1

    table = status_fleet.cli("status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"fleet in Redis at {status_fleet.server.url}, ")
    assert lines[0].endswith(": 1 trigger, 1 orchestrator, 1 worker")
    assert lines[1].split() == ["ROLE", "ADDRESS", "PID", "PORT", "STATUS", "LOAD", "REPORTED",
                                "VERSION"]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[2:]}
    for role, proc in processes.items():
        assert re.match(rf"{role} +{re.escape(proc.target)} +{proc.pid} +{proc.port} +", rows[role])
    assert re.search(r" 0/8 active, 0/100 queued +\d+\.\ds ago ", rows["worker"])
    assert " 0/256 in flight, 0 waiting " in rows["orchestrator"]
    assert "STALE" not in table.stdout

    # a frozen orchestrator stops reporting: marked stale, its record still there (TTL)
    os.kill(orchestrator.pid, signal.SIGSTOP)
    try:
        frozen = wait_for(
            lambda: fleet_with(status_fleet, stale=1), what="the stopped orchestrator stale"
        )
        (member,) = by_role(frozen)["orchestrator"]
        assert member["stale"]
        assert re.fullmatch(r"last report \d+\.\ds ago \(reports every 0\.3s\)",
                            member["staleReason"]), member  # fmt: skip
        table = status_fleet.cli("status")
        assert table.stdout.splitlines()[0].endswith("(1 stale)")
        (row,) = [line for line in table.stdout.splitlines() if line.startswith("orchestrator")]
        assert "STALE: last report " in row
    finally:
        os.kill(orchestrator.pid, signal.SIGCONT)
    wait_for(lambda: fleet_json(status_fleet)["stale"] == 0, timeout=10, what="fresh again")

    # a clean stop removes the record at once (no waiting for the TTL)
    trigger.signal(signal.SIGTERM)
    assert trigger.wait_exit() == 0
    assert "unregistered" in trigger.log()
    assert "trigger" not in by_role(fleet_json(status_fleet))
    orchestrator.signal(signal.SIGTERM)
    assert orchestrator.wait_exit() == 0
    assert list(by_role(fleet_json(status_fleet))) == ["worker"]


def role_record(role: Role, pid: int, *, age: float, interval: float = 5.0) -> RoleInfo:
    at = time.time() - age
    return RoleInfo(
        role=role, ip="10.1.2.3", grpc_port=9000 + pid, pid=pid, status=RoleStatus.SERVING,
        update_datetime="2026-01-01T00:00:00+00:00", update_epoch_ms=int(at * 1000),
        version="9.9", report_interval_seconds=interval, inflight=pid,
    )  # fmt: skip


def plant(client: redis.Redis, info: RoleInfo, ttl: int = 60) -> str:
    key = f"wpm-roles:{info.role.value}:{info.member}"
    client.set(key, encode_role_info(info), ex=ttl)
    client.zadd(f"wpm-roles:{info.role.value}", {info.member: time.time() + ttl})
    return key


def test_a_back_dated_record_is_marked_stale(status_fleet: StatusFleet,
                                             redis_client: redis.Redis) -> None:  # fmt: skip
    plant(redis_client, role_record(Role.ORCHESTRATOR, 1, age=1))
    plant(redis_client, role_record(Role.ORCHESTRATOR, 2, age=300))
    # about to expire: less than its report interval (5 s) left
    plant(redis_client, role_record(Role.TRIGGER, 3, age=1), ttl=4)
    redis_client.set("wpm-apps:10.9.9.9:1", b"junk", ex=60)  # not a PodInfo
    snapshot = fleet_json(status_fleet)
    stale = {m["address"]: m["staleReason"] for m in snapshot["members"] if m["stale"]}
    assert snapshot["stale"] == 3
    assert re.fullmatch(r"last report 30\d\.\ds ago \(reports every 5s\)", stale["10.1.2.3:9002"])
    assert stale["10.1.2.3:9003"].startswith("its record expires in ")
    assert stale["?"].startswith("unreadable record: ")
    assert "10.1.2.3:9001" not in stale
    redis_client.delete("wpm-roles:trigger:10.1.2.3:3")  # (it would expire meanwhile)
    table = status_fleet.cli("status")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].endswith(": 0 triggers, 2 orchestrators, 1 worker (2 stale)"), lines[0]
    assert re.search(r"^orchestrator +10\.1\.2\.3:9002 .* 5m ago +9\.9 +STALE: last report 30",
                     table.stdout, re.M), table.stdout  # fmt: skip
    assert re.search(r"^orchestrator +10\.1\.2\.3:9001 .* 9\.9$", table.stdout, re.M)


def read_pty(fd: int, until: re.Pattern[str], timeout: float) -> str:
    """Read the terminal's output until `until` matches all of it (or fail after `timeout`)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not until.search(seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {until.pattern!r} in {seen[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # EIO: the other end closed
                break
    return seen.decode(errors="replace")


def test_watch_refreshes_in_place_on_a_terminal(status_fleet: StatusFleet,
                                                redis_client: redis.Redis) -> None:  # fmt: skip
    plant(redis_client, role_record(Role.ORCHESTRATOR, 1, age=0))
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # after setsid: the pty becomes the child's terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "app", "status", "--watch", "0.2"], env=status_fleet.env(),
        cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=controlling_terminal,
    )  # fmt: skip
    os.close(slave)
    try:
        three_frames = re.compile(r"(\x1b\[H\x1b\[2J[^\x1b]*10\.1\.2\.3:9001[^\x1b]*){3}")
        shown = read_pty(master, three_frames, 30)
        # each refresh: cursor home and clear, then the table (no scrolling), then the note
        frames = shown.split("\x1b[H\x1b[2J")[1:]
        assert len(frames) >= 3
        for frame in frames[:2]:  # the last may be read in part
            assert frame.startswith("fleet in Redis at ")
            assert "orchestrator  10.1.2.3:9001" in frame
            assert "every 0.2s; Ctrl-C to stop" in frame
        os.write(master, b"\x03")  # Ctrl-C, through the terminal
        assert process.wait(15) == 0
        rest = read_pty(master, re.compile(r"$"), 1)
        assert "Traceback" not in shown + rest
        assert "KeyboardInterrupt" not in shown + rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(master)


def test_watch_piped_prints_one_table_per_refresh(status_fleet: StatusFleet,
                                                  redis_client: redis.Redis) -> None:  # fmt: skip
    plant(redis_client, role_record(Role.ORCHESTRATOR, 1, age=0, interval=60))
    for extra in ([], ["--json"]):
        with subprocess.Popen(
            [sys.executable, "-m", "app", "status", "--watch", "0.2", *extra],
            env=status_fleet.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        ) as process:  # fmt: skip
            assert process.stdout is not None
            assert process.stderr is not None
            try:
                heads = 0
                lines: list[str] = []
                while heads < 3:
                    line = process.stdout.readline()
                    assert line, process.stderr.read()
                    lines.append(line)
                    heads += line.startswith(("fleet in Redis at ", '{"at":'))
                process.send_signal(signal.SIGINT)  # Ctrl-C
                # (not communicate(): it would skip what readline() buffered already)
                out, err = process.stdout.read(), process.stderr.read()
                assert process.wait(15) == 0, err
            finally:
                if process.poll() is None:
                    process.kill()
        assert "Traceback" not in err
        text = "".join(lines) + out
        assert "\x1b[" not in text  # no terminal: nothing to clear, no note
        if extra:
            snapshots = [json.loads(line) for line in text.splitlines() if line]
            assert len(snapshots) >= 3
            assert {s["members"][0]["address"] for s in snapshots} == {"10.1.2.3:9001"}
        else:
            assert text.count("\nROLE ") >= 3


def test_unreachable_redis_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = base_env(tmp_path, REDIS_URL=url)
    for args in (["status"], ["status", "--json"], ["status", "--watch", "0.2"]):
        result = run_cli(env, *args)
        assert result.returncode == 1, result
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"jobworker: cannot read the fleet from Redis at {url} (from"
                               " $REDIS_URL): ")  # fmt: skip
    # nothing says where Redis is: a config error naming the key, exit 2
    bare = base_env(tmp_path)
    result = run_cli(bare, "status")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "jobworker: config error: redis.url: no Redis to read: set REDIS_URL (or redis.url in"
        " the config, or --redis URL), or start `jobworker dev`"
    )


# --- targets ----------------------------------------------------------------------------------


@pytest.fixture
def dev_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line says `dev`, as a running `jobworker dev`'s does."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "dev"])
    try:
        # just after exec, /proc/<pid>/cmdline reads empty for a moment
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        wait_for(lambda: b"dev" in cmdline.read_bytes().split(b"\0"), timeout=10)
        yield process
    finally:
        process.kill()
        process.wait(10)


def test_targets_resolve_in_the_agreed_order(
    tmp_path: Path, dev_process: subprocess.Popen[bytes]
) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    (config_dir / "application.toml").write_text(
        '[client]\norchestrator = "orch.example:7000"\n[trigger]\nport = 7089\n'
    )
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    resolve = targets.resolve
    # nothing set: localhost on the tier's configured port
    assert resolve("orchestrator", None, env) == targets.Target(
        kind="orchestrator", address="localhost:9090",
        source="the default: localhost, orchestrator.port",
    )  # fmt: skip
    assert resolve("trigger", None, env, config_dir=config_dir).address == "localhost:7089"
    assert resolve("worker", None, {**env, "JOBWORKER_GRPC__PORT": "9200"}).address == (
        "localhost:9200"
    )
    # a running `jobworker dev` beats the default...
    write_dev_record(DevRecord(pid=dev_process.pid, redis_url="unix:///tmp/dev.sock",
                               orchestrator="127.0.0.1:9390", workers=["127.0.0.1:9391"],
                               trigger="127.0.0.1:9389"), env)  # fmt: skip
    dev = f"the running `jobworker dev` (pid {dev_process.pid})"
    assert resolve("orchestrator", None, env) == targets.Target(
        kind="orchestrator", address="127.0.0.1:9390", source=dev
    )
    assert resolve("worker", None, env).address == "127.0.0.1:9391"
    # ...a config key beats the dev record (from a file, or its own variable)...
    from_file = resolve("orchestrator", None, env, config_dir=config_dir)
    assert from_file.address == "orch.example:7000"
    assert from_file.source == f"client.orchestrator in {config_dir / 'application.toml'}"
    with_dir_env = {**env, "JOBWORKER_CONFIG_DIR": str(config_dir)}
    assert resolve("orchestrator", None, with_dir_env).address == "orch.example:7000"
    key_env = {**with_dir_env, "JOBWORKER_CLIENT__ORCHESTRATOR": "orch.env:7001"}
    assert resolve("orchestrator", None, key_env) == targets.Target(
        kind="orchestrator", address="orch.env:7001", source="$JOBWORKER_CLIENT__ORCHESTRATOR"
    )
    # ...the tier's variable beats the config...
    var_env = {**key_env, "JOBWORKER_ORCHESTRATOR_TARGET": "orch.var:7002"}
    assert resolve("orchestrator", None, var_env) == targets.Target(
        kind="orchestrator", address="orch.var:7002", source="$JOBWORKER_ORCHESTRATOR_TARGET"
    )
    # ...and the flag beats everything
    assert resolve("orchestrator", "flag:7003", var_env).source == "--target"
    # the old entry point answers the address alone
    from app.cli.clients import resolve_target

    assert resolve_target("orchestrator", None, var_env) == "orch.var:7002"
    assert resolve_target("trigger", None, env) == "127.0.0.1:9389"
    # Redis: the services' settings, else the dev fleet's
    assert targets.resolve_redis(None, env).url == "unix:///tmp/dev.sock"
    assert targets.resolve_redis(None, env).source == dev
    configured = targets.resolve_redis(None, {**env, "REDIS_URL": "redis://r:1/0"})
    assert (configured.url, configured.source) == ("redis://r:1/0", "$REDIS_URL")
    by_host = targets.resolve_redis(None, {**env, "JOBWORKER_REDIS__HOST": "r2"})
    assert (by_host.display, by_host.source) == ("redis://r2:6379/0", "$JOBWORKER_REDIS__HOST")


def test_a_bad_client_key_is_a_config_error(tmp_path: Path) -> None:
    env = base_env(tmp_path, JOBWORKER_CLIENT__ORCHESTRATOR="nope")
    result = run_cli(env, "workers")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "jobworker: config error: client.orchestrator (from JOBWORKER_CLIENT__ORCHESTRATOR):"
        " 'nope' is not HOST:PORT"
    )


def test_client_commands_find_their_targets_from_config_and_env(
    status_fleet: StatusFleet, tmp_path: Path
) -> None:
    worker = status_fleet.start("worker")
    orchestrator = status_fleet.start("orchestrator")
    trigger = status_fleet.start("trigger")
    config_dir = tmp_path / "client-conf"
    config_dir.mkdir()
    (config_dir / "application.toml").write_text(
        f'[client]\nworker = "{worker.target}"\norchestrator = "{orchestrator.target}"\n'
        f'trigger = "{trigger.target}"\n'
    )
    env = status_fleet.env()
    # from the config folder (the flag, or the variable), with no --target anywhere
    for how in (["--config-dir", str(config_dir)], []):
        run_env = env if how else {**env, "JOBWORKER_CONFIG_DIR": str(config_dir)}
        workers = status_fleet.cli("workers", *how, env=run_env)
        assert workers.returncode == 0, workers.stderr
        assert [w["address"] for w in json.loads(workers.stdout)["workers"]] == [worker.target]
        own = status_fleet.cli("status", "--worker", *how, env=run_env)
        assert json.loads(own.stdout)["grpcPort"] == worker.port, own.stderr
        listed = status_fleet.cli("schedules", "list", *how, env=run_env)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith("no schedules\nreplicas up: ")
    # from the environment: the config key's variable
    by_key = status_fleet.cli(
        "submit", "echo", "-p", "a=1", "--wait", "--json",
        env={**env, "JOBWORKER_CLIENT__ORCHESTRATOR": orchestrator.target},
    )  # fmt: skip
    assert by_key.returncode == 0, by_key.stderr
    assert json.loads(by_key.stdout)["job"]["state"] == "SUCCEEDED", by_key.stdout
    # a target that does not answer: one line naming it and where it came from
    nobody = f"127.0.0.1:{free_port()}"
    (config_dir / "application.toml").write_text(f'[client]\norchestrator = "{nobody}"\n')
    for args, source in (
        (["workers", "--config-dir", str(config_dir)],
         f"client.orchestrator in {config_dir / 'application.toml'}"),
        (["jobs", "get", "x", "--target", nobody], "--target"),
    ):  # fmt: skip
        failed = status_fleet.cli(*args)
        assert failed.returncode == 1
        assert failed.stderr.startswith(
            f"jobworker: cannot reach the orchestrator at {nobody} (from {source}):"
            " ConnectionRefusedError"
        ), failed.stderr
        assert len(failed.stderr.splitlines()) == 1
    gone = status_fleet.cli("status", "--worker", env={**env, "JOBWORKER_TARGET": nobody})
    assert gone.stderr.startswith(
        f"jobworker: cannot reach the worker at {nobody} (from $JOBWORKER_TARGET): "
    ), gone.stderr


# every client command, at a tier that is not its own: (command, the tier it asks)
WRONG_TIER_CALLS = [
    (["status", "--worker", "{at}"], "worker"),
    (["submit", "echo", "--worker", "{at}"], "worker"),
    (["job", "j1", "--worker", "{at}"], "worker"),
    (["cancel", "j1", "--worker", "{at}"], "worker"),
    (["submit", "echo", "--target", "{at}"], "orchestrator"),
    (["job", "j1", "--target", "{at}"], "orchestrator"),
    (["cancel", "j1", "--target", "{at}"], "orchestrator"),
    (["jobs", "--target", "{at}"], "orchestrator"),
    (["jobs", "submit", "echo", "--target", "{at}"], "orchestrator"),
    (["jobs", "get", "j1", "--target", "{at}"], "orchestrator"),
    (["jobs", "cancel", "j1", "--target", "{at}"], "orchestrator"),
    (["jobs", "watch", "j1", "--target", "{at}"], "orchestrator"),
    (["workers", "--target", "{at}"], "orchestrator"),
    (["schedules", "--target", "{at}"], "trigger"),
    (["schedules", "get", "s", "--target", "{at}"], "trigger"),
    (["schedules", "pause", "s", "--target", "{at}"], "trigger"),
    (["schedules", "decisions", "s", "--target", "{at}"], "trigger"),
    (["why", "s", "--target", "{at}"], "trigger"),
]


@BOTH_PATHS
def test_every_client_command_at_the_wrong_tier_is_told_which(status_fleet: StatusFleet) -> None:
    """With the fast path off, grpclib answers an unknown method without a content-type: the
    client asks the server's reflection which services it serves."""
    worker = status_fleet.start("worker")
    orchestrator = status_fleet.start("orchestrator")
    trigger = status_fleet.start("trigger")
    other = {"worker": orchestrator, "orchestrator": trigger, "trigger": worker}
    article = {"worker": "a worker", "orchestrator": "an orchestrator", "trigger": "a trigger"}
    for args, tier in WRONG_TIER_CALLS:
        at = other[tier]
        flag = "--worker" if "--worker" in args else "--target"
        result = status_fleet.cli(*(a.format(at=at.target) for a in args))
        assert result.returncode == 1, (args, result)
        assert result.stderr == (
            f"jobworker: {at.target} is {article[at.role]}, not {article[tier]} (from {flag})\n"
        ), (args, result.stderr)
    # and from the environment, the message names the variable
    env = status_fleet.env(JOBWORKER_ORCHESTRATOR_TARGET=worker.target)
    result = status_fleet.cli("workers", env=env)
    assert result.stderr == (
        f"jobworker: {worker.target} is a worker, not an orchestrator"
        " (from $JOBWORKER_ORCHESTRATOR_TARGET)\n"
    )


# --- help -------------------------------------------------------------------------------------

# commands that call no tier and read no Redis (roles, and local tools)
NOT_CLIENTS = {"worker", "orchestrator", "trigger", "dev", "cron preview"}
# options hidden on purpose: (command, option) → where they are documented instead
HIDDEN = {("schedules", "--next"): "schedules list --next"}
# commands hidden on purpose (older spellings kept for scripts) → the one --help shows
HIDDEN_COMMANDS = {
    "jobs submit": "submit", "jobs get": "job", "jobs cancel": "cancel", "jobs watch": "job",
}  # fmt: skip


def walk(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, Any]]:
    """(command path, its parser) for every parser of the tree, the root's included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                hidden = f"{path} {name}".strip() in HIDDEN_COMMANDS
                assert helps.get(name) or hidden, (
                    f"`{path} {name}` has no help line in `{path} --help`"
                )
                yield from walk(sub, f"{path} {name}".strip())


def test_every_option_of_every_command_has_help() -> None:
    commands = dict(walk(build_parser()))
    assert {"status", "workers", "jobs get", "schedules list", "why", "lost", "health", "dev",
            "trigger", "cron preview"} <= set(commands)  # fmt: skip
    for path, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            if action.help == argparse.SUPPRESS:
                assert (path, name) in HIDDEN, f"`{path} {name}` is hidden"
                continue
            assert action.help, f"`{path} {name}` has no help text"
            assert len(action.help.split()) >= 2, f"`{path} {name}`: {action.help!r}?"


def test_each_client_command_names_the_variables_that_pick_its_target() -> None:
    leaves = {
        path: p
        for path, p in walk(build_parser())
        if path and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    }
    leaves["schedules"] = dict(walk(build_parser()))["schedules"]  # it lists, by itself
    config = ["PROFILE", "JOBWORKER_CONFIG_DIR", "XDG_STATE_HOME", "--profile", "--config-dir"]
    for path, parser in leaves.items():
        if path in NOT_CLIENTS:
            continue
        kind = parser.get_default("target_kind") or (
            "trigger" if path.split()[0] in ("schedules", "why") else None
        )
        text = parser.format_help()
        wanted = list(config)
        if kind is not None:
            wanted += [targets.TARGET_ENV[kind], f"JOBWORKER_CLIENT__{kind.upper()}"]
        if path in ("status", "lost"):
            wanted += ["REDIS_URL", "JOBWORKER_REDIS__<KEY>", "--redis"]
        if path == "status":
            wanted += ["JOBWORKER_TARGET", "JOBWORKER_CLIENT__WORKER"]
        assert kind is not None or path in ("status", "lost"), f"`{path}`: what does it call?"
        missing = [name for name in wanted if name not in text]
        assert not missing, f"`jobworker {path} --help` does not name {missing}"
    # the roles name theirs too
    for role, names in {
        "worker": ["REDIS_URL", "PROFILE", "JOBWORKER_CONFIG_DIR", "JOBWORKER_GRPC__PORT"],
        "orchestrator": ["REDIS_URL", "PROFILE", "JOBWORKER_CONFIG_DIR"],
        "trigger": ["REDIS_URL", "PROFILE", "JOBWORKER_CONFIG_DIR"],
        "dev": ["PROFILE", "JOBWORKER_CONFIG_DIR", "XDG_STATE_HOME"],
    }.items():
        text = dict(walk(build_parser()))[role].format_help()
        missing = [name for name in names if name not in text]
        assert not missing, f"`jobworker {role} --help` does not name {missing}"


def test_role_info_json_keeps_its_names() -> None:
    """What other tools read from Redis: camelCase, like PodInfo."""
    info = role_record(Role.TRIGGER, 5, age=0)
    decoded = msgspec.json.decode(encode_role_info(info))
    assert list(decoded)[:7] == ["role", "ip", "grpcPort", "pid", "status", "updateDatetime",
                                 "updateEpochMs"]  # fmt: skip
