"""`jobworker dev`: the whole fleet from one command, as a real process with real children."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from app.cli.console import Console
from app.cli.dev_record import dev_record_path, read_dev_record
from tests.grpc_clients import grpcurl, grpcurl_json
from tests.helpers import ROOT, base_env, wait_for

READY = "fleet ready in"


class Dev:
    """A `python -m app dev` process; its output (the whole fleet's) goes to a file."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.env = base_env(tmp)
        self.out_path = tmp / "dev.out"
        self._out = self.out_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "dev", *args], env=self.env, cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, as a terminal's job has
        )  # fmt: skip

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            if text in self.output():
                return True
            if self.process.poll() is not None:
                raise AssertionError(f"dev exited ({self.process.returncode}):\n{self.output()}")
            return False

        wait_for(seen, timeout=timeout, what=f"{text!r} in the output of jobworker dev")

    def descendants(self) -> list[psutil.Process]:
        children: list[psutil.Process] = psutil.Process(self.process.pid).children(recursive=True)
        return children

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A client command in "another terminal": same user, same state folder, no flags."""
        return subprocess.run(
            [sys.executable, "-m", "app", *args], env=self.env, cwd=ROOT,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._out.close()


@pytest.fixture
def start_dev(tmp_path: Path) -> Iterator[Callable[..., Dev]]:
    """Start `jobworker dev` (once 9091 is free); whatever a test leaves running is killed."""
    started: list[tuple[Dev, list[psutil.Process]]] = []

    def start(*args: str, ready: bool = True) -> Dev:
        if ready:  # another test's worker (or another suite's) may hold 9091 a moment longer
            wait_for(lambda: port_free(9091), timeout=60, what="port 9091 to be free")
        dev = Dev(tmp_path, *args)
        children: list[psutil.Process] = []
        started.append((dev, children))
        if ready:
            dev.wait_output(READY)
            children.extend(dev.descendants())
        return dev

    try:
        yield start
    finally:
        for dev, children in started:
            dev.close()
            for child in children:
                if child.is_running():
                    child.kill()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def holding(port: int) -> Iterator[None]:
    """Listen on 127.0.0.1:port (if nobody does already) for the duration."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            pass  # taken by someone else: taken all the same
        yield


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def roles_of(processes: list[psutil.Process]) -> dict[str, psutil.Process]:
    """The role processes (`python -m app ROLE`) and the redis-server, by role."""
    found = {}
    for p in processes:
        argv = p.cmdline()
        if "-m" in argv and "app" in argv:
            found[argv[argv.index("app") + 1]] = p
        elif p.name() in ("redis-server", "valkey-server"):
            found["redis"] = p
    return found


def test_the_fleet_from_one_command(start_dev: Callable[..., Dev]) -> None:
    with holding(9090):  # the orchestrator's usual port: the clients must find it by the record
        dev = start_dev()
    out = dev.output()
    record = read_dev_record(dev.env)
    assert record is not None
    assert record.pid == dev.process.pid
    assert record.workers == ["127.0.0.1:9091", "127.0.0.1:9092"]
    assert record.orchestrator != "127.0.0.1:9090"
    assert record.redis_url.startswith("unix://")
    processes = roles_of(dev.descendants())
    assert set(processes) == {"orchestrator", "worker", "trigger", "redis"}
    assert record.trigger
    # each child's lines, prefixed by its name (no colour: this is not a terminal)
    for name in ("worker-1", "worker-2", "orchestrator", "trigger"):
        assert re.search(rf"^{name} +\| .* ready", out, re.M), name
    assert re.search(r"^dev +\| .*fleet ready in", out, re.M)
    assert "\x1b[" not in out

    # the seed's grpcurl lines, as written
    listed = grpcurl("-plaintext", "localhost:9091", "list", "worker.WorkerService")
    assert "worker.WorkerService.SendWork" in listed.stdout.split(), listed.stderr
    sent = grpcurl_json("-plaintext", "-d", '{"id":"job-1","name":"demo"}', "localhost:9091",
                        "worker.WorkerService/SendWork")  # fmt: skip
    assert sent["message"] == "job job-1 accepted: RUNNING"

    # the client commands, in another terminal, with no flags
    submitted = dev.cli("submit", "echo", "-p", "a=1", "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["job"]
    assert job["state"] == "SUCCEEDED"
    assert job["attempts"][0]["worker"] in record.workers
    workers = json.loads(dev.cli("workers").stdout)["workers"]
    assert sorted(w["address"] for w in workers) == record.workers
    status = dev.cli("status", "--worker")
    assert json.loads(status.stdout)["grpcPort"] == 9091, status.stderr
    # the whole fleet from its private Redis, found through the dev record
    fleet = json.loads(dev.cli("status", "--json").stdout)
    assert fleet["redis"] == record.redis_url
    assert fleet["redisSource"] == f"the running `jobworker dev` (pid {record.pid})"
    assert sorted((m["role"], m["address"]) for m in fleet["members"]) == sorted(
        [("orchestrator", record.orchestrator), ("trigger", record.trigger)]
        + [("worker", w) for w in record.workers]
    )
    # the trigger's demo schedule: listed from here, and its first tick runs on the fleet
    listed = dev.cli("schedules", "list")
    assert listed.returncode == 0, listed.stderr
    assert "demo-echo" in listed.stdout
    demo_ran = r"^orchestrator +\| .*job demo-echo@\S+ \(echo\) SUCCEEDED after 1 attempt"
    wait_for(lambda: re.search(demo_ran, dev.output(), re.M), timeout=30, what="a demo tick")

    # Ctrl-C: stopped in order, nothing left behind
    began = time.monotonic()
    dev.ctrl_c()
    assert dev.process.wait(60) == 0, dev.output()
    out = dev.output()
    stops = [m[1] for m in re.finditer(r"^dev +\| .*app\.cli\.dev: stopping (.*)$", out, re.M)]
    assert stops == ["trigger", "orchestrator", "worker-1, worker-2"]
    ends = [
        m[1] for m in re.finditer(r"^(\S+) +\| .*: (?:orchestrator|worker) stopped$", out, re.M)
    ]
    assert ends[0] == "orchestrator"
    assert sorted(ends[1:]) == ["worker-1", "worker-2"]
    assert out.rstrip().endswith("dev fleet stopped")
    wait_for(lambda: all(gone(p) for p in processes.values()), timeout=10, what="every child gone")
    assert not dev_record_path(dev.env).exists()
    assert "Traceback" not in out
    assert time.monotonic() - began < 30


def test_the_children_die_with_a_killed_dev(start_dev: Callable[..., Dev]) -> None:
    dev = start_dev("--log-format", "json")
    processes = roles_of(dev.descendants())
    assert {"orchestrator", "worker", "redis"} <= set(processes)
    # JSON lines, each naming its process
    entries = [json.loads(line) for line in dev.output().splitlines()]
    assert {e["process"] for e in entries} >= {"dev", "orchestrator", "worker-1", "worker-2"}
    ready = [e for e in entries if e["process"] == "worker-1" and "worker ready" in e["message"]]
    assert ready[0]["logger"] == "app.worker"
    dev.wait_output("working it here")  # the trigger took the demo schedule
    (taken,) = [json.loads(line) for line in dev.output().splitlines() if "working it" in line]
    assert (taken["process"], taken["schedule"]) == ("trigger", "demo-echo")
    everyone = dev.descendants()
    dev.process.send_signal(signal.SIGKILL)
    dev.process.wait(10)
    wait_for(lambda: all(gone(p) for p in everyone), timeout=30, what="every child of dev gone")
    # its record stays behind, but no client follows it
    assert dev_record_path(dev.env).exists()
    assert read_dev_record(dev.env) is None


def test_a_second_ctrl_c_stops_at_once(start_dev: Callable[..., Dev]) -> None:
    dev = start_dev()
    processes = roles_of(dev.descendants())
    # a job that would hold worker-1's drain for its whole 30 s grace
    sent = dev.cli("submit", "sleep", "-p", "seconds=120", "--id", "long", "--worker",
                   "127.0.0.1:9091")  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    dev.ctrl_c()
    dev.wait_output("stopping worker-1, worker-2")
    dev.wait_output("worker-1     | ")  # its drain began
    wait_for(lambda: "SIGTERM: draining" in dev.output().split("stopping worker-1")[-1],
             what="the workers' drain")  # fmt: skip
    began = time.monotonic()
    dev.ctrl_c()
    assert dev.process.wait(15) == 0, dev.output()
    assert time.monotonic() - began < 5
    assert "SIGINT again: killing what is left" in dev.output()
    wait_for(lambda: all(gone(p) for p in processes.values()), timeout=10, what="every child gone")
    assert not dev_record_path(dev.env).exists()


def test_a_child_that_cannot_start_stops_the_fleet_with_its_exit_code(
    start_dev: Callable[..., Dev],
) -> None:
    dev = start_dev("--jobs", "no_such_job_module", ready=False)
    assert dev.process.wait(60) == 2
    out = dev.output()
    assert re.search(
        r"^worker-1 +\| jobworker: config error: --jobs: cannot import 'no_such_job_module'",
        out, re.M,
    )  # fmt: skip
    assert re.search(r"^dev +\| .* exited with code 2 while starting: stopping$", out, re.M)
    assert READY not in out
    assert not dev_record_path(dev.env).exists()


def test_console_colours_names_on_a_terminal_only_and_keeps_json_lines() -> None:
    coloured, plain, lines = io.StringIO(), io.StringIO(), io.StringIO()
    Console(["dev", "worker-1"], stream=coloured, colour=True).write("worker-1", "hello")
    Console(["dev", "worker-1"], stream=plain).write("worker-1", "hello")  # a StringIO: no tty
    assert coloured.getvalue() == "\x1b[33mworker-1 |\x1b[0m hello\n"
    assert plain.getvalue() == "worker-1 | hello\n"
    json_console = Console(["worker-1"], json_lines=True, stream=lines)
    json_console.write("worker-1", '{"level":"INFO","message":"ready"}')
    json_console.write("worker-1", "Traceback (most recent call last):")
    assert [json.loads(line) for line in lines.getvalue().splitlines()] == [
        {"process": "worker-1", "level": "INFO", "message": "ready"},
        {"process": "worker-1", "message": "Traceback (most recent call last):"},
    ]


def test_port_9091_taken_is_one_line_and_exit_2(start_dev: Callable[..., Dev]) -> None:
    wait_for(lambda: port_free(9091), timeout=60, what="port 9091 to be free")
    with holding(9091):
        dev = start_dev(ready=False)
        assert dev.process.wait(60) == 2
    lines = dev.output().strip().splitlines()
    assert lines == [
        "jobworker: config error: port 9091: in use: worker-1 serves there (the seed's grpcurl"
        " lines call localhost:9091); stop what listens on it, e.g. another `jobworker worker`"
        " or `jobworker dev`"
    ]
    assert read_dev_record(dev.env) is None


def test_a_target_is_the_flag_then_the_variable_then_the_dev_fleet_then_the_default(
    tmp_path: Path,
) -> None:
    from app.cli.clients import resolve_target
    from app.cli.dev_record import DevRecord, write_dev_record

    env = {"XDG_STATE_HOME": str(tmp_path)}
    assert resolve_target("orchestrator", None, env) == "localhost:9090"
    assert resolve_target("worker", None, env) == "localhost:9091"
    # a process whose command line says `dev`, standing in for a running `jobworker dev`
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dev"])
    try:
        cmdline = Path(f"/proc/{stand_in.pid}/cmdline")
        wait_for(lambda: b"dev" in cmdline.read_bytes().split(b"\0"), what="its exec")
        record = DevRecord(pid=stand_in.pid, redis_url="unix:///x", orchestrator="h:7",
                           workers=["h:8", "h:9"])  # fmt: skip
        write_dev_record(record, env)
        assert resolve_target("orchestrator", None, env) == "h:7"
        assert resolve_target("worker", None, env) == "h:8"
        assert resolve_target("trigger", None, env) == "localhost:9089"  # none in this fleet
        named = {**env, "JOBWORKER_ORCHESTRATOR_TARGET": "e:1", "JOBWORKER_TARGET": "e:2"}
        assert resolve_target("orchestrator", None, named) == "e:1"
        assert resolve_target("worker", None, named) == "e:2"
        assert resolve_target("orchestrator", "f:1", named) == "f:1"
    finally:
        stand_in.kill()
        stand_in.wait(10)
    assert resolve_target("orchestrator", None, env) == "localhost:9090"  # its process is gone
