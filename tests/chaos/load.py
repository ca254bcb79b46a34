"""Load on the orchestrators' API: many clients at once, each on a gRPC connection of its own
(the official grpcio client, asyncio flavour), doing Submit or Execute; and a watch on every
process's health meanwhile.

Used by tests/chaos/test_defaults_under_load.py and tools/load_defaults.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from tests.chaos.harness import ChaosFleet
from tests.helpers import ROOT

#: Per-call bounds of the load's clients: far above what a call takes under the load.
SUBMIT_TIMEOUT_SECONDS = 60.0
EXECUTE_TIMEOUT_SECONDS = 120.0


@dataclass
class LoadResult:
    """What the clients saw: the ids they sent, their errors by status code, how long it took."""

    clients: int
    submitted: list[str]  # by Submit
    executed: list[str]  # by Execute (answered with the finished record)
    seconds: float
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    # RESOURCE_EXHAUSTED answers that carried a retry-after and were retried after it
    retried: int = 0
    # Execute answers whose job had not SUCCEEDED, as "id state"
    not_succeeded: list[str] = field(default_factory=list)

    @property
    def job_ids(self) -> list[str]:
        return self.submitted + self.executed

    def lines(self) -> list[str]:
        """The figures, one a line."""
        jobs = len(self.job_ids)
        return [
            f"{self.clients} clients (a connection each): {len(self.submitted)} Submit,"
            f" {len(self.executed)} Execute, in {self.seconds:.1f}s"
            f" ({jobs / self.seconds:.0f} calls/s)",
            f"errors {dict(self.errors)} {self.error_examples[:3]}; retried after a"
            f" retry-after {self.retried}; Execute not SUCCEEDED {self.not_succeeded[:5]}",
        ]


def _channel(target: str) -> grpc.aio.Channel:
    # a subchannel pool of its own: channels to one target share a connection by default
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            return int(value) / 1000
    return None


async def _drive(
    fleet: ChaosFleet,
    targets: list[str],
    *,
    submit_clients: int,
    execute_clients: int,
    jobs_per_client: int,
    prefix: str,
    retry_exhausted: bool,
) -> LoadResult:
    pb2 = fleet.orch.pb2
    result = LoadResult(
        clients=submit_clients + execute_clients, submitted=[], executed=[], seconds=0.0
    )
    succeeded = pb2.JobState.Value("SUCCEEDED")

    async def call(stub: Any, method: str, request: Any, deadline: float) -> Any:
        while True:
            try:
                # wait_for_ready: a connection this process was too busy to finish setting up
                # in time (grpc-core gives it 20 s) is its own limit, not the server's; what the
                # server answers, and a connection it resets, still fail the call
                return await getattr(stub, method)(request, timeout=deadline, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                after = _retry_after(exc) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
                if retry_exhausted and after is not None:
                    result.retried += 1
                    await asyncio.sleep(after)
                    continue
                result.errors[code.name] += 1
                if len(result.error_examples) < 10:
                    result.error_examples.append(f"{method} {code.name}: {exc.details()}")
                return None

    async def client(number: int, method: str) -> None:
        async with _channel(targets[number % len(targets)]) as channel:
            stub = fleet.orch.grpc.OrchestratorServiceStub(channel)
            for n in range(jobs_per_client):
                job_id = f"{prefix}-{method.lower()}-{number}-{n}"
                request = pb2.BatchExecutionRequest(
                    job_id=job_id, job_type="work", params={"key": job_id, "seconds": "0"},
                    deadline_seconds=600,
                )  # fmt: skip
                if method == "Submit":
                    result.submitted.append(job_id)
                    await call(stub, method, request, SUBMIT_TIMEOUT_SECONDS)
                    continue
                result.executed.append(job_id)
                reply = await call(stub, method, request, EXECUTE_TIMEOUT_SECONDS)
                if reply is not None and reply.job.state != succeeded:
                    result.not_succeeded.append(f"{job_id} {pb2.JobState.Name(reply.job.state)}")

    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for i in range(submit_clients):
            tg.create_task(client(i, "Submit"))
        for i in range(execute_clients):
            tg.create_task(client(submit_clients + i, "Execute"))
    result.seconds = time.monotonic() - started
    return result


def run_load(
    fleet: ChaosFleet,
    *,
    submit_clients: int,
    execute_clients: int,
    jobs_per_client: int,
    prefix: str = "load",
    retry_exhausted: bool = False,
) -> LoadResult:
    """Every client on a connection of its own to one of the live orchestrators, all at once:
    each Submits (or Executes) `jobs_per_client` `work` jobs of no length one after another.
    A call that fails counts as an error (none is retried, unless `retry_exhausted`: then a
    RESOURCE_EXHAUSTED with a retry-after is tried again after it)."""
    targets = [f"127.0.0.1:{s.port}" for s in fleet.live("orchestrator")]
    return asyncio.run(
        _drive(
            fleet, targets, submit_clients=submit_clients, execute_clients=execute_clients,
            jobs_per_client=jobs_per_client, prefix=prefix, retry_exhausted=retry_exhausted,
        )
    )  # fmt: skip


class HealthWatch:
    """Asks every live process's gRPC health service every `interval` s from a process of its
    own (`tests/chaos/health_watch.py`), on connections made before the load starts, and keeps
    every answer that was not SERVING, as (role-port, seconds since start, answer)."""

    def __init__(self, fleet: ChaosFleet, *, interval: float = 0.05) -> None:
        self._fleet = fleet
        self._interval = interval
        self._process: subprocess.Popen[str] | None = None
        self.checks = 0
        self.slowest = 0.0  # seconds: the slowest answer
        self.not_serving: list[tuple[str, float, str]] = []

    def __enter__(self) -> HealthWatch:
        targets = [f"{s.role}-{s.port}=127.0.0.1:{s.port}" for s in self._fleet.live()]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.health_watch", str(self._interval), *targets],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self._process.stdout is not None
        assert json.loads(self._process.stdout.readline()) == {"ready": True}
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        out, _ = self._process.communicate(timeout=30)
        for line in out.splitlines():
            record = json.loads(line)
            if "checks" in record:
                self.checks, self.slowest = record["checks"], record["slowest"]
            else:
                self.not_serving.append((record["name"], record["at"], record["answer"]))
