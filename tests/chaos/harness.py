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
import random
import signal
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

from tests.chaos.proxy import FaultProxy
from tests.helpers import RedisServer, WorkerProcess, base_env, free_port, wait_for

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

    # --- processes ------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.redis.start()

    def env(self, slot: Slot, **extra: str) -> dict[str, str]:
        port_key = PORT_KEYS[slot.role]
        settings = dict(
            REDIS_URL=self.redis.url,
            CHAOS_LEDGER=str(self.ledger),
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
            JOBWORKER_LOG__LEVEL="INFO",
            **{port_key: str(slot.port), "JOBWORKER_ORCHESTRATOR__HOST": "127.0.0.1"},
        )
        return base_env(
            self.tmp / f"{slot.role}-{slot.port}",
            **(settings | self._proxied(slot) | self._trigger(slot) | extra),
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

    def close(self) -> None:
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
        while True:
            orchestrators = [s for s in self.slots if s.role == "orchestrator"]
            slot = self.rng.choice(orchestrators)
            try:
                self._stub(slot).Submit(request, timeout=5)
                return
            except grpc.RpcError as exc:
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
