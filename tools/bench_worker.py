"""Benchmark the worker's SendWork against a reference grpc.aio server, and watch its memory.

    python tools/bench_worker.py                  # full run (about 2.5 minutes on 2 cores)
    python tools/bench_worker.py --quick          # smoke run, a few seconds
    python tools/bench_worker.py --json out.json  # the figures as JSON too
    python tools/bench_worker.py --levels 16 --mem-requests 0   # one level, no memory run

Throughput and latency: SendWork(id=unique, name="echo") at 1, 16 and 64 calls in flight from an
official grpcio asyncio client (grpc.aio, one channel per server) in a process of its own,
against (a) a real `jobworker worker` subprocess and (b) tools/reference_server.py, the same
proto on a grpc.aio server. Both servers run at once, idle but for the one being measured; each
level is warmed up, then measured in rounds of a fixed time that alternate which server goes
first. With two or more CPUs both servers are pinned to one core and the client to another
(os.sched_setaffinity), so rps compares requests per server core; the CPU table shows what else
ran on the server's core, since other load on the machine skews the figures.

Memory: then `--mem-requests` SendWork calls (default 200,000) on ONE channel to a fresh worker,
its RSS sampled with psutil every `--mem-every` calls.

The grpcio stubs are generated at run time into a temporary folder from proto/worker.proto;
every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from reference_server import generate_stubs, load_stubs

ROOT = Path(__file__).resolve().parent.parent
JOBWORKER = Path(sys.executable).parent / "jobworker"
LEVELS = (1, 16, 64)
RPC_TIMEOUT = 10.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
MIB = 1024 * 1024

# targets from the issue
TARGET_RPS_RATIO = 0.9  # ours/ref at TARGET_LEVEL calls in flight
TARGET_LEVEL = 16
TARGET_P99_RATIO = 1.2  # ours/ref p99, at every level
TARGET_RSS_MIB = 60.0
# "flat": RSS at the end at most this much above RSS after the first sample interval
FLAT_TOLERANCE_MIB = 2.0

OURS_READY = re.compile(r"worker ready: pid \d+, port (\d+)")
REF_READY = re.compile(r"reference server listening on port (\d+)")


@dataclass(frozen=True)
class Plan:
    """How long and how much to measure."""

    levels: tuple[int, ...] = LEVELS
    warmup_seconds: float = 1.5
    measure_seconds: float = 2.0  # per round
    rounds: int = 4
    mem_requests: int = 200_000
    mem_every: int = 20_000
    mem_in_flight: int = 64


QUICK = Plan(warmup_seconds=0.3, measure_seconds=0.6, rounds=1, mem_requests=6_000, mem_every=1_000)


# --- client process: grpc.aio -------------------------------------------------------------------


@dataclass
class Window:
    """What one measurement window (or the sum of several) saw."""

    requests: int = 0
    errors: int = 0
    wall_seconds: float = 0.0
    server_cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    # jiffies of the server's core: busy (anyone) and all, from /proc/stat
    core_busy: int = 0
    core_total: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Window) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.wall_seconds += other.wall_seconds
        self.server_cpu_seconds += other.server_cpu_seconds
        self.client_cpu_seconds += other.client_cpu_seconds
        self.core_busy += other.core_busy
        self.core_total += other.core_total
        self.latencies += other.latencies

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        wall = self.wall_seconds or math.nan
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.wall_seconds, 3),
            "rps": self.requests / wall,
            "p50_ms": percentile(lat, 0.50) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
            "server_cpu": self.server_cpu_seconds / wall,
            "client_cpu": self.client_cpu_seconds / wall,
            # what else ran on the server's core (other processes on this machine)
            "others_on_server_core": max(
                0.0, self.core_busy / (self.core_total or 1) - self.server_cpu_seconds / wall
            ),
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (nan when empty)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cpu_seconds(proc: Any) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def core_jiffies(core: int | None) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat; (0, 0) when unknown."""
    if core is None:
        return 0, 0
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                name, *values = line.split()
                if name == f"cpu{core}":
                    ticks = [int(v) for v in values]
                    idle = ticks[3] + ticks[4]  # idle and iowait
                    return sum(ticks) - idle, sum(ticks)
    except OSError:
        pass
    return 0, 0


class Client:
    """SendWork calls on one grpc.aio channel to one server."""

    def __init__(
        self,
        pb2: ModuleType,
        pb2_grpc: ModuleType,
        port: int,
        pid: int,
        tag: str,
        core: int | None = None,
    ) -> None:
        import grpc  # only the client process needs it

        self._grpc = grpc
        self._pb2 = pb2
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._stub = pb2_grpc.WorkerServiceStub(self.channel)
        self._ok_states = {pb2.JobState.Value("RUNNING"), pb2.JobState.Value("QUEUED")}
        self.port = port
        self.server = psutil.Process(pid)
        self.core = core
        self._tag = f"bench-{os.getpid()}-{tag}"
        self._serial = 0
        self.first_error = ""

    async def call(self, job_id: str) -> bool:
        """One SendWork; True when the job was accepted."""
        req = self._pb2.SendWorkReq(id=job_id, name="echo")
        try:
            res = await self._stub.SendWork(req, timeout=RPC_TIMEOUT)
        except self._grpc.aio.AioRpcError as exc:
            self.first_error = self.first_error or f"{exc.code().name}: {exc.details()}"
            return False
        if res.state in self._ok_states:
            return True
        self.first_error = self.first_error or f"unexpected answer {res.state}: {res.message}"
        return False

    def new_prefix(self) -> str:
        self._serial += 1
        return f"{self._tag}-{self._serial}-"

    async def window(self, in_flight: int, seconds: float) -> Window:
        """Keep `in_flight` calls going for `seconds`; calls started before the end complete."""
        prefix = self.new_prefix()
        out = Window()

        async def caller(slot: int) -> None:
            n = 0
            while (t0 := time.perf_counter()) < stop_at:
                ok = await self.call(f"{prefix}{slot}-{n}")
                if ok:
                    out.latencies.append(time.perf_counter() - t0)
                else:
                    out.errors += 1
                n += 1

        cpu0, own0 = cpu_seconds(self.server), time.process_time()
        busy0, total0 = core_jiffies(self.core)
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(caller(i) for i in range(in_flight)))
        out.wall_seconds = time.perf_counter() - start
        out.server_cpu_seconds = cpu_seconds(self.server) - cpu0
        out.client_cpu_seconds = time.process_time() - own0
        busy1, total1 = core_jiffies(self.core)
        out.core_busy, out.core_total = busy1 - busy0, total1 - total0
        out.requests = len(out.latencies)
        return out

    def server_alive(self) -> bool:
        try:
            return bool(self.server.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def memory_sample(self, requests: int, started: float) -> dict[str, float]:
        conns = [
            c
            for c in self.server.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
        ]
        return {
            "requests": requests,
            "rss_mib": self.server.memory_info().rss / MIB,
            "connections": len(conns),
            "seconds": round(time.perf_counter() - started, 2),
        }

    async def memory_run(self, total: int, every: int, in_flight: int) -> dict[str, Any]:
        """`total` calls with `in_flight` going, RSS sampled before and after every `every`."""
        prefix = self.new_prefix()
        started = time.perf_counter()
        samples = [self.memory_sample(0, started)]
        errors = 0
        sent = 0
        while sent < total:
            batch = range(sent, min(total, sent + every))
            ids = iter(batch)

            async def caller(ids: Iterator[int]) -> None:
                nonlocal errors
                for i in ids:
                    if not await self.call(f"{prefix}{i}"):
                        errors += 1

            await asyncio.gather(*(caller(ids) for _ in range(min(in_flight, len(batch)))))
            sent = batch.stop
            if not self.server_alive():
                self.first_error = self.first_error or "the worker exited during the memory run"
                break
            samples.append(self.memory_sample(sent, started))
            log(
                f"  memory: {sent:>7,} requests, worker RSS {samples[-1]['rss_mib']:.1f} MiB, "
                f"{samples[-1]['connections']:.0f} connection(s)"
            )
        seconds = time.perf_counter() - started
        return {"samples": samples, "errors": errors, "rps": total / seconds}


async def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase ("throughput" or "memory") against the servers; return its figures."""
    pb2, pb2_grpc = load_stubs(Path(spec["stubs"]))
    plan = Plan(**{**spec["plan"], "levels": tuple(spec["plan"]["levels"])})
    servers: dict[str, dict[str, int]] = spec["servers"]
    core: int | None = spec["server_core"]
    clients = {
        name: Client(pb2, pb2_grpc, s["port"], s["pid"], name, core) for name, s in servers.items()
    }
    result: dict[str, Any] = {}
    try:
        if spec["phase"] == "memory":
            log(f"memory: {plan.mem_requests:,} SendWork, one channel, {plan.mem_in_flight} going")
            result["memory"] = await clients["ours"].memory_run(
                plan.mem_requests, plan.mem_every, plan.mem_in_flight
            )
        else:
            result["throughput"] = await throughput(clients, plan)
    finally:
        for client in clients.values():
            await client.channel.close()
    result["errors"] = [
        f"{name} ({spec['phase']}): {c.first_error}" for name, c in clients.items() if c.first_error
    ]
    return result


async def throughput(clients: dict[str, Client], plan: Plan) -> dict[str, dict[str, Any]]:
    """Each level: warm-up on every server, then rounds alternating which one goes first."""
    out: dict[str, dict[str, Any]] = {name: {} for name in clients}
    for level in plan.levels:
        totals = {name: Window() for name in clients}
        for client in clients.values():
            await client.window(level, plan.warmup_seconds)  # warm-up, discarded
        for r in range(plan.rounds):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                totals[name].add(await clients[name].window(level, plan.measure_seconds))
        for name, total in totals.items():
            summary = out[name][str(level)] = total.summary()
            log(
                f"  {name:>4} {level:>3} in flight: {summary['rps']:8.0f} rps, "
                f"p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, server CPU "
                f"{summary['server_cpu']:.0%}, client CPU {summary['client_cpu']:.0%}, others on "
                f"the server's CPU {summary['others_on_server_core']:.0%}"
            )
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- orchestration ------------------------------------------------------------------------------


def pinning() -> tuple[int | None, int | None]:
    """(server core, client core), or (None, None) with fewer than two CPUs available."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pin_to(core: int | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and all it starts) to `core`."""
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server subprocess logging to a file; `start` waits for its ready line."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        ready: re.Pattern[str],
    ) -> None:
        self.name = name
        self._argv = argv
        self._env = env
        self._log_path = log_path
        self._ready = ready
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.idle_rss_mib = 0.0

    def start(self, core: int | None) -> ServerProcess:
        with self._log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                self._argv, env=self._env, cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log_file, preexec_fn=pin_to(core),
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while not (match := self._ready.search(self.log_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.port = int(match.group(1))
        self.idle_rss_mib = psutil.Process(self.process.pid).memory_info().rss / MIB
        return self

    def describe(self) -> str:
        return f"pid {self.pid}, port {self.port}, RSS {self.idle_rss_mib:.1f} MiB at start"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        return self._log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM and wait; kill it (and what it started) when it does not stop in time."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop on SIGTERM within {STOP_TIMEOUT:g}s: killing it")
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(server: ServerProcess, core: int | None) -> Iterator[ServerProcess]:
    try:
        yield server.start(core)
    finally:
        server.stop()


def ours_server(tmp: Path, tag: str) -> ServerProcess:
    """`jobworker worker` on 127.0.0.1, its own state folder and embedded redis-server."""
    state = tmp / f"state-{tag}"
    state.mkdir()
    env = {
        **os.environ,
        "XDG_STATE_HOME": str(state),
        "JOBWORKER_GRPC__HOST": "127.0.0.1",
        "JOBWORKER_GRPC__PORT": str(free_port()),
        "JOBWORKER_WORKER__QUEUE_CAPACITY": "100000",
    }
    argv = [str(JOBWORKER), "worker"]
    return ServerProcess("ours", argv, env, tmp / f"worker-{tag}.log", OURS_READY)


def ref_server(tmp: Path, stubs: Path) -> ServerProcess:
    argv = [
        sys.executable,
        str(Path(__file__).with_name("reference_server.py")),
        "--stubs",
        str(stubs),
    ]
    return ServerProcess("ref", argv, dict(os.environ), tmp / "reference.log", REF_READY)


def run_client(spec: dict[str, Any], tmp: Path, core: int | None) -> dict[str, Any]:
    """Run the grpc.aio client process for one phase, pinned to `core`; its JSON answer."""
    spec_path = tmp / f"client-{spec['phase']}.json"
    spec_path.write_text(json.dumps(spec))
    plan: dict[str, Any] = spec["plan"]
    budget = 600 + len(plan["levels"]) * 2 * (
        plan["warmup_seconds"] + plan["rounds"] * plan["measure_seconds"]
    )
    out = subprocess.run(
        [sys.executable, __file__, "--client-spec", str(spec_path)],
        stdout=subprocess.PIPE, check=True, timeout=budget, preexec_fn=pin_to(core),
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def benchmark(plan: Plan) -> dict[str, Any]:
    """Throughput against both servers, then memory against a fresh worker; the raw figures."""
    server_core, client_core = pinning()
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})  # this process only waits
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "pinning": {"server_core": server_core, "client_core": client_core},
        "throughput": {},
        "memory": None,
        "errors": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp_name:
        tmp = Path(tmp_name)
        stubs = generate_stubs(tmp / "stubs")

        def phase(name: str, servers: list[ServerProcess]) -> None:
            with ExitStack() as stack:
                for server in servers:
                    stack.enter_context(running(server, server_core))
                    log(f"{server.name}: {server.describe()}")
                spec = {
                    "phase": name,
                    "stubs": str(stubs),
                    "plan": asdict(plan),
                    "server_core": server_core,
                    "servers": {s.name: {"port": s.port, "pid": s.pid} for s in servers},
                }
                answer = run_client(spec, tmp, client_core)
                if answer["errors"]:  # what the servers said about it
                    for server in servers:
                        tail = server.log_text().splitlines()[-5:]
                        log(f"{server.name} ({name}), the end of its log:\n  " + "\n  ".join(tail))
            result.update({k: v for k, v in answer.items() if k != "errors"})
            result["errors"] += answer["errors"]

        if plan.levels:
            phase("throughput", [ours_server(tmp, "ours"), ref_server(tmp, stubs)])
        if plan.mem_requests:
            fresh = ours_server(tmp, "ours-memory")
            phase("memory", [fresh])
            result["memory"]["idle_rss_mib"] = fresh.idle_rss_mib
    return result


# --- report ---------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Right-aligned columns, as wide as their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    line = " | ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def report_throughput(result: dict[str, Any]) -> dict[str, Any]:
    plan, pins, thr = result["plan"], result["pinning"], result["throughput"]
    print()
    if pins["server_core"] is None:
        print("pinning: none (fewer than 2 CPUs available): figures are not per core")
    else:
        print(
            f"pinning: each server on CPU {pins['server_core']}, the grpc.aio client on CPU "
            f"{pins['client_core']} (os.sched_setaffinity): rps is requests per server core"
        )
    print(
        f"SendWork(name=echo, unique id); per server and level: warm-up "
        f"{plan['warmup_seconds']:g}s, then {plan['rounds']} x {plan['measure_seconds']:g}s "
        f"(rounds alternate which server goes first), one channel each"
    )
    rows: list[dict[str, float]] = []
    cells: list[list[str]] = []
    cpu_cells: list[list[str]] = []
    for level in plan["levels"]:
        o, r = thr["ours"][str(level)], thr["ref"][str(level)]
        row = {
            "in_flight": level,
            "ours_rps": o["rps"],
            "ref_rps": r["rps"],
            "rps_ratio": ratio(o["rps"], r["rps"]),
            "p99_ratio": ratio(o["p99_ms"], r["p99_ms"]),
        }
        rows.append(row)
        cells.append(
            [
                str(level),
                f"{o['rps']:.0f}",
                f"{r['rps']:.0f}",
                f"{row['rps_ratio']:.2f}",
                f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f}",
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}",
                f"{row['p99_ratio']:.2f}",
            ]
        )
        cpu_cells.append(
            [
                str(level),
                f"{o['server_cpu']:.0%} / {r['server_cpu']:.0%}",
                f"{ratio(o['server_cpu'], o['rps']) * 1e6:.0f} / "
                f"{ratio(r['server_cpu'], r['rps']) * 1e6:.0f}",
                f"{o['client_cpu']:.0%} / {r['client_cpu']:.0%}",
                f"{o['others_on_server_core']:.0%} / {r['others_on_server_core']:.0%}",
            ]
        )
    head = ["in-flight", "ours rps", "ref rps", "ratio", "ours p50/p99 ms", "ref p50/p99 ms"]
    print_table([*head, "p99 ratio"], cells)
    print()
    head = ["in-flight", "server CPU ours/ref", "server CPU us/req ours/ref", "client CPU"]
    print_table([*head, "other processes on the server's CPU"], cpu_cells)
    result["rows"] = rows
    at_target = next((r for r in rows if r["in_flight"] == TARGET_LEVEL), None)
    worst = max(rows, key=lambda r: r["p99_ratio"])
    verdicts: dict[str, Any] = {
        "rps_ratio_at_16": at_target["rps_ratio"] if at_target else None,
        "rps_ok": bool(at_target and at_target["rps_ratio"] >= TARGET_RPS_RATIO),
        "worst_p99_ratio": worst["p99_ratio"],
        "p99_ok": worst["p99_ratio"] <= TARGET_P99_RATIO,
    }
    print()
    if at_target:
        print(
            f"target rps ratio >= {TARGET_RPS_RATIO} at {TARGET_LEVEL} in flight: "
            f"{at_target['rps_ratio']:.2f} {verdict(verdicts['rps_ok'])}"
        )
    print(
        f"target p99 <= {TARGET_P99_RATIO}x the reference's: worst {worst['p99_ratio']:.2f} "
        f"at {worst['in_flight']:.0f} in flight {verdict(verdicts['p99_ok'])}"
    )
    return verdicts


def report_memory(result: dict[str, Any]) -> dict[str, Any]:
    plan, mem = result["plan"], result["memory"]
    samples = mem["samples"]
    rss = [s["rss_mib"] for s in samples]
    print()
    print(
        f"memory: {samples[-1]['requests']:,} SendWork on one grpc.aio channel, "
        f"{plan['mem_in_flight']} in flight ({mem['rps']:.0f} rps); the worker's RSS (psutil):"
    )
    cells = [
        [f"{s['requests']:,}", f"{s['rss_mib']:.1f}", f"{s['connections']}", f"{s['seconds']:.1f}"]
        for s in samples
    ]
    print_table(["requests", "RSS MiB", "connections", "seconds"], cells)
    growth = rss[-1] - rss[1] if len(rss) > 1 else 0.0
    print(
        f"RSS start {rss[0]:.1f} MiB, end {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB "
        f"(at start-up {mem['idle_rss_mib']:.1f} MiB); "
        f"after the first {plan['mem_every']:,} requests: {growth:+.1f} MiB"
    )
    verdicts = {
        "rss_start_mib": rss[0],
        "rss_end_mib": rss[-1],
        "rss_max_mib": max(rss),
        "rss_ok": max(rss) <= TARGET_RSS_MIB,
        "rss_growth_mib": growth,
        "rss_flat": growth <= FLAT_TOLERANCE_MIB,
    }
    print()
    print(f"target RSS <= {TARGET_RSS_MIB:g} MiB: max {max(rss):.1f} {verdict(verdicts['rss_ok'])}")
    print(
        f"target RSS flat (<= {FLAT_TOLERANCE_MIB:g} MiB more after the first sample "
        f"interval): {growth:+.1f} {verdict(verdicts['rss_flat'])}"
    )
    return verdicts


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Print the tables and the verdicts; return the verdicts."""
    verdicts: dict[str, Any] = {}
    if result["throughput"]:
        verdicts.update(report_throughput(result))
    if result["memory"] is not None:
        verdicts.update(report_memory(result))
        if result["memory"]["errors"]:
            result["errors"].append(f"memory run: {result['memory']['errors']} failed calls")
    verdicts["errors"] = result["errors"]
    for error in result["errors"]:
        print(f"error: {error}")
    return verdicts


def parse_levels(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    parser.add_argument(
        "--levels", type=parse_levels, help='calls in flight, e.g. "1,16,64" ("" for none)'
    )
    parser.add_argument("--warmup", type=float, help="warm-up seconds per server and level")
    parser.add_argument("--seconds", type=float, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, help="measured rounds per server and level")
    parser.add_argument("--mem-requests", type=int, help="calls of the memory run (0: none)")
    parser.add_argument("--mem-every", type=int, help="RSS sample interval in calls")
    parser.add_argument("--client-spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_spec is not None:
        result = asyncio.run(client_main(json.loads(args.client_spec.read_text())))
        print(json.dumps(result))
        return 0
    plan = QUICK if args.quick else Plan()
    overrides = {
        "levels": args.levels,
        "warmup_seconds": args.warmup,
        "measure_seconds": args.seconds,
        "rounds": args.rounds,
        "mem_requests": args.mem_requests,
        "mem_every": args.mem_every,
    }
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if plan.mem_requests and plan.mem_every <= 0:
        raise SystemExit("--mem-every must be at least 1")
    result = benchmark(plan)
    result["verdicts"] = report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
