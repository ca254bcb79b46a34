"""How long a SIGKILLed worker's job takes to finish elsewhere (a benchmark, not a test).

    .venv/bin/python tools/bench_recovery.py               # a 2 s and a 60 s job, 3 rounds each
    .venv/bin/python tools/bench_recovery.py --quick       # a 2 s and a 10 s job, 1 round
    .venv/bin/python tools/bench_recovery.py --silent      # SIGSTOP: a peer that just goes quiet

Starts a private redis-server, two workers and one orchestrator on 127.0.0.1 with the default
report interval (5 s) and keepalive settings, submits a `sleep` job, SIGKILLs the worker running
it halfway through, and measures:

- detection: from the kill to the start of the next attempt on the other worker;
- finish after kill: from the kill to the job's SUCCEEDED (the re-run's own length included);
- overhead: finish after kill minus the job's length (what recovery costs on top of re-running).

Recovery is independent of job length: a dead worker is noticed from the broken call (or HTTP/2
keepalive, or its stale registry entry), not from a visibility timeout sized to the longest job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"bench_recovery: timed out waiting for {what}")


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = log.open("wb")
        # a session of its own: a stopped process must stay stopped, whatever supervises ours
        self.popen = subprocess.Popen(
            args, env=env, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_line(self, text: str, timeout: float = 20) -> None:
        wait_for(lambda: text in self.log.read_text(errors="replace"), timeout, text)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._file.close()


def run_round(
    seconds: float, tmp: Path, redis_url: str, n: int, signum: int = signal.SIGKILL
) -> dict[str, float]:
    import grpc

    from tests.grpc_clients import generate_grpcio_stubs, import_stubs

    stubs = tmp / "stubs"
    if not stubs.exists():
        stubs.mkdir()
        generate_grpcio_stubs(ROOT / "proto", stubs, "orchestrator")
    pb2, pb2_grpc = import_stubs(stubs, "orchestrator")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    env.update(REDIS_URL=redis_url, JOBWORKER_GRPC__HOST="127.0.0.1", PYTHONPATH=str(ROOT),
               JOBWORKER_ORCHESTRATOR__HOST="127.0.0.1", PYTHONUNBUFFERED="1")  # fmt: skip
    workers: dict[str, Proc] = {}
    procs: list[Proc] = []
    try:
        for i in range(2):
            port = free_port()
            wenv = dict(env, JOBWORKER_GRPC__PORT=str(port), XDG_STATE_HOME=str(tmp / f"s{n}{i}"))
            proc = Proc([sys.executable, "-m", "app", "worker"], wenv, tmp / f"w{n}{i}.log")
            proc.wait_line("worker ready")
            workers[f"127.0.0.1:{port}"] = proc
            procs.append(proc)
        oport = free_port()
        oenv = dict(env, JOBWORKER_ORCHESTRATOR__PORT=str(oport))
        orch = Proc([sys.executable, "-m", "app", "orchestrator"], oenv, tmp / f"o{n}.log")
        procs.append(orch)
        orch.wait_line("orchestrator ready")
        with grpc.insecure_channel(f"127.0.0.1:{oport}") as channel:
            stub = pb2_grpc.OrchestratorServiceStub(channel)

            # a worker killed in an earlier round keeps its key until its TTL: count eligible ones
            def eligible() -> int:
                return sum(w.eligible for w in stub.ListWorkers(pb2.ListWorkersRequest()).workers)

            wait_for(lambda: eligible() == 2, 20, "two eligible workers")
            job_id = f"bench-{n}-{seconds:g}"
            stub.Submit(pb2.BatchExecutionRequest(job_id=job_id, job_type="sleep",
                                                  params={"seconds": f"{seconds}"}))  # fmt: skip

            def get() -> Any:
                return stub.GetJob(pb2.JobRequest(job_id=job_id))

            running = wait_for(lambda: (j := get()).state == pb2.RUNNING and j, 20, "RUNNING")
            time.sleep(seconds / 2)  # halfway through the run
            victim = running.attempts[-1].worker
            killed_at = time.time()
            workers[victim].popen.send_signal(signum)
            second = wait_for(lambda: len((j := get()).attempts) > 1 and j, 120, "a second attempt")
            done = wait_for(lambda: (j := get()).state in (pb2.SUCCEEDED, pb2.FAILED) and j,
                            seconds + 120, "the job's end")  # fmt: skip
            if done.state != pb2.SUCCEEDED:
                raise SystemExit(f"bench_recovery: job ended {pb2.JobState.Name(done.state)}")
            started = _epoch(second.attempts[-1].started_at)
            finished = _epoch(done.finished_at)
            return {
                "detection": started - killed_at,
                "finish_after_kill": finished - killed_at,
                "overhead": finished - killed_at - seconds,
            }
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)  # a SIGSTOPped worker, to let it stop
            proc.stop()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2 s and a 10 s job, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--silent", action="store_true",
        help="SIGSTOP instead of SIGKILL: no TCP reset, only keepalive and the registry tell",
    )  # fmt: skip
    args = parser.parse_args()
    lengths = [2.0, 10.0] if args.quick else [2.0, 60.0]
    rounds = 1 if args.quick else args.rounds
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise SystemExit("bench_recovery: needs redis-server on PATH")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        redis_proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            print(f"{'job length':>10} | {'round':>5} | {'detection s':>11} | "
                  f"{'finish after kill s':>19} | {'overhead s':>10}")  # fmt: skip
            summary: list[tuple[float, float, float]] = []
            for seconds in lengths:
                results = []
                for n in range(rounds):
                    signum = signal.SIGSTOP if args.silent else signal.SIGKILL
                    url = f"redis://127.0.0.1:{port}/0"
                    r = run_round(seconds, tmp, url, len(summary) * 100 + n, signum)
                    results.append(r)
                    row = (f"{seconds:>9g}s | {n + 1:>5} | {r['detection']:>11.2f} | "
                           f"{r['finish_after_kill']:>19.2f} | {r['overhead']:>10.2f}")  # fmt: skip
                    print(row, flush=True)
                summary.append((seconds, statistics.median(x["detection"] for x in results),
                                statistics.median(x["overhead"] for x in results)))  # fmt: skip
            print()
            for seconds, detection, overhead in summary:
                print(f"{seconds:g} s job: median detection {detection:.2f} s, "
                      f"median overhead beyond re-running it {overhead:.2f} s")  # fmt: skip
        finally:
            redis_proc.terminate()
            redis_proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
