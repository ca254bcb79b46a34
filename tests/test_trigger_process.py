"""The trigger tier as real processes: trigger replicas, an orchestrator and a worker on the
session's real redis-server. Replicas are SIGKILLed at random and in the middle of a tick; the
ledger (read from Redis) must hold one decision per fire time and the orchestrator one job per
fire time that ran. The same scenarios on virtual time, at a larger scale, are in
test_trigger_replicas.py; a longer soak is tools/chaos_trigger.py.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import redis

from app.fleet.schedules import (
    ScheduleSpec,
    TickDecision,
    TickKind,
    decode_decision,
    decode_spec,
    trigger_for,
)
from app.trigger.ticks import ticks_between
from tests.grpc_clients import grpcurl, grpcurl_json
from tests.helpers import ROOT, RedisServer, WorkerProcess, base_env, free_port, scrape, wait_for

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"}


class TriggerFleet:
    """A worker, an orchestrator and trigger replicas on the session's redis-server."""

    def __init__(self, tmp: Path, server: RedisServer, client: redis.Redis) -> None:
        self.tmp = tmp
        self.server = server
        self.redis = client
        self.procs: list[WorkerProcess] = []
        self.orchestrator_port = free_port()
        self.config_dir = tmp / "config"
        self.config_dir.mkdir()
        self.kills = 0
        self._overrides: dict[int, dict[str, str]] = {}

    def env(self, **extra: str) -> dict[str, str]:
        settings = dict(
            REDIS_URL=self.server.url,
            JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS="0.3",
            JOBWORKER_ORCHESTRATOR__WORKER_REPORT_INTERVAL_SECONDS="0.3",
            JOBWORKER_ORCHESTRATOR__DISCOVERY_INTERVAL_SECONDS="0.2",
            JOBWORKER_ORCHESTRATOR__HOST="127.0.0.1",
            JOBWORKER_ORCHESTRATOR__PORT=str(self.orchestrator_port),
            JOBWORKER_TRIGGER__HOST="127.0.0.1",
            JOBWORKER_TRIGGER__ORCHESTRATORS=f'["127.0.0.1:{self.orchestrator_port}"]',
            JOBWORKER_TRIGGER__LEASE_SECONDS="1.5",
            JOBWORKER_TRIGGER__CALL_TIMEOUT_SECONDS="1",
            JOBWORKER_CONFIG_DIR=str(self.config_dir),
        )
        return base_env(self.tmp / f"p{len(self.procs)}", **(settings | extra))

    def start(self, role: str, **env: str) -> WorkerProcess:
        if role == "worker":
            env.setdefault("JOBWORKER_GRPC__PORT", str(free_port()))
        if role == "trigger":
            env.setdefault("JOBWORKER_TRIGGER__PORT", str(free_port()))
        proc = WorkerProcess(self.env(**env), self.tmp / f"{role}-{len(self.procs)}.log", [], role)
        self.procs.append(proc)
        self._overrides[id(proc)] = env
        return proc.wait_ready(timeout=30)

    def replica(self, **env: str) -> WorkerProcess:
        return self.start("trigger", **env)

    def restart(self, proc: WorkerProcess) -> WorkerProcess:
        """The same role again, with the same settings (its port included)."""
        proc.close()
        return self.start(proc.role, **self._overrides[id(proc)])

    def kill(self, proc: WorkerProcess, signum: int = signal.SIGKILL) -> None:
        proc.signal(signum)
        if signum == signal.SIGKILL:
            proc.process.wait(10)
            self.kills += 1

    def cli(self, *args: str, target: WorkerProcess, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "app", *args, "--target", target.target],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=self.env(),
        )  # fmt: skip
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def declare(self, text: str) -> None:
        (self.config_dir / "application.toml").write_text(text)

    # --- what Redis holds -------------------------------------------------------------------------

    def spec(self, name: str) -> ScheduleSpec:
        raw = self.redis.hget("wpm-trigger:schedules", name)
        assert raw is not None, f"no schedule {name}"
        return decode_spec(raw)

    def ledger(self, name: str) -> list[TickDecision]:
        raw = self.redis.zrange(f"wpm-trigger:{{{name}}}:ledger", 0, -1)
        return [decode_decision(cast(bytes, r)) for r in raw]

    def decided_up_to(self, name: str) -> float | None:
        raw = self.redis.hget(f"wpm-trigger:{{{name}}}:cursor", "tick")
        return None if raw is None else float(raw)

    def pending(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.hget(f"wpm-trigger:{{{name}}}:cursor", "pending")
        return None if raw is None else msgspec.json.decode(raw)

    def owner(self, name: str) -> str | None:
        raw = self.redis.get(f"wpm-trigger:{{{name}}}:lease")
        return None if raw is None else cast(bytes, raw).decode()

    def jobs(self, name: str) -> dict[str, dict[str, Any]]:
        """The orchestrator's records of the schedule's jobs."""
        keys = [k.decode() for k in self.redis.scan_iter(f"wpm-job:{name}@*", count=1000)]
        keys = [k for k in keys if k.endswith("Z")]  # not its :fence, :cancel, :run:<n>
        raw = self.redis.mget(keys) if keys else []
        return {k.removeprefix("wpm-job:"): msgspec.json.decode(v)
                for k, v in zip(keys, raw, strict=True) if v is not None}  # fmt: skip

    def close(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is None:
                proc.signal(signal.SIGCONT)
            proc.close()


@pytest.fixture
def fleet(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> Iterator[TriggerFleet]:
    fleet = TriggerFleet(tmp_path, redis_server, redis_client)
    try:
        yield fleet
    finally:
        fleet.close()


def nominal(spec: ScheduleSpec, until: float) -> list[float]:
    return [t.timestamp for t in ticks_between(trigger_for(spec), spec.since, until,
                                                limit=100_000) if t.runs]  # fmt: skip


def each_tick_once(fleet: TriggerFleet, name: str) -> list[TickDecision]:
    """One decision per fire time up to the cursor, all fired, one job each and no other."""
    spec = fleet.spec(name)
    upto = fleet.decided_up_to(name)
    assert upto is not None
    records = fleet.ledger(name)
    assert [r.tick for r in records] == nominal(spec, upto)
    odd = [(r.tick_text, r.kind, r.reason) for r in records if r.kind is not TickKind.FIRED]
    assert odd == []
    assert set(fleet.jobs(name)) == {r.job_id for r in records}
    return records


# --- high availability ----------------------------------------------------------------------------


def test_three_replicas_killed_at_random_submit_each_tick_once(fleet: TriggerFleet) -> None:
    # overlap allow: a take-over catching up submits ticks a second apart, and forbid would
    # skip those whose previous job had not ended yet (its own test is below)
    fleet.declare(
        '[[schedules]]\nname = "every-second"\njob_type = "echo"\ninterval_seconds = 1\n'
        'misfire_grace_seconds = 8\noverlap = "allow"\n'
        '[[schedules]]\nname = "every-3s"\njob_type = "echo"\ninterval_seconds = 3\n'
        'misfire_grace_seconds = 8\noverlap = "allow"\n'
    )
    fleet.start("worker")
    fleet.start("orchestrator")
    replicas = [fleet.replica() for _ in range(3)]
    rng = random.Random(5)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(rng.uniform(1.5, 4.0))
        live = [r for r in replicas if r.process.poll() is None]
        if len(live) < 2:
            continue
        victim = rng.choice(live)
        fleet.kill(victim)
        replicas[replicas.index(victim)] = fleet.restart(victim)
    time.sleep(3)  # the last take-over settles
    for replica in replicas:
        replica.signal(signal.SIGTERM)
    for replica in replicas:
        assert replica.wait_exit(15) == 0
    totals: Counter[str] = Counter()
    for name in ("every-second", "every-3s"):
        records = each_tick_once(fleet, name)
        totals["ticks"] += len(records)
        totals["taken over"] += sum(r.existing for r in records)
        totals["late over 1s"] += sum(r.late_seconds > 1 for r in records)
        assert max(r.late_seconds for r in records) < 8
        wait_for(lambda: all(j["state"] in TERMINAL for j in fleet.jobs(name).values()),  # noqa: B023
                 timeout=20, what="every job ended")  # fmt: skip
        assert all(len(j["attempts"]) == 1 for j in fleet.jobs(name).values())  # each ran once
    assert fleet.kills >= 6
    assert totals["ticks"] >= 40
    print(f"\n{fleet.kills} replicas SIGKILLed; {dict(totals)}; lost 0, duplicated 0")


def test_a_replica_killed_between_taking_a_tick_and_submitting_it(fleet: TriggerFleet) -> None:
    """A takes the tick but cannot reach the orchestrator (its address refuses); killed then,
    B takes the schedule over and submits that very tick within its grace."""
    fleet.start("worker")
    fleet.start("orchestrator")
    nowhere = f'["127.0.0.1:{free_port()}"]'
    a = fleet.replica(JOBWORKER_TRIGGER__ORCHESTRATORS=nowhere, JOBWORKER_TRIGGER__REPLICA_ID="a")
    fleet.cli("schedules", "create", "taken", "--every", "4", "--job", "echo", "--grace", "12",
              target=a)  # fmt: skip
    pending = wait_for(lambda: fleet.pending("taken"), timeout=15, what="a tick taken by A")
    assert pending["replica"] == "a"
    wait_for(lambda: (fleet.pending("taken") or {}).get("last_error"), timeout=5,
             what="A's failed attempts noted")  # fmt: skip
    b = fleet.replica(JOBWORKER_TRIGGER__REPLICA_ID="b")
    fleet.kill(a)
    killed_at = time.time()
    tick = pending["tick"]
    record = wait_for(lambda: next((r for r in fleet.ledger("taken") if r.tick == tick), None),
                      timeout=15, what="the taken tick decided")  # fmt: skip
    assert (record.kind, record.replica) == (TickKind.FIRED, "b")
    assert record.late_seconds < 12
    assert record.decided_at - killed_at < 1.5 + 0.5 + 1  # a lease, a scan, the submit
    assert record.job_id in fleet.jobs("taken")
    assert b.process.poll() is None


def test_overlap_forbid_across_replicas_with_a_job_still_running(fleet: TriggerFleet) -> None:
    fleet.start("worker")
    fleet.start("orchestrator")
    replicas = {name: fleet.replica(JOBWORKER_TRIGGER__REPLICA_ID=name) for name in "ab"}
    fleet.cli("schedules", "create", "long", "--every", "2", "--job", "sleep", "-p",
              "seconds=5", "--overlap", "forbid", "--grace", "6", target=replicas["a"])  # fmt: skip
    wait_for(lambda: len(fleet.ledger("long")) >= 2, timeout=15, what="two fire times decided")
    owner = fleet.owner("long")
    assert owner in replicas
    fleet.kill(replicas[owner])
    survivor = "b" if owner == "a" else "a"
    wait_for(lambda: len(fleet.ledger("long")) >= 8, timeout=30, what="eight fire times decided")
    records = fleet.ledger("long")[:8]
    fired = [r for r in records if r.kind is TickKind.FIRED]
    skipped = [r for r in records if r.kind is TickKind.SKIPPED]
    assert fired
    assert skipped
    assert all(r.blocking_job in {f.job_id for f in fired} for r in skipped)
    assert all(r.blocking_state in {"PENDING", "DISPATCHED", "RUNNING"} for r in skipped)
    assert survivor in {r.replica for r in skipped}  # judged on the orchestrator after the kill
    # never two of the schedule's jobs at once (judged on the orchestrator, across replicas)
    jobs = fleet.jobs("long")
    spans = sorted(
        (a["started_at"], a["finished_at"] or time.time())
        for j in jobs.values() for a in j["attempts"]
    )  # fmt: skip
    assert all(later[0] >= earlier[1] - 0.2 for earlier, later in itertools.pairwise(spans))


def test_the_orchestrator_down_past_the_grace_is_missed_and_why_says_so(
    fleet: TriggerFleet,
) -> None:
    fleet.start("worker")
    orchestrator = fleet.start("orchestrator")
    replica = fleet.replica()
    fleet.cli("schedules", "create", "blip", "--every", "2", "--job", "echo", "--grace", "3",
              "--overlap", "allow", target=replica)  # fmt: skip
    wait_for(lambda: fleet.ledger("blip"), timeout=10, what="a first fire time")
    orchestrator.signal(signal.SIGSTOP)  # a black hole: calls time out
    time.sleep(7)
    orchestrator.signal(signal.SIGCONT)
    missed = wait_for(
        lambda: [r for r in fleet.ledger("blip") if r.kind is TickKind.MISSED], timeout=10,
        what="a missed fire time",
    )  # fmt: skip
    assert {r.cause.value for r in missed} == {"unreachable"}
    wait_for(lambda: fleet.ledger("blip")[-1].kind is TickKind.FIRED, timeout=10,
             what="fire times run again")  # fmt: skip
    tick = missed[0].tick_text
    why = fleet.cli("why", "blip", "--at", tick, target=replica)
    assert why.stdout.startswith(
        f"blip did not run at {tick}: the orchestrator did not take it within its 3.0s misfire"
        " grace ("
    ), why.stdout
    assert "failed attempt(s), the last: " in why.stdout
    assert "schedule blip: missed" in replica.log()
    metrics = fleet.cli("schedules", "decisions", "blip", "--json", target=replica)
    kinds = {d["kind"] for d in json.loads(metrics.stdout)["decisions"]}
    assert kinds == {"fired", "missed"}


# --- the CLI and the API --------------------------------------------------------------------------


def test_the_cli_manages_schedules_end_to_end(fleet: TriggerFleet) -> None:
    fleet.start("worker")
    orchestrator = fleet.start("orchestrator")
    replica = fleet.replica()
    bad = fleet.cli("schedules", "create", "x", "--cron", "61 * * * *", "--job", "echo",
                    target=replica, check=False)  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "jobworker: INVALID_ARGUMENT: cron: '61 * * * *': minute (field 1 of 5) '61': 61 is not"
        " in 0-59"
    )
    usage = fleet.cli("schedules", "create", "x", "--job", "echo", target=replica, check=False)
    assert (usage.returncode, usage.stderr.strip()) == (
        2,
        "jobworker: config error: --cron: give --cron EXPR or --every SECONDS",
    )
    created = fleet.cli("schedules", "create", "cli", "--every", "2", "--job", "echo", "-p",
                        "a=1", "--grace", "5", target=replica)  # fmt: skip
    assert json.loads(created.stdout)["params"] == {"a": "1"}
    wait_for(lambda: len(fleet.ledger("cli")) >= 1, timeout=10, what="a fire time")
    listed = fleet.cli("schedules", target=replica).stdout
    assert listed.startswith("cli  every 2s  (job echo, overlap forbid, worked by ")
    assert "  next:  " in listed
    assert "  last:  cli ran for " in listed
    fleet.cli("schedules", "pause", "cli", "--note", "maintenance", target=replica)
    wait_for(lambda: fleet.ledger("cli")[-1].reason.endswith("maintenance"), timeout=10,
             what="a fire time missed while paused")  # fmt: skip
    fleet.cli("schedules", "resume", "cli", target=replica)
    wait_for(lambda: fleet.ledger("cli")[-1].kind is TickKind.FIRED, timeout=10, what="running")
    by_hand = fleet.cli("schedules", "trigger", "cli", target=replica).stdout
    assert by_hand.startswith("cli was triggered by hand at ")
    paused = [r for r in fleet.ledger("cli") if r.kind is TickKind.MISSED]
    start = datetime.fromtimestamp(paused[0].tick, UTC).isoformat()
    backfilled = fleet.cli("schedules", "backfill", "cli", "--from", start, "--to",
                           paused[-1].tick_text, target=replica).stdout  # fmt: skip
    assert f"submitted {len(paused)}, already ran 0" in backfilled
    again = fleet.cli("schedules", "backfill", "cli", "--from", start, "--to",
                      paused[-1].tick_text, target=replica).stdout  # fmt: skip
    assert f"submitted 0, already ran {len(paused)}" in again
    why = fleet.cli("why", "cli", "--at", paused[0].tick_text, target=replica).stdout
    assert why.startswith(f"cli ran for {paused[0].tick_text} later, by a backfill")
    # every run the ledger names (ticks, by hand, backfilled) is listed under its schedule
    ran = {r.job_id for r in fleet.ledger("cli") if r.job_id}
    runs = json.loads(fleet.cli("jobs", "--schedule", "cli", "--limit", "500", "--json",
                                target=orchestrator).stdout)["jobs"]  # fmt: skip
    assert ran <= {job["jobId"] for job in runs}
    assert {job["schedule"] for job in runs} == {"cli"}
    assert any("@manual-" in job["jobId"] for job in runs)
    decisions = fleet.cli("schedules", "decisions", "cli", "--limit", "50",
                          target=replica).stdout  # fmt: skip
    assert {"fired", "backfilled", "triggered"} <= {line.split()[1] for line in
                                                    decisions.splitlines()}  # fmt: skip
    fleet.cli("schedules", "delete", "cli", target=replica)
    gone = fleet.cli("schedules", "get", "cli", target=replica, check=False)
    assert (gone.returncode, gone.stderr.strip()) == (
        1,
        "jobworker: NOT_FOUND: no schedule named 'cli'",
    )
    helped = subprocess.run([sys.executable, "-m", "app", "schedules", "create", "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)  # fmt: skip
    assert "JOBWORKER_TRIGGER_TARGET" in helped.stdout
    assert "--grace SECONDS" in helped.stdout


def test_config_schedules_sync_and_a_bad_one_exits_2_naming_it(fleet: TriggerFleet) -> None:
    fleet.declare('[[schedules]]\nname = "bad"\njob_type = "echo"\ncron = "0 25 * * *"\n')
    proc = subprocess.run([sys.executable, "-m", "app", "trigger"], env=fleet.env(),
                          capture_output=True, text=True, timeout=30, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "jobworker: config error: schedules[0].cron: '0 25 * * *': hour (field 2 of 5) '25': 25"
        " is not in 0-23"
    ), proc.stderr
    no_redis = fleet.env()
    del no_redis["REDIS_URL"]
    fleet.declare("")
    proc = subprocess.run([sys.executable, "-m", "app", "trigger"], env=no_redis,
                          capture_output=True, text=True, timeout=30, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    assert "config error: redis.url" in proc.stderr
    fleet.declare(
        '[[schedules]]\nname = "nightly"\njob_type = "echo"\ncron = "30 2 * * *"\n'
        'time_zone = "America/New_York"\n'
    )
    replica = fleet.replica()
    assert fleet.spec("nightly").source.value == "config"
    refused = fleet.cli("schedules", "delete", "nightly", target=replica, check=False)
    assert refused.returncode == 1
    assert "FAILED_PRECONDITION: schedule 'nightly' is declared in the config" in refused.stderr
    fleet.cli("schedules", "pause", "nightly", target=replica)
    replica.signal(signal.SIGTERM)
    assert replica.wait_exit() == 0
    fleet.declare(
        '[[schedules]]\nname = "nightly"\njob_type = "echo"\ncron = "45 2 * * *"\n'
        'time_zone = "America/New_York"\n'
    )
    fleet.replica()
    synced = fleet.spec("nightly")
    assert (synced.cron, synced.paused) == ("45 2 * * *", True)  # the pause outlived the change


def test_sigterm_drains_and_hands_over_at_once_with_probes_and_metrics(
    fleet: TriggerFleet,
) -> None:
    fleet.start("worker")
    fleet.start("orchestrator")
    first = fleet.replica(JOBWORKER_METRICS__PORT="0", JOBWORKER_TRIGGER__REPLICA_ID="first",
                          JOBWORKER_TRIGGER__LEASE_SECONDS="10")  # fmt: skip
    fleet.cli("schedules", "create", "handed", "--every", "1", "--job", "echo", "--grace", "30",
              "--overlap", "allow", target=first)  # fmt: skip
    wait_for(lambda: fleet.owner("handed") == "first", timeout=10, what="first works it")
    second = fleet.replica(JOBWORKER_TRIGGER__REPLICA_ID="second",
                           JOBWORKER_TRIGGER__LEASE_SECONDS="10")  # fmt: skip
    listed = grpcurl("-plaintext", first.target, "list")
    assert "trigger.TriggerService" in listed.stdout.split()
    assert grpcurl_json("-plaintext", first.target, "grpc.health.v1.Health/Check") == {
        "status": "SERVING"
    }
    port = int(first.wait_log(r"http on http://\S+:(\d+)")[1])
    wait_for(lambda: scrape(port).get(
        ("jobworker_trigger_decisions_total", frozenset({("kind", "fired")}))), timeout=10,
        what="fired decisions counted")  # fmt: skip
    first.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert first.wait_exit(15) == 0
    # released, not left to run out: taken well inside the 10 s lease
    wait_for(lambda: fleet.owner("handed") == "second", timeout=6, what="second takes it")
    assert time.monotonic() - asked < 6
    assert "drained: " in first.log()
    time.sleep(2)
    each_tick_once(fleet, "handed")
    assert second.process.poll() is None
