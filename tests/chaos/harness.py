"""The chaos scenarios' fleet: a redis-server, workers and orchestrators as real processes, faults
on demand, and the ledger that tells lost and repeated work apart.

Each process slot keeps its port, so a killed process comes back where it was (as a restarted
pod or a run.sh restart would). Jobs are `chaos_jobs.work` runs that note their start and end
in one ledger file, and every job id is submitted through the orchestrators' gRPC API with the
retries a client makes when one is down (ids are idempotent).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import grpc
import msgspec
import redis

from tests.chaos.proxy import FaultProxy
from tests.helpers import (
    RedisServer,
    WorkerProcess,
    base_env,
    free_port,
    redis_server_binary,
    wait_for,
)

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"}
#: How an attempt ends when the fleet took its worker for gone: its run may come back and end.
LOST_OUTCOMES = {"LOST", "UNREACHABLE"}
JOB_MODULE = "tests.chaos.chaos_jobs"
PORT_KEYS = {
    "worker": "JOBWORKER_GRPC__PORT",
    "orchestrator": "JOBWORKER_ORCHESTRATOR__PORT",
    "trigger": "JOBWORKER_TRIGGER__PORT",
}


@dataclass
class Slot:
    """One process place: its role, its fixed port, and the process in it now (if any).

    A worker slot may sit behind fault proxies: `grpc_proxy` (the port it advertises, so that
    orchestrators reach it through the proxy) and `redis_proxy` (its way to Redis)."""

    role: str
    port: int
    process: WorkerProcess | None = None
    starts: int = 0
    grpc_proxy: FaultProxy | None = None
    redis_proxy: FaultProxy | None = None

    @property
    def address(self) -> str:
        """Where orchestrators reach it (the worker's PodInfo address)."""
        return f"127.0.0.1:{self.grpc_proxy.port if self.grpc_proxy else self.port}"


class LedgerLine(NamedTuple):
    """One line of the chaos jobs' ledger."""

    kind: str  # start | done
    key: str
    pid: int
    token: int


@dataclass
class Report:
    """What a scenario ends with, counted from the job records and the ledger."""

    submitted: int
    terminal: Counter[str]
    lost: list[str]
    completed_twice: list[str]
    # completed more than once, but not with an attempt recorded as lost for each extra run
    unexplained_repeats: list[str]
    rerun_after_kill: list[str]
    faults: int
    settle_seconds: float
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The figures, one a line, for the test's output."""
        return [
            f"submitted {self.submitted}, terminal {sum(self.terminal.values())} "
            f"({dict(self.terminal)}), faults {self.faults}",
            f"lost (never terminal) {len(self.lost)}: {self.lost[:10]}",
            f"completed more than once {len(self.completed_twice)}: {self.completed_twice[:10]}",
            f"  of which not explained by an attempt recorded as lost"
            f" {len(self.unexplained_repeats)}: {self.unexplained_repeats[:10]}",
            f"run again after a run was killed mid-way {len(self.rerun_after_kill)}",
            f"from the last fault to all terminal: {self.settle_seconds:.1f}s",
            *self.notes,
        ]


class ChaosFleet:
    """Real processes on a private redis-server; `kill`, `stop`/`cont` and `restart` faults."""

    def __init__(self, tmp: Path, orch: SimpleNamespace, *, seed: int = 1) -> None:
        self.tmp = tmp
        self.orch = orch
        self.rng = random.Random(seed)
        self.redis = RedisServer(tmp / "redis")
        (tmp / "redis").mkdir()
        self.ledger = tmp / "ledger.txt"
        self.slots: list[Slot] = []
        self.faults = 0
        self.last_fault = time.monotonic()
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}
        self.trigger_config = tmp / "trigger-config"
        self.extra_env: dict[str, str] = {}  # for every process started from now on
        # Submits that failed, by job id (each retried until one is accepted): a client that got
        # no OK for a submit cannot have been promised the job by that attempt
        self.submit_errors: Counter[str] = Counter()
        self.defaults = False  # True: every process on the shipped settings, none tuned
        self.redis_env: dict[str, str] | None = None  # how they find Redis (default: REDIS_URL)
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- processes ------------------------------------------------------------------------------

    def start_redis(self, *extra: str) -> None:
        """Start the fleet's redis-server (again, on the same port and folder), with `extra`
        arguments (`--appendonly yes`) when given."""
        if extra:
            self.redis.extra = list(extra)
        self.redis.start()

    def redis_down(self, signum: int = signal.SIGTERM) -> None:
        """A fault: `signum` to redis-server, and wait for it to exit (a SIGTERM with AOF on
        writes and syncs the file first)."""
        process = self.redis.process
        assert process is not None
        process.send_signal(signum)
        process.wait(10)
        self.redis.process = None
        self.note_fault()

    def note_fault(self) -> None:
        """Count a fault made from outside the harness (a fail-over), now."""
        with self._lock:
            self.faults += 1
            self.last_fault = time.monotonic()

    def redis_up(self, *, empty: bool = False) -> None:
        """Start redis-server again where it was; `empty`: without its files (all data lost)."""
        if empty:
            for path in (self.tmp / "redis").iterdir():
                if path.suffix != ".log":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.redis.start()
        with self._lock:
            self.last_fault = time.monotonic()

    def cut_aof(self, *, seconds: float, before: float) -> int:
        """Drop the AOF's writes of at least the last `seconds` before `before` (Unix time; up
        to a second more, the marks being whole seconds), as a machine that lost power would with
        `appendfsync everysec`: redis-server must run with `--aof-timestamp-enabled yes` (a `#TS:`
        line before each second's first write) and be stopped. The bytes cut."""
        aof_dir = self.tmp / "redis" / "appendonlydir"
        incr = sorted(aof_dir.glob("*.incr.aof"), key=lambda p: int(p.name.split(".")[-3]))[-1]
        data = incr.read_bytes()
        cutoff, position, cut_at = before - seconds, 0, len(data)
        while (found := data.find(b"#TS:", position)) != -1:
            end = data.index(b"\r\n", found)
            if int(data[found + 4 : end]) >= math.floor(cutoff):
                cut_at = found
                break
            position = end
        incr.write_bytes(data[:cut_at])
        return len(data) - cut_at

    def logs(self, role: str | None = None) -> dict[str, str]:
        """Every process log of `role` (all roles when None) so far, by file name."""
        return {
            p.name: p.read_text(errors="replace")
            for p in sorted(self.tmp.glob(f"{role or '*'}-*.log"))
        }

    def http_port(self, slot: Slot) -> int:
        """The slot's /metrics, /healthz, /readyz port (`extra_env` sets metrics.port to 0)."""
        assert slot.process is not None
        return int(slot.process.wait_log(r"http on http://[^:]+:(\d+)")[1])

    def health(self, slot: Slot) -> str:
        """What the slot's gRPC health service answers: SERVING, NOT_SERVING, or the error."""
        # grpclib's generated messages: grpcio-health-checking's would register the same proto
        # names a second time in the process's descriptor pool (an error)
        from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

        channel = self._channels.get(slot.port)
        if channel is None:
            channel = self._channels[slot.port] = grpc.insecure_channel(f"127.0.0.1:{slot.port}")
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        try:
            reply = check(HealthCheckRequest(), timeout=2)
        except grpc.RpcError as exc:
            return f"error {exc.code().name}"
        return str(HealthCheckResponse.ServingStatus.Name(reply.status))

    def tracebacks(self) -> dict[str, int]:
        """Log files with a traceback in them, and how many."""
        found = {name: text.count("Traceback") for name, text in self.logs().items()}
        return {name: n for name, n in found.items() if n}

    def env(self, slot: Slot, **extra: str) -> dict[str, str]:
        port_key = PORT_KEYS[slot.role]
        essentials = dict(
            **(self.redis_env or {"REDIS_URL": self.redis.url}),
            CHAOS_LEDGER=str(self.ledger),
            JOBWORKER_LOG__LEVEL="INFO",
            **{port_key: str(slot.port), "JOBWORKER_ORCHESTRATOR__HOST": "127.0.0.1"},
        )
        tuned = dict(
            JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS="0.5",
            JOBWORKER_ORCHESTRATOR__WORKER_REPORT_INTERVAL_SECONDS="0.5",
            JOBWORKER_ORCHESTRATOR__DISCOVERY_INTERVAL_SECONDS="0.2",
            JOBWORKER_ORCHESTRATOR__CLAIM_IDLE_SECONDS="2",
            JOBWORKER_ORCHESTRATOR__RETRY_BASE_SECONDS="0.05",
            JOBWORKER_ORCHESTRATOR__RETRY_MAX_SECONDS="0.5",
            JOBWORKER_ORCHESTRATOR__MAX_ATTEMPTS="10",
            JOBWORKER_ORCHESTRATOR__KEEPALIVE_SECONDS="1",
            JOBWORKER_ORCHESTRATOR__KEEPALIVE_TIMEOUT_SECONDS="1",
            JOBWORKER_WORKER__CORE_SIZE="8",
            JOBWORKER_WORKER__MAX_SIZE="16",
        )
        # the chaos scenarios detect and retry fast; `defaults` runs the fleet as shipped
        settings = essentials if self.defaults else essentials | tuned
        # the scenario's settings, then the slot's proxies, then the call's win over defaults
        return base_env(
            self.tmp / f"{slot.role}-{slot.port}",
            **(settings | self.extra_env | self._proxied(slot) | self._trigger(slot) | extra),
        )

    def _trigger(self, slot: Slot) -> dict[str, str]:
        """A trigger replica's settings: every orchestrator slot, fast take-overs, the schedules
        of `declare_schedules`."""
        if slot.role != "trigger":
            return {}
        ports = [s.port for s in self.slots if s.role == "orchestrator"]
        return {
            "JOBWORKER_TRIGGER__HOST": "127.0.0.1",
            "JOBWORKER_TRIGGER__ORCHESTRATORS": json.dumps([f"127.0.0.1:{p}" for p in ports]),
            "JOBWORKER_TRIGGER__LEASE_SECONDS": "1.5",
            "JOBWORKER_TRIGGER__CALL_TIMEOUT_SECONDS": "1",
            "JOBWORKER_CONFIG_DIR": str(self.trigger_config),
        }

    def trigger_owner(self, name: str, prefix: str = "wpm-trigger") -> Slot | None:
        """The trigger slot working schedule `name` now (its lease holds `host:pid:...`)."""
        client = self.redis.client()
        try:
            holder = client.get(f"{prefix}:{{{name}}}:lease")
        finally:
            client.close()
        if holder is None:
            return None
        pid = int(cast(bytes, holder).decode().split(":")[1])
        return next((s for s in self.live("trigger") if s.process and s.process.pid == pid), None)

    def declare_schedules(self, toml: str) -> None:
        """The `[[schedules]]` trigger replicas start with (a `work` job keys on its job id)."""
        self.trigger_config.mkdir(exist_ok=True)
        (self.trigger_config / "application.toml").write_text(toml)

    def _proxied(self, slot: Slot) -> dict[str, str]:
        env = {}
        if slot.grpc_proxy is not None:
            env["JOBWORKER_GRPC__ADVERTISE_PORT"] = str(slot.grpc_proxy.port)
        if slot.redis_proxy is not None:
            env["REDIS_URL"] = f"redis://127.0.0.1:{slot.redis_proxy.port}/0"
        return env

    def add(self, role: str, count: int = 1, *, proxied: bool = False) -> list[Slot]:
        """`count` new slots of `role`, started (`proxied`: behind fault proxies)."""
        added = []
        for _ in range(count):
            slot = Slot(role=role, port=free_port())
            if proxied:
                slot.grpc_proxy = FaultProxy(slot.port)
                slot.redis_proxy = FaultProxy(self.redis.port)
            self.slots.append(slot)
            self._start(slot)
            added.append(slot)
        return added

    def _start(self, slot: Slot) -> None:
        args = ["--jobs", JOB_MODULE] if slot.role == "worker" else []
        if slot.process is not None:
            slot.process.close()  # the one killed: reaped, its log closed
        log = self.tmp / f"{slot.role}-{slot.port}-{slot.starts}.log"
        slot.starts += 1
        slot.process = WorkerProcess(self.env(slot), log, args, slot.role).wait_ready(timeout=30)

    def live(self, role: str | None = None) -> list[Slot]:
        return [
            s for s in self.slots
            if s.process is not None and s.process.process.poll() is None
            and (role is None or s.role == role)
        ]  # fmt: skip

    def kill(self, slot: Slot, signum: int = signal.SIGKILL) -> None:
        """A fault: `signum` to the slot's process."""
        assert slot.process is not None
        slot.process.signal(signum)
        if signum == signal.SIGKILL:
            slot.process.process.wait(10)
        with self._lock:
            self.faults += 1
            self.last_fault = time.monotonic()

    def fault(self) -> None:
        """Count a fault done from outside (a proxy's), now."""
        with self._lock:
            self.faults += 1
            self.last_fault = time.monotonic()

    def healed(self) -> None:
        """A fault ended now: the time to settle counts from here."""
        with self._lock:
            self.last_fault = time.monotonic()

    def restart(self, slot: Slot) -> None:
        """Start the slot's process again on the same port."""
        self._start(slot)
        with self._lock:
            self.last_fault = time.monotonic()

    def storm(
        self,
        *,
        seconds: float,
        every: tuple[float, float],
        down: tuple[float, float],
        roles: tuple[str, ...] = ("worker", "orchestrator"),
        stop_rather_than_kill: float = 0.0,
        stopped: tuple[float, float] | None = None,
    ) -> threading.Thread:
        """A thread of faults for `seconds`: every `every` s a random live process of `roles` is
        killed (or, with probability `stop_rather_than_kill`, stopped) and brought back after
        `down` s (`stopped` s for a stop, default `down`). At least one process of each role
        stays up."""

        def run() -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(self.rng.uniform(*every))
                candidates = [
                    s for s in self.live() if s.role in roles and len(self.live(s.role)) > 1
                ]
                if not candidates:
                    continue
                slot = self.rng.choice(candidates)
                pause = self.rng.uniform(*down)
                if self.rng.random() < stop_rather_than_kill:
                    pause = self.rng.uniform(*(stopped or down))
                    self.kill(slot, signal.SIGSTOP)
                    time.sleep(pause)
                    assert slot.process is not None
                    slot.process.signal(signal.SIGCONT)
                    with self._lock:
                        self.last_fault = time.monotonic()
                else:
                    self.kill(slot)
                    time.sleep(pause)
                    self.restart(slot)

        thread = threading.Thread(target=run, name="chaos storm", daemon=True)
        thread.start()
        return thread

    def in_background(self, fn: Callable[[], None], name: str) -> threading.Thread:
        """Run `fn` in a thread that `close` stops (`stopping` is set) and joins first, so that a
        failed scenario's thread does not go on against closed channels."""
        thread = threading.Thread(target=fn, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(10)
        for channel in self._channels.values():
            channel.close()
        for slot in self.slots:
            if slot.process is not None:
                if slot.process.process.poll() is None:
                    slot.process.signal(signal.SIGCONT)
                slot.process.close()
            for proxy in (slot.grpc_proxy, slot.redis_proxy):
                if proxy is not None:
                    proxy.close()
        self.redis.stop()

    # --- jobs -----------------------------------------------------------------------------------

    def _stub(self, slot: Slot) -> Any:
        channel = self._channels.get(slot.port)
        if channel is None:
            channel = self._channels[slot.port] = grpc.insecure_channel(f"127.0.0.1:{slot.port}")
        return self.orch.grpc.OrchestratorServiceStub(channel)

    def submit(self, job_id: str, seconds: float, *, within: float = 60) -> None:
        """Submit through any live orchestrator, again on another when one fails (idempotent)."""
        request = self.orch.pb2.BatchExecutionRequest(
            job_id=job_id, job_type="work",
            params={"key": job_id, "seconds": f"{seconds:.3f}"}, deadline_seconds=600,
        )  # fmt: skip
        deadline = time.monotonic() + within
        while not self.stopping.is_set():
            orchestrators = [s for s in self.slots if s.role == "orchestrator"]
            slot = self.rng.choice(orchestrators)
            try:
                self._stub(slot).Submit(request, timeout=5)
                return
            except grpc.RpcError as exc:
                self.submit_errors[job_id] += 1
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not submit {job_id}: {exc}") from None
                time.sleep(0.05)

    def wait_known(self, slot: Slot, *, within: float = 20) -> None:
        """Wait until every live orchestrator counts the worker in `slot` as eligible."""

        def eligible_everywhere() -> bool:
            for orchestrator in self.live("orchestrator"):
                reply = self._stub(orchestrator).ListWorkers(
                    self.orch.pb2.ListWorkersRequest(), timeout=5
                )
                if not any(w.address == slot.address and w.eligible for w in reply.workers):
                    return False
            return True

        wait_for(eligible_everywhere, timeout=within, what=f"{slot.address} eligible")

    def records(self, job_ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """Each job's record as stored (None when there is none)."""
        client = self.redis.client()
        try:
            raw = client.mget([f"wpm-job:{j}" for j in job_ids])
        finally:
            client.close()
        return {
            job_id: None if value is None else msgspec.json.decode(value)
            for job_id, value in zip(job_ids, raw, strict=True)
        }

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's state as its record says (MISSING when there is none)."""
        return {
            job_id: "MISSING" if record is None else str(record["state"])
            for job_id, record in self.records(job_ids).items()
        }

    def wait_terminal(self, job_ids: list[str], *, within: float) -> float:
        """Wait until every job is terminal (or `within` s after the last fault); the seconds
        from the last fault to then."""

        def all_terminal() -> bool:
            return all(s in TERMINAL for s in self.states(job_ids).values())

        with contextlib.suppress(AssertionError):  # the report counts what is left
            wait_for(
                all_terminal, timeout=max(1.0, self.last_fault + within - time.monotonic()),
                what="every job terminal",
            )  # fmt: skip
        return time.monotonic() - self.last_fault

    def ledger_lines(self) -> list[LedgerLine]:
        """The chaos jobs' ledger, in the order written."""
        if not self.ledger.exists():
            return []
        return [
            LedgerLine(kind, key, int(pid), int(token))
            for kind, key, pid, token in (ln.split() for ln in self.ledger.read_text().splitlines())
        ]

    def ledger_done(self) -> set[str]:
        """The keys of the runs that have ended so far (a `done` line in the ledger)."""
        return {line.key for line in self.ledger_lines() if line.kind == "done"}

    def report(self, job_ids: list[str], settle: float) -> Report:
        records = self.records(job_ids)
        states = {j: "MISSING" if r is None else str(r["state"]) for j, r in records.items()}
        starts: Counter[str] = Counter()
        dones: Counter[str] = Counter()
        for line in self.ledger_lines():
            (starts if line.kind == "start" else dones)[line.key] += 1

        def lost_attempts(job_id: str) -> int:
            record = records[job_id] or {}
            return sum(a.get("outcome") in LOST_OUTCOMES for a in record.get("attempts", []))

        return Report(
            submitted=len(job_ids),
            terminal=Counter(s for s in states.values() if s in TERMINAL),
            lost=sorted(j for j, s in states.items() if s not in TERMINAL),
            completed_twice=sorted(j for j in job_ids if dones[j] > 1),
            unexplained_repeats=sorted(
                j for j in job_ids if dones[j] > 1 and dones[j] - 1 > lost_attempts(j)
            ),
            rerun_after_kill=sorted(j for j in job_ids if starts[j] > 1 and dones[j] <= 1),
            faults=self.faults,
            settle_seconds=settle,
        )


@dataclass
class TriggerReport:
    """What became of one schedule's fire times, from the trigger's ledger and the job records."""

    schedule: str
    fire_times: int
    decisions: Counter[str]
    # fire times up to the cursor with no decision, and with more than one
    undecided: list[str]
    decided_twice: list[str]
    job_ids: list[str]
    late_max: float
    taken_over: int

    def lines(self) -> list[str]:
        """The figures, one a line."""
        return [
            f"schedule {self.schedule}: {self.fire_times} fire times, decisions"
            f" {dict(self.decisions)}, taken over mid-tick {self.taken_over}, latest"
            f" {self.late_max:.2f}s after its time",
            f"  fire times without a decision {len(self.undecided)}: {self.undecided[:5]}",
            f"  decided more than once {len(self.decided_twice)}: {self.decided_twice[:5]}",
        ]


def trigger_report(fleet: ChaosFleet, name: str, prefix: str = "wpm-trigger") -> TriggerReport:
    """Read schedule `name`'s ledger and cursor from the fleet's Redis."""
    from app.fleet.schedules import decode_decision, decode_spec, trigger_for
    from app.trigger.ticks import ticks_between

    client = fleet.redis.client()
    try:
        spec = decode_spec(client.hget(f"{prefix}:schedules", name))  # type: ignore[arg-type]
        cursor = client.hget(f"{prefix}:{{{name}}}:cursor", "tick")
        raw = client.zrange(f"{prefix}:{{{name}}}:ledger", 0, -1)
    finally:
        client.close()
    records = [decode_decision(cast(bytes, r)) for r in raw]
    upto = float(cursor) if cursor is not None else spec.since
    ticks = [t.timestamp for t in ticks_between(trigger_for(spec), spec.since, upto,
                                                 limit=1_000_000) if t.runs]  # fmt: skip
    seen = Counter(r.tick for r in records)
    return TriggerReport(
        schedule=name,
        fire_times=len(ticks),
        decisions=Counter(r.kind.value for r in records),
        undecided=[str(t) for t in ticks if seen[t] == 0],
        decided_twice=[str(t) for t, n in seen.items() if n > 1],
        job_ids=[r.job_id for r in records if r.job_id],
        late_max=max((r.late_seconds for r in records), default=0.0),
        taken_over=sum(r.existing for r in records),
    )


def print_report(name: str, report: Report, out: Callable[[str], None] = print) -> None:
    out(f"\n== chaos: {name}")
    for line in report.lines():
        out(f"   {line}")


class SentinelRedis(RedisServer):
    """A master, one replica and three sentinels (`redis-server <conf> --sentinel`), all real
    processes on 127.0.0.1. `client()` reaches whichever is master now; `env()` is what a role
    needs to find it through the sentinels."""

    NAME = "chaos"

    def __init__(self, tmp: Path, *, down_after_ms: int = 1000) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "master").mkdir(exist_ok=True)
        (tmp / "replica").mkdir(exist_ok=True)
        super().__init__(tmp / "master")
        self.replica = RedisServer(
            tmp / "replica", extra=["--replicaof", "127.0.0.1", str(self.port)]
        )
        self.sentinel_dir = tmp
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.down_after_ms = down_after_ms

    def env(self) -> dict[str, str]:
        addresses = [f"127.0.0.1:{port}" for port in self.sentinel_ports]
        return {
            "JOBWORKER_REDIS__SENTINELS": json.dumps(addresses),
            "JOBWORKER_REDIS__MASTER_NAME": self.NAME,
        }

    def start(self) -> None:
        super().start()
        self.replica.start()
        wait_for(self._replica_in_sync, timeout=20, what="the replica in sync")
        for port in self.sentinel_ports:
            conf = self.sentinel_dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.sentinel_dir}\n"
                f"logfile {self.sentinel_dir}/sentinel-{port}.log\n"
                f"sentinel monitor {self.NAME} 127.0.0.1 {self.port} 2\n"
                f"sentinel down-after-milliseconds {self.NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.NAME} 10000\n"
            )
            self.sentinels.append(subprocess.Popen(
                [redis_server_binary(), str(conf), "--sentinel"], stdin=subprocess.DEVNULL
            ))  # fmt: skip
        wait_for(self._sentinels_ready, timeout=30, what="3 sentinels that know each other")

    def _replica_in_sync(self) -> bool:
        client = self.replica.client()
        try:
            return client.info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _sentinel_state(self, port: int) -> dict[str, Any] | None:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            masters: Any = client.sentinel_masters()
            state: dict[str, Any] | None = masters.get(self.NAME)
            return state
        except redis.RedisError:
            return None
        finally:
            client.close()

    def _sentinels_ready(self) -> bool:
        states = [self._sentinel_state(port) for port in self.sentinel_ports]
        return all(
            s is not None and s["num-other-sentinels"] == 2 and s["num-slaves"] == 1 for s in states
        )

    def master_port(self) -> int | None:
        """The master's port as a sentinel reports it (None: none answers)."""
        for port in self.sentinel_ports:
            state = self._sentinel_state(port)
            if state is not None:
                return int(state["port"])
        return None

    def kill_master(self) -> RedisServer:
        """SIGKILL the master now (the first, or the replica once promoted); the one killed."""
        master = self if self.master_port() == self.port else self.replica
        assert master.process is not None
        master.process.kill()
        master.process.wait(10)
        master.process = None
        return master

    def client(self) -> redis.Redis:
        port = self.master_port() if self.sentinels else self.port  # before: the first master
        assert port is not None, "no sentinel answers"
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            if sentinel.poll() is None:
                sentinel.terminate()
                sentinel.wait(10)
        self.sentinels = []
        self.replica.stop()
        super().stop()
