"""The orchestrator tier against a real redis-server, real workers and real orchestrators."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import redis

from tests.grpc_clients import Client, grpcurl, grpcurl_json
from tests.helpers import (
    BOTH_PATHS,
    RedisServer,
    WorkerProcess,
    base_env,
    free_port,
    scrape,
    wait_for,
)

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"}


class Fleet:
    """Workers and orchestrators on the session's redis-server, with fast reports for tests."""

    def __init__(
        self,
        tmp: Path,
        redis_url: str,
        stubs: SimpleNamespace,
        orch: SimpleNamespace,
        *,
        fast_path: bool = True,
    ) -> None:
        self.tmp = tmp
        self.fast_path = fast_path
        self.redis_url = redis_url
        self.stubs = stubs
        self.orch = orch
        self.procs: list[WorkerProcess] = []
        self.channels: list[grpc.Channel] = []

    def env(self, **extra: str) -> dict[str, str]:
        extra.setdefault("REDIS_URL", self.redis_url)
        defaults = {
            "JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS": "0.3",
            "JOBWORKER_ORCHESTRATOR__WORKER_REPORT_INTERVAL_SECONDS": "0.3",
            "JOBWORKER_ORCHESTRATOR__DISCOVERY_INTERVAL_SECONDS": "0.2",
            "JOBWORKER_ORCHESTRATOR__HOST": "127.0.0.1",
            "JOBWORKER_ORCHESTRATOR__RETRY_BASE_SECONDS": "0.05",
            "JOBWORKER_ORCHESTRATOR__RETRY_MAX_SECONDS": "0.3",
            "JOBWORKER_GRPC__FAST_PATH": str(self.fast_path).lower(),
        }
        return base_env(self.tmp / f"p{len(self.procs)}", **{**defaults, **extra})

    def start(self, role: str, *args: str, **env: str) -> WorkerProcess:
        port_key = "JOBWORKER_GRPC__PORT" if role == "worker" else "JOBWORKER_ORCHESTRATOR__PORT"
        env.setdefault(port_key, str(free_port()))
        proc = WorkerProcess(
            self.env(**env), self.tmp / f"{role}-{len(self.procs)}.log", list(args), role
        )
        self.procs.append(proc)
        return proc.wait_ready()

    def worker(self, **env: str) -> WorkerProcess:
        return self.start("worker", **env)

    def orchestrator(self, **env: str) -> WorkerProcess:
        return self.start("orchestrator", **env)

    def stub(self, orchestrator: WorkerProcess) -> Any:
        channel = grpc.insecure_channel(orchestrator.target)
        self.channels.append(channel)
        return self.orch.grpc.OrchestratorServiceStub(channel)

    def worker_client(self, worker: WorkerProcess) -> Client:
        client = Client(self.stubs, worker.target)
        self.channels.append(client.channel)
        return client

    def request(self, job_type: str, job_id: str = "", **fields: Any) -> Any:
        params = fields.pop("params", {})
        return self.orch.pb2.BatchExecutionRequest(
            job_id=job_id, job_type=job_type, params=params, **fields
        )

    def state(self, job: Any) -> str:
        return str(self.orch.pb2.JobState.Name(job.state))

    def wait_job(self, stub: Any, job_id: str, states: set[str], timeout: float = 30) -> Any:
        def reached() -> Any:
            job = stub.GetJob(self.orch.pb2.JobRequest(job_id=job_id), timeout=5)
            return job if self.state(job) in states else None

        return wait_for(reached, timeout=timeout, what=f"job {job_id} in {states}")

    def workers_view(self, stub: Any) -> dict[str, Any]:
        res = stub.ListWorkers(self.orch.pb2.ListWorkersRequest(), timeout=5)
        return {w.address: w for w in res.workers}

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for proc in self.procs:
            proc.close()


@pytest.fixture
def fleet(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
    stubs: SimpleNamespace, orch_stubs: SimpleNamespace, fast_path: bool,
) -> Iterator[Fleet]:  # fmt: skip
    fleet = Fleet(tmp_path, redis_server.url, stubs, orch_stubs, fast_path=fast_path)
    try:
        yield fleet
    finally:
        fleet.close()


def accepted_total(fleet: Fleet, workers: list[WorkerProcess]) -> int:
    return sum(
        fleet.worker_client(w).status().jobs_accepted for w in workers if w.process.poll() is None
    )


@BOTH_PATHS
def test_execute_runs_a_job_and_returns_its_outcome(fleet: Fleet) -> None:
    fleet.worker()
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    res = stub.Execute(fleet.request("echo", "e1", params={"a": "1"}), timeout=30)
    assert fleet.state(res.job) == "SUCCEEDED"
    assert json.loads(res.job.result_json) == {"a": "1"}
    (attempt,) = res.job.attempts
    assert (attempt.number, attempt.outcome, attempt.fencing_token) == (1, "SUCCEEDED", 1)
    failed = stub.Execute(fleet.request("fail", "f1", params={"message": "nope"}), timeout=30)
    assert (fleet.state(failed.job), failed.job.error) == ("FAILED", "JobFailedError: nope")
    assert len(failed.job.attempts) == 1  # a run that failed is not retried unless asked


@BOTH_PATHS
def test_reflection_and_health_for_grpcurl(fleet: Fleet) -> None:
    orch = fleet.orchestrator()
    listed = grpcurl("-plaintext", orch.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"orchestrator.OrchestratorService", "grpc.health.v1.Health"} <= set(
        listed.stdout.split()
    )
    described = grpcurl("-plaintext", orch.target, "describe", "orchestrator.BatchExecutionRequest")
    assert "string job_type = 2;" in described.stdout
    assert grpcurl_json("-plaintext", orch.target, "grpc.health.v1.Health/Check") == {
        "status": "SERVING"
    }


def test_jobs_spread_over_the_workers_by_load(fleet: Fleet) -> None:
    workers = [fleet.worker() for _ in range(3)]
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    wait_for(lambda: len(fleet.workers_view(stub)) == 3, what="three workers discovered")
    ids = [f"spread-{i}" for i in range(30)]
    for job_id in ids:
        stub.Submit(fleet.request("sleep", job_id, params={"seconds": "0.3"}), timeout=10)
    ran_on: Counter[str] = Counter()
    for job_id in ids:
        job = fleet.wait_job(stub, job_id, TERMINAL)
        assert fleet.state(job) == "SUCCEEDED"
        ran_on[job.attempts[-1].worker] += 1
    assert set(ran_on) == {w.target for w in workers}
    assert max(ran_on.values()) <= 20, ran_on  # no worker took (nearly) everything


def test_a_worker_killed_mid_job_finishes_elsewhere_and_is_reported_once(fleet: Fleet) -> None:
    workers = [fleet.worker() for _ in range(2)]
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    wait_for(lambda: len(fleet.workers_view(stub)) == 2, what="two workers discovered")
    stub.Submit(fleet.request("sleep", "victim", params={"seconds": "1.5"}), timeout=10)
    running = fleet.wait_job(stub, "victim", {"RUNNING"})
    first = running.attempts[-1].worker
    updates = stub.WatchJob(fleet.orch.pb2.JobRequest(job_id="victim"), timeout=60)
    next(w for w in workers if w.target == first).signal(signal.SIGKILL)
    states = [fleet.state(job) for job in updates]
    assert states[-1] == "SUCCEEDED"
    assert sum(s in TERMINAL for s in states) == 1  # one outcome, reported once
    job = fleet.wait_job(stub, "victim", TERMINAL)
    assert next(a.worker for a in job.attempts) == first
    assert job.attempts[0].outcome in {"UNREACHABLE", "LOST"}
    assert job.attempts[-1].worker != first
    assert job.attempts[-1].outcome == "SUCCEEDED"


def test_a_killed_orchestrators_jobs_are_finished_by_another(fleet: Fleet) -> None:
    workers = [fleet.worker(JOBWORKER_WORKER__CORE_SIZE="1", JOBWORKER_WORKER__MAX_SIZE="1")
               for _ in range(2)]  # fmt: skip
    first = fleet.orchestrator(JOBWORKER_ORCHESTRATOR__CLAIM_IDLE_SECONDS="1.5")
    stub = fleet.stub(first)
    wait_for(lambda: len(fleet.workers_view(stub)) == 2, what="two workers discovered")
    ids = [f"orphan-{i}" for i in range(5)]
    for job_id in ids:
        stub.Submit(fleet.request("sleep", job_id, params={"seconds": "0.8"}), timeout=10)
    fleet.wait_job(stub, ids[0], {"RUNNING", "SUCCEEDED"})
    first.signal(signal.SIGKILL)
    first.wait_exit()
    second = fleet.orchestrator(JOBWORKER_ORCHESTRATOR__CLAIM_IDLE_SECONDS="1.5")
    stub = fleet.stub(second)
    for job_id in ids:
        assert fleet.state(fleet.wait_job(stub, job_id, TERMINAL)) == "SUCCEEDED"
    assert "claimed job" in second.log()
    # re-dispatches attached to runs already going: each job ran once on the workers
    assert accepted_total(fleet, workers) == len(ids)


def test_a_submit_repeated_with_the_same_id_runs_once(fleet: Fleet) -> None:
    worker = fleet.worker()
    stub = fleet.stub(fleet.orchestrator())
    first = stub.Submit(fleet.request("sleep", "once", params={"seconds": "0.2"}), timeout=10)
    again = stub.Submit(fleet.request("sleep", "once", params={"seconds": "0.2"}), timeout=10)
    assert (first.existing, again.existing) == (False, True)
    res = stub.Execute(fleet.request("sleep", "once", params={"seconds": "0.2"}), timeout=30)
    assert fleet.state(res.job) == "SUCCEEDED"
    assert len(res.job.attempts) == 1
    assert accepted_total(fleet, [worker]) == 1


def test_with_every_worker_busy_jobs_wait_then_run(fleet: Fleet) -> None:
    # watermark 0: one running job makes the worker BUSY
    fleet.worker(JOBWORKER_WORKER__CORE_SIZE="1", JOBWORKER_WORKER__MAX_SIZE="1",
                 JOBWORKER_WORKER__WATERMARK="0")  # fmt: skip
    stub = fleet.stub(fleet.orchestrator())
    stub.Submit(fleet.request("sleep", "hog", params={"seconds": "2"}), timeout=10)
    fleet.wait_job(stub, "hog", {"RUNNING"})
    wait_for(
        lambda: all(w.status == "BUSY" for w in fleet.workers_view(stub).values()), what="BUSY"
    )
    stub.Submit(fleet.request("echo", "patient"), timeout=10)
    waiting = stub.GetJob(fleet.orch.pb2.JobRequest(job_id="patient"), timeout=5)
    assert fleet.state(waiting) == "PENDING"
    assert list(waiting.attempts) == []
    (view,) = fleet.workers_view(stub).values()
    assert (view.eligible, view.reason) == (False, "BUSY")
    done = fleet.wait_job(stub, "patient", TERMINAL)
    assert fleet.state(done) == "SUCCEEDED"
    assert len(done.attempts) == 1
    assert fleet.state(fleet.wait_job(stub, "hog", TERMINAL)) == "SUCCEEDED"


def test_no_worker_means_wait_until_one_appears(fleet: Fleet) -> None:
    stub = fleet.stub(fleet.orchestrator())
    # with no worker known, any job type is accepted and waits, up to its deadline
    stub.Submit(fleet.request("echo", "lonely", deadline_seconds=0.5), timeout=10)
    lonely = fleet.wait_job(stub, "lonely", TERMINAL)
    assert fleet.state(lonely) == "TIMED_OUT"
    assert lonely.error == "deadline passed: no eligible worker took it"
    stub.Submit(fleet.request("echo", "early"), timeout=10)
    early = stub.GetJob(fleet.orch.pb2.JobRequest(job_id="early"), timeout=5)
    assert fleet.state(early) == "PENDING"
    fleet.worker()
    assert fleet.state(fleet.wait_job(stub, "early", TERMINAL)) == "SUCCEEDED"


def test_cancel_pending_and_running(fleet: Fleet) -> None:
    stub = fleet.stub(fleet.orchestrator())
    stub.Submit(fleet.request("sleep", "pending", params={"seconds": "30"}), timeout=10)
    cancelled = stub.CancelJob(fleet.orch.pb2.JobRequest(job_id="pending"), timeout=15)
    assert (fleet.state(cancelled), cancelled.error) == ("CANCELLED", "cancelled by request")
    worker = fleet.worker()
    stub.Submit(fleet.request("sleep", "running", params={"seconds": "30"}), timeout=10)
    fleet.wait_job(stub, "running", {"RUNNING"})
    cancelled = stub.CancelJob(fleet.orch.pb2.JobRequest(job_id="running"), timeout=15)
    assert fleet.state(cancelled) == "CANCELLED"
    assert fleet.worker_client(worker).state("running") == "CANCELLED"
    assert fleet.state(fleet.wait_job(stub, "pending", TERMINAL)) == "CANCELLED"  # never ran


def test_deadline_and_timeouts(fleet: Fleet) -> None:
    fleet.worker()
    stub = fleet.stub(fleet.orchestrator())
    res = stub.Execute(
        fleet.request("sleep", "slow", params={"seconds": "30"}, timeout_seconds=0.3), timeout=30
    )
    assert (fleet.state(res.job), res.job.error) == ("TIMED_OUT", "timed out after 0.3s")
    res = stub.Execute(
        fleet.request("sleep", "late", params={"seconds": "30"}, deadline_seconds=0.5), timeout=30
    )
    assert fleet.state(res.job) == "TIMED_OUT"
    assert res.job.error == "deadline passed while running"


@BOTH_PATHS
def test_bad_input_gets_a_status_naming_the_field(fleet: Fleet) -> None:
    fleet.worker()
    orch = fleet.orchestrator(JOBWORKER_ORCHESTRATOR__QUEUE_BOUND_PER_TYPE="2")
    stub = fleet.stub(orch)
    wait_for(lambda: len(fleet.workers_view(stub)) == 1, what="the worker discovered")
    r = fleet.request
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (r(""), invalid, "job_type: must not be empty"),
        (r("echo; rm"), invalid, "job_type: letters, digits and _.:@/- only, at most 128"),
        (r("echo", "id with spaces"), invalid,
         "job_id: letters, digits and _.:@/- only, at most 256"),
        (r("echo", priority=10), invalid, "priority: must be 0..9"),
        (r("echo", timeout_seconds=-1), invalid, "timeout_seconds: must be 0..31622400 seconds"),
        (r("echo", deadline_seconds=float("nan")), invalid,
         "deadline_seconds: must be 0..31622400 seconds"),
        (r("echo", deadline_seconds=1e308), invalid,
         "deadline_seconds: must be 0..31622400 seconds"),
        (r("echo", max_attempts=99), invalid, "max_attempts: must be 0..20"),
        (r("echo", params={"": "x"}), invalid, "params: keys must not be empty"),
        (r("nosuchjob"), grpc.StatusCode.NOT_FOUND, "no worker runs job type 'nosuchjob'"),
    ]  # fmt: skip
    for request, code, details in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(request, timeout=10)
        assert (info.value.code(), info.value.details()) == (code, details)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetJob(fleet.orch.pb2.JobRequest(job_id="missing"), timeout=10)
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "no job with id 'missing'",
    )
    # the per-type bound: the third unfinished job of a type is refused with a hint
    for job_id in ("q1", "q2"):
        stub.Submit(r("sleep", job_id, params={"seconds": "30"}), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        stub.Submit(r("sleep", "q3", params={"seconds": "30"}), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "queue for job type 'sleep' is full (2 of 2); retry after 5s"
    assert "Traceback" not in orch.log()


class _Proxy(socketserver.ThreadingTCPServer):
    """A TCP relay to one worker that a test can break (connections reset) and heal."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.broken = threading.Event()
        super().__init__(("127.0.0.1", 0), _Relay)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Relay(socketserver.BaseRequestHandler):
    server: _Proxy

    def handle(self) -> None:
        if self.server.broken.is_set():
            self.request.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            return  # closing with linger 0 resets the connection
        upstream = socket.create_connection(self.server.target)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
        back.start()
        pump(self.request, upstream)
        back.join(5)
        upstream.close()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[int], _Proxy]]:
    proxies: list[_Proxy] = []

    def make(port: int) -> _Proxy:
        proxy = _Proxy(("127.0.0.1", port))
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.shutdown()
        proxy.server_close()


def test_a_failing_worker_opens_its_breaker_and_recovers(
    fleet: Fleet, proxy_factory: Callable[[int], _Proxy]
) -> None:
    worker_port = free_port()
    proxy = proxy_factory(worker_port)
    proxy.broken.set()
    # the worker advertises the proxy, so the orchestrator's calls go through it
    fleet.worker(
        JOBWORKER_GRPC__PORT=str(worker_port), JOBWORKER_GRPC__ADVERTISE_PORT=str(proxy.port)
    )
    metrics_port = free_port()
    orch = fleet.orchestrator(
        JOBWORKER_METRICS__PORT=str(metrics_port),
        JOBWORKER_ORCHESTRATOR__BREAKER_FAILURE_THRESHOLD="2",
        # long enough that a slow machine still sees it OPEN between two looks
        JOBWORKER_ORCHESTRATOR__BREAKER_OPEN_SECONDS="3",
        JOBWORKER_ORCHESTRATOR__MAX_ATTEMPTS="10",
    )
    stub = fleet.stub(orch)
    address = f"127.0.0.1:{proxy.port}"
    stub.Submit(fleet.request("echo", "patient"), timeout=10)

    def open_view() -> Any:
        view = fleet.workers_view(stub).get(address)
        return view if view is not None and view.breaker_state == "OPEN" else None

    view = wait_for(open_view, timeout=30, what="breaker OPEN")
    assert (view.eligible, view.reason) == (False, "circuit breaker OPEN")
    state = "jobworker_orchestrator_breaker_state"
    metrics = scrape(metrics_port)
    assert metrics[(state, frozenset({("worker", address), (state, "OPEN")}))] == 1
    # its own gRPC server's calls (Submit, ListWorkers): unary, on the fast path
    assert metrics[("jobworker_grpc_calls_total", frozenset({("path", "fast")}))] >= 2
    assert (
        metrics[("jobworker_orchestrator_breaker_opened_total", frozenset({("worker", address)}))]
        >= 1
    )
    job = stub.GetJob(fleet.orch.pb2.JobRequest(job_id="patient"), timeout=5)
    assert fleet.state(job) in {"PENDING", "DISPATCHED"}
    assert {a.outcome for a in job.attempts} == {"UNREACHABLE"}
    proxy.broken.clear()  # the worker heals: a half-open probe gets through and closes it
    job = fleet.wait_job(stub, "patient", TERMINAL)
    assert fleet.state(job) == "SUCCEEDED"
    assert fleet.workers_view(stub)[address].breaker_state == "CLOSED"
    metrics = scrape(metrics_port)
    assert metrics[(state, frozenset({("worker", address), (state, "CLOSED")}))] == 1
    # the record is written before the dispatcher counts it: wait for the count
    succeeded = ("jobworker_orchestrator_jobs_total", frozenset({("state", "succeeded")}))
    wait_for(lambda: scrape(metrics_port).get(succeeded) == 1, what="the success counted")


def test_a_silent_worker_is_noticed_whatever_the_job_length(fleet: Fleet) -> None:
    workers = [fleet.worker() for _ in range(2)]
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    wait_for(lambda: len(fleet.workers_view(stub)) == 2, what="two workers discovered")
    stub.Submit(fleet.request("sleep", "frozen", params={"seconds": "2"}), timeout=10)
    first = fleet.wait_job(stub, "frozen", {"RUNNING"}).attempts[-1].worker
    stopped = next(w for w in workers if w.target == first)
    stopped.signal(signal.SIGSTOP)  # no RST, no FIN: only keepalive and the registry tell
    try:
        job = fleet.wait_job(stub, "frozen", TERMINAL, timeout=30)
    finally:
        stopped.signal(signal.SIGCONT)
    assert fleet.state(job) == "SUCCEEDED"
    assert job.attempts[0].outcome in {"LOST", "UNREACHABLE"}
    assert job.attempts[-1].worker != first


def test_sigterm_drains_an_orchestrator(fleet: Fleet) -> None:
    fleet.worker()
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    stub.Submit(fleet.request("sleep", "in-hand", params={"seconds": "1.5"}), timeout=10)
    fleet.wait_job(stub, "in-hand", {"RUNNING"})
    orch.signal(signal.SIGTERM)
    orch.wait_log("draining")
    with pytest.raises(grpc.RpcError) as info:
        stub.Submit(fleet.request("echo", "too-late"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert orch.wait_exit() == 0
    other = fleet.stub(fleet.orchestrator())
    job = fleet.wait_job(other, "in-hand", TERMINAL)
    assert fleet.state(job) == "SUCCEEDED"
    assert len(job.attempts) == 1  # finished by the draining orchestrator itself


def test_jobs_past_an_orchestrators_grace_are_left_to_another(fleet: Fleet) -> None:
    worker = fleet.worker()
    first = fleet.orchestrator(
        JOBWORKER_ORCHESTRATOR__DRAIN_GRACE_SECONDS="0.2",
        JOBWORKER_ORCHESTRATOR__CLAIM_IDLE_SECONDS="1",
    )
    stub = fleet.stub(first)
    stub.Submit(fleet.request("sleep", "long", params={"seconds": "3"}), timeout=10)
    fleet.wait_job(stub, "long", {"RUNNING"})
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    second = fleet.orchestrator(JOBWORKER_ORCHESTRATOR__CLAIM_IDLE_SECONDS="1")
    job = fleet.wait_job(fleet.stub(second), "long", TERMINAL)
    assert fleet.state(job) == "SUCCEEDED"
    # the second re-dispatched to the same worker, which attached to the run in progress
    assert {a.worker for a in job.attempts} == {job.attempts[0].worker}
    assert accepted_total(fleet, [worker]) == 1
    assert "claimed job long" in second.log()


def test_a_draining_worker_gets_no_new_work(fleet: Fleet) -> None:
    draining = fleet.worker(JOBWORKER_WORKER__DRAIN_GRACE_SECONDS="30")
    other = fleet.worker()
    stub = fleet.stub(fleet.orchestrator())
    wait_for(lambda: len(fleet.workers_view(stub)) == 2, what="two workers discovered")
    # keep it draining for a while: a job of its own that outlasts this test's checks
    fleet.worker_client(draining).send("sleep", "keeps-it-busy", seconds="10")
    draining.signal(signal.SIGTERM)
    wait_for(
        lambda: fleet.workers_view(stub)[draining.target].status == "DRAINING", what="DRAINING"
    )
    view = fleet.workers_view(stub)[draining.target]
    assert (view.eligible, view.reason) == (False, "DRAINING")
    for i in range(5):
        job = stub.Execute(fleet.request("echo", f"after-drain-{i}"), timeout=30).job
        assert fleet.state(job) == "SUCCEEDED"
        assert [a.worker for a in job.attempts] == [other.target]


def test_an_orchestrator_waits_for_redis_and_stops_cleanly_meanwhile(
    tmp_path: Path, fleet: Fleet
) -> None:
    late = RedisServer(tmp_path / "late-redis", port=free_port())
    (tmp_path / "late-redis").mkdir()
    env = fleet.env(REDIS_URL=late.url, JOBWORKER_ORCHESTRATOR__PORT=str(free_port()))
    orch = WorkerProcess(env, tmp_path / "waiting.log", [], "orchestrator")
    fleet.procs.append(orch)
    try:
        orch.wait_log(r"Redis at \S+ unreachable \(.*\); waiting for it")
        late.start()
        orch.wait_ready()
        orch.signal(signal.SIGTERM)
        assert orch.wait_exit() == 0
    finally:
        late.stop()
    # and a SIGTERM while it still waits stops it at once, exit 0, no traceback
    never = fleet.env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    waiting = WorkerProcess(never, tmp_path / "never.log", [], "orchestrator")
    fleet.procs.append(waiting)
    waiting.wait_log(r"Redis at \S+ unreachable \(.*\); waiting for it")
    waiting.signal(signal.SIGTERM)
    assert waiting.wait_exit() == 0
    assert "Traceback" not in waiting.log()
