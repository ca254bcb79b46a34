"""The worker as its users meet it: a real process, a real redis-server, grpcurl and grpcio."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import psutil
import pytest
import redis

from tests.grpc_clients import Client, generate_grpcio_stubs, grpcurl, grpcurl_json
from tests.helpers import (
    BOTH_PATHS,
    ROOT,
    RedisServer,
    WorkerProcess,
    base_env,
    free_port,
    scrape,
    wait_for,
)

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def connect(stubs: SimpleNamespace) -> Iterator[Callable[[WorkerProcess], Client]]:
    clients: list[Client] = []

    def make(worker: WorkerProcess) -> Client:
        clients.append(Client(stubs, worker.target))
        return clients[-1]

    yield make
    for client in clients:
        client.channel.close()


def pod_info(client: redis.Redis, worker: WorkerProcess) -> dict[str, Any] | None:
    raw = client.get(f"wpm-apps:127.0.0.1:{worker.pid}")
    return None if raw is None else dict(json.loads(raw))


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- the seed's contract --------------------------------------------------------------------------


@BOTH_PATHS
def test_seed_grpcurl_examples_work_verbatim(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis, start_worker: StartWorker,
    fast_path: bool,
) -> None:  # fmt: skip
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", 9091)) != 0, "port 9091 is in use on this machine"
    # no port given: 9091, as in the seed
    env = base_env(
        tmp_path, REDIS_URL=redis_server.url, JOBWORKER_GRPC__FAST_PATH=str(fast_path).lower()
    )
    worker = start_worker(env)
    assert worker.port == 9091
    assert "->SVC::gRPC server started on port 9091" in worker.log()
    listed = grpcurl("-plaintext", "localhost:9091", "list")
    assert listed.returncode == 0, listed.stderr
    assert {"worker.WorkerService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    methods = grpcurl("-plaintext", "localhost:9091", "list", "worker.WorkerService")
    assert "worker.WorkerService.SendWork" in methods.stdout.split()
    described = grpcurl("-plaintext", "localhost:9091", "describe", "worker.SendWorkReq")
    assert "string id = 1;" in described.stdout
    assert "string name = 2;" in described.stdout
    everything = grpcurl("-plaintext", "localhost:9091", "describe")
    assert everything.returncode == 0, everything.stderr
    assert "rpc Check ( .grpc.health.v1.HealthCheckRequest )" in everything.stdout
    sent = grpcurl_json("-plaintext", "-d", '{"id":"job-1","name":"demo"}', "localhost:9091",
                        "worker.WorkerService/SendWork")  # fmt: skip
    assert sent["message"] == "job job-1 accepted: RUNNING"
    job = grpcurl_json(
        "-plaintext", "-d", '{"id":"job-1"}', "localhost:9091", "worker.WorkerService/GetJob"
    )
    assert job["name"] == "demo"
    health = grpcurl_json("-plaintext", "localhost:9091", "grpc.health.v1.Health/Check")
    assert health == {"status": "SERVING"}


@BOTH_PATHS
def test_an_old_client_built_from_the_seed_proto_still_works(
    tmp_path: Path, worker_env: dict[str, str], start_worker: StartWorker
) -> None:
    worker = start_worker(worker_env)
    out = tmp_path / "seed_stubs"
    out.mkdir()
    generate_grpcio_stubs(ROOT / "tests" / "seed_proto", out)
    # its own process: the seed's worker.proto and ours cannot share one protobuf pool
    script = textwrap.dedent(f"""
        import grpc, sys
        sys.path.insert(0, {str(out)!r})
        import worker_pb2, worker_pb2_grpc
        with grpc.insecure_channel({worker.target!r}) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            res = stub.SendWork(worker_pb2.SendWorkReq(id="old-1", name="echo"), timeout=10)
            print(res.message)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "job old-1 accepted: RUNNING"


def test_pod_info_key_json_and_ttl(
    worker_env: dict[str, str], redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    worker = start_worker(worker_env)
    key = f"wpm-apps:127.0.0.1:{worker.pid}"
    first: dict[str, Any] = wait_for(lambda: pod_info(redis_client, worker), what="PodInfo key")
    assert list(first)[:3] == ["grpcPort", "status", "updateDatetime"]
    assert first["grpcPort"] == worker.port
    assert first["status"] == "IDLE"
    assert first["pid"] == worker.pid
    assert first["ip"] == "127.0.0.1"
    assert (first["coreSize"], first["maxSize"], first["capacity"]) == (4, 8, 4)
    assert datetime.fromisoformat(first["updateDatetime"]).utcoffset() is not None
    assert 0 < redis_client.ttl(key) <= 60
    # refreshed on the report interval (0.5 s in these tests)
    wait_for(
        lambda: (
            (pod_info(redis_client, worker) or {}).get("updateDatetime") != first["updateDatetime"]
        ),
        what="a newer updateDatetime",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit() == 0
    assert redis_client.exists(key) == 0


def test_prefix_and_ttl_are_configurable(
    worker_env: dict[str, str], redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    env = {
        **worker_env,
        "JOBWORKER_REDIS__KEY_PREFIX": "fleet-a",
        "JOBWORKER_REDIS__TTL_SECONDS": "7",
    }
    worker = start_worker(env)
    key = f"fleet-a:127.0.0.1:{worker.pid}"
    wait_for(lambda: redis_client.exists(key), what=key)
    assert 0 < redis_client.ttl(key) <= 7


# --- load, queue, cancel, timeout -----------------------------------------------------------------


def test_idle_busy_idle_under_load(
    worker_env: dict[str, str], redis_client: redis.Redis, start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
) -> None:  # fmt: skip
    env = {**worker_env, "JOBWORKER_WORKER__CORE_SIZE": "2", "JOBWORKER_WORKER__MAX_SIZE": "2",
           "JOBWORKER_WORKER__WATERMARK": "50"}  # fmt: skip
    worker = start_worker(env)
    client = connect(worker)
    assert client.status().status == "IDLE"
    client.send("sleep", "a", seconds="60")
    assert client.status().status == "IDLE"  # 1 of 2 is 50 %: at the watermark
    client.send("sleep", "b", seconds="60")
    assert client.status().status == "BUSY"
    wait_for(
        lambda: (pod_info(redis_client, worker) or {}).get("status") == "BUSY", what="PodInfo BUSY"
    )
    client.cancel("a")
    client.cancel("b")
    assert client.status().status == "IDLE"
    wait_for(
        lambda: (pod_info(redis_client, worker) or {}).get("status") == "IDLE", what="PodInfo IDLE"
    )


@BOTH_PATHS
def test_queue_full_is_rejected(
    worker_env: dict[str, str],
    start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
) -> None:
    env = {**worker_env, "JOBWORKER_WORKER__CORE_SIZE": "1", "JOBWORKER_WORKER__MAX_SIZE": "2",
           "JOBWORKER_WORKER__QUEUE_CAPACITY": "1"}  # fmt: skip
    worker = start_worker(env)
    client = connect(worker)
    assert client.send("sleep", "1", seconds="60").state == client.pb2.RUNNING
    assert client.send("sleep", "2", seconds="60").state == client.pb2.QUEUED
    assert client.send("sleep", "3", seconds="60").state == client.pb2.RUNNING  # grew to max
    err = rpc_error(lambda: client.send("sleep", "4", seconds="60"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "queue is full (1 waiting, 2 running)"
    status = client.status()
    assert (status.active, status.capacity, status.queued, status.jobs_rejected) == (2, 2, 1, 1)


def test_cancel_and_timeout(
    worker_env: dict[str, str],
    start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
) -> None:
    worker = start_worker(worker_env)
    client = connect(worker)
    timed = client.run("sleep", "t", timeout=0.3, seconds="60")
    assert client.pb2.JobState.Name(timed.state) == "TIMED_OUT"
    assert timed.error == "timed out after 0.3s"
    client.send("block", "b", seconds="60")  # a blocking job, in a thread
    cancelled = client.cancel("b")
    assert client.pb2.JobState.Name(cancelled.state) == "CANCELLED"
    assert client.state("b") == "CANCELLED"
    assert client.status().active == 0
    ok = client.run("echo", "e", colour="blue")
    assert json.loads(ok.result_json) == {"colour": "blue"}
    failed = client.run("fail", "f", message="no luck")
    assert (client.pb2.JobState.Name(failed.state), failed.error) == (
        "FAILED",
        "JobFailedError: no luck",
    )


@BOTH_PATHS
def test_bad_input_gets_a_status_with_a_reason(
    worker_env: dict[str, str],
    start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
) -> None:
    worker = start_worker(worker_env)
    client = connect(worker)
    cases: list[tuple[Callable[[], Any], grpc.StatusCode, str]] = [
        (lambda: client.send("echo", ""), grpc.StatusCode.INVALID_ARGUMENT,
         "id: must not be empty"),
        (lambda: client.send("", "x"), grpc.StatusCode.INVALID_ARGUMENT,
         "name: must not be empty"),
        (lambda: client.send("nope", "x"), grpc.StatusCode.NOT_FOUND, "no job named 'nope'"),
        (lambda: client.send("sleep", "x", seconds="soon"), grpc.StatusCode.INVALID_ARGUMENT,
         "params.seconds: expected a number, got 'soon'"),
        (lambda: client.send("echo", "x", timeout=-1), grpc.StatusCode.INVALID_ARGUMENT,
         "timeout_seconds: must be a finite number, 0 or more"),
        (lambda: client.get("missing"), grpc.StatusCode.NOT_FOUND, "no job with id 'missing'"),
        (lambda: client.cancel("missing"), grpc.StatusCode.NOT_FOUND, "no job with id 'missing'"),
    ]  # fmt: skip
    for call, code, details in cases:
        err = rpc_error(call)
        assert (err.code(), err.details()) == (code, details)
    client.send("sleep", "dup", seconds="60")
    err = rpc_error(lambda: client.send("sleep", "dup", seconds="60"))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "job 'dup' is already RUNNING",
    )
    # a request message that does not decode (truncated): INTERNAL, as grpc-go and grpcio say
    raw = client.channel.unary_unary(
        "/worker.WorkerService/SendWork",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    err = rpc_error(lambda: raw(b"\x0a\xff", timeout=10))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INTERNAL,
        "cannot decode the request message as worker.SendWorkReq",
    )
    assert "Traceback" not in worker.log()


# --- ports ----------------------------------------------------------------------------------------


def test_port_falls_back_to_a_neighbour_and_is_remembered(
    tmp_path: Path, worker_env: dict[str, str], start_worker: StartWorker
) -> None:
    while True:  # two adjacent free ports
        taken = free_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", taken + 1)) != 0:
                break
    # no port given: the worker starts at grpc.default_port and chooses a neighbour itself
    env = {k: v for k, v in worker_env.items() if k != "JOBWORKER_GRPC__PORT"}
    env["JOBWORKER_GRPC__DEFAULT_PORT"] = str(taken)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        worker = start_worker(env)
        assert worker.port == taken + 1
    last_port = tmp_path / "state" / "jobworker" / "last-port"
    assert last_port.read_text().strip() == str(taken + 1)
    worker.signal()
    assert worker.wait_exit() == 0
    # the next start begins at the last port it chose, though the default is free again
    again = start_worker(env)
    assert again.port == taken + 1


def test_a_port_given_explicitly_is_never_remembered(
    tmp_path: Path, worker_env: dict[str, str], start_worker: StartWorker
) -> None:
    chosen, one_off = free_port(), free_port()
    env = {k: v for k, v in worker_env.items() if k != "JOBWORKER_GRPC__PORT"}
    env["JOBWORKER_GRPC__DEFAULT_PORT"] = str(chosen)
    last_port = tmp_path / "state" / "jobworker" / "last-port"
    first = start_worker(env)  # chose its port itself: remembered
    assert first.port == chosen
    assert last_port.read_text().strip() == str(chosen)
    first.signal()
    assert first.wait_exit() == 0
    for given in (["--port", str(one_off)], []):  # the flag, then grpc.port in the environment
        extra = {} if given else {"JOBWORKER_GRPC__PORT": str(one_off)}
        once = start_worker({**env, **extra}, *given)
        assert once.port == one_off
        once.signal()
        assert once.wait_exit() == 0
        assert last_port.read_text().strip() == str(chosen)
    # a later plain start goes back to the port it chose itself, not the one-off
    plain = start_worker(env)
    assert plain.port == chosen


def test_9091_taken_falls_back_to_9092(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 9091))
        blocker.listen()
        worker = start_worker(base_env(tmp_path, REDIS_URL=redis_server.url))
    assert worker.port == 9092
    info = wait_for(lambda: pod_info(redis_client, worker), what="PodInfo key")
    assert info["grpcPort"] == 9092


def test_all_neighbours_taken_gives_an_ephemeral_port(
    worker_env: dict[str, str], start_worker: StartWorker
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        env = {**worker_env, "JOBWORKER_GRPC__PORT": str(taken), "JOBWORKER_GRPC__PORT_SEARCH": "0"}
        worker = start_worker(env)
    assert worker.port not in (0, taken)


# --- shutdown -------------------------------------------------------------------------------------


@BOTH_PATHS
def test_sigterm_drains_running_jobs_then_exits_zero(
    worker_env: dict[str, str], redis_client: redis.Redis, start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
) -> None:  # fmt: skip
    env = {**worker_env, "JOBWORKER_WORKER__DRAIN_GRACE_SECONDS": "20"}
    worker = start_worker(env)
    client = connect(worker)
    wait_for(lambda: pod_info(redis_client, worker), what="PodInfo key")
    running = client.stub.RunWork.future(
        client.pb2.SendWorkReq(id="long", name="sleep", params={"seconds": "1.5"}), timeout=30
    )
    wait_for(lambda: client.status().active == 1, what="the job to start")
    worker.signal(signal.SIGTERM)
    wait_for(
        lambda: (pod_info(redis_client, worker) or {}).get("status") == "DRAINING", what="DRAINING"
    )
    health = client.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda _: b"",
        response_deserializer=lambda raw: raw,
    )
    assert health(None, timeout=5) == b"\x08\x02"  # status: NOT_SERVING
    err = rpc_error(lambda: client.send("echo", "late"))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.UNAVAILABLE, "worker is draining and takes no new work"
    )  # fmt: skip
    result = running.result(timeout=30)
    assert client.pb2.JobState.Name(result.state) == "SUCCEEDED"
    assert worker.wait_exit() == 0
    assert pod_info(redis_client, worker) is None
    assert "drained" in worker.log()


def test_jobs_past_the_grace_are_cancelled(
    worker_env: dict[str, str],
    start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
) -> None:
    env = {**worker_env, "JOBWORKER_WORKER__DRAIN_GRACE_SECONDS": "0.5"}
    worker = start_worker(env)
    client = connect(worker)
    stuck = client.stub.RunWork.future(
        client.pb2.SendWorkReq(id="stuck", name="sleep", params={"seconds": "600"}), timeout=30
    )
    wait_for(lambda: client.status().active == 1, what="the job to start")
    started = time.monotonic()
    worker.signal(signal.SIGINT)
    result = stuck.result(timeout=30)
    assert client.pb2.JobState.Name(result.state) == "CANCELLED"
    assert result.error == "worker shut down before the job finished"
    assert worker.wait_exit() == 0
    assert time.monotonic() - started < 15


# --- Redis ----------------------------------------------------------------------------------------


def test_redis_outage_under_a_live_worker(
    tmp_path: Path, start_worker: StartWorker, connect: Callable[[WorkerProcess], Client]
) -> None:
    own = RedisServer(tmp_path)
    own.start()
    probe = own.client()  # reconnects by itself after the restart
    try:
        env = base_env(
            tmp_path, REDIS_URL=own.url, JOBWORKER_GRPC__PORT=str(free_port()),
            JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS="0.2",
            JOBWORKER_REDIS__RETRY_MAX_SECONDS="0.4",
        )  # fmt: skip
        worker = start_worker(env)
        client = connect(worker)
        key = f"wpm-apps:127.0.0.1:{worker.pid}"
        wait_for(lambda: probe.exists(key), what="PodInfo key")
        own.stop()
        wait_for(lambda: client.status().registry_failures >= 4, timeout=30, what="failed reports")
        assert not client.status().registry_connected
        # still serving gRPC while Redis is away
        assert client.pb2.JobState.Name(client.run("echo", "during-outage").state) == "SUCCEEDED"
        assert worker.log().count("registry unreachable") == 1
        own.start()
        wait_for(lambda: probe.exists(key), timeout=30, what="re-registration")
        assert client.status().registry_connected
        assert re.search(r"registry reachable again after \d+ failed attempt\(s\) over [\d.]+s: "
                         r"PodInfo re-registered as wpm-apps:", worker.log())  # fmt: skip
        worker.signal()
        assert worker.wait_exit() == 0
        assert probe.exists(key) == 0
    finally:
        probe.close()
        own.stop()


def test_redis_down_at_boot_still_serves(
    tmp_path: Path, start_worker: StartWorker, connect: Callable[[WorkerProcess], Client]
) -> None:
    env = base_env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                   JOBWORKER_GRPC__PORT=str(free_port()))  # fmt: skip
    worker = start_worker(env)
    client = connect(worker)
    assert client.pb2.JobState.Name(client.run("echo", "x").state) == "SUCCEEDED"
    assert not client.status().registry_connected
    worker.signal()
    assert worker.wait_exit() == 0


def _make_tls_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_rediss_tls_with_an_acl_user(tmp_path: Path, start_worker: StartWorker) -> None:
    cert, key = _make_tls_cert(tmp_path)
    tls_port = free_port()

    def tls_client() -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=tls_port, ssl=True, ssl_ca_certs=str(cert),
                           username="jobs", password="s3cret", socket_timeout=2)  # fmt: skip

    # the default user is off: only the ACL user gets in, and only over TLS
    server = RedisServer(tmp_path, client=tls_client, extra=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-auth-clients", "no", "--user", "default", "off",
        "--user", "jobs", "on", ">s3cret", "~wpm-apps:*", "+@all",
    ])  # fmt: skip
    server.start()
    admin = server.client()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        env = base_env(
            tmp_path,
            REDIS_URL=url,
            JOBWORKER_GRPC__PORT=str(free_port()),
            JOBWORKER_REDIS__USERNAME="jobs",
            JOBWORKER_REDIS__PASSWORD="s3cret",
        )
        worker = start_worker(env)
        key_name = f"wpm-apps:127.0.0.1:{worker.pid}"
        wait_for(lambda: admin.exists(key_name), what="PodInfo over TLS")
        worker.signal()
        assert worker.wait_exit() == 0
        assert admin.exists(key_name) == 0
    finally:
        admin.close()
        server.stop()


def test_embedded_redis_when_none_is_configured(
    tmp_path: Path, start_worker: StartWorker, connect: Callable[[WorkerProcess], Client]
) -> None:
    env = base_env(tmp_path, JOBWORKER_GRPC__PORT=str(free_port()))
    worker = start_worker(env)
    match = worker.wait_log(r"started embedded \S+ at unix://(\S+)")
    socket_path = Path(match[1])
    client = connect(worker)
    assert client.status().registry_connected
    local = redis.Redis(unix_socket_path=str(socket_path))
    assert local.exists(f"wpm-apps:127.0.0.1:{worker.pid}")
    local.close()
    worker.signal()
    assert worker.wait_exit() == 0
    assert "embedded redis stopped" in worker.log()
    assert not socket_path.parent.exists()


def test_the_embedded_redis_dies_with_a_killed_worker(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    env = base_env(tmp_path, JOBWORKER_GRPC__PORT=str(free_port()))
    worker = start_worker(env)
    worker.wait_log(r"started embedded \S+ at unix://")
    (server,) = psutil.Process(worker.pid).children()
    assert server.name() in ("redis-server", "valkey-server")
    worker.signal(signal.SIGKILL)
    worker.wait_exit()

    def gone() -> bool:
        return not server.is_running() or server.status() == psutil.STATUS_ZOMBIE

    wait_for(gone, timeout=10, what="the embedded redis-server to stop")


def test_ctrl_c_in_a_terminal_drains_a_worker_with_its_embedded_redis(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    """A terminal's Ctrl-C reaches its whole process group: the embedded server is out of it,
    so it does not stop under the worker in the middle of the drain."""
    worker = start_worker(base_env(tmp_path, JOBWORKER_GRPC__PORT=str(free_port())))
    worker.wait_log(r"started embedded \S+ at unix://")
    (server,) = psutil.Process(worker.pid).children()
    assert os.getpgid(server.pid) != os.getpgid(worker.pid)
    os.killpg(worker.pid, signal.SIGINT)  # the worker leads its group (start_new_session)
    assert worker.wait_exit() == 0
    assert "worker stopped" in worker.log()
    assert "Traceback" not in worker.log()


# --- config and user jobs -------------------------------------------------------------------------


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("extra_env", "args", "message"),
    [
        ({"JOBWORKER_WORKER__CORE_SIZE": "many"}, [],
         "worker.core_size (from JOBWORKER_WORKER__CORE_SIZE): expected `int`, got `str`"),
        ({"JOBWORKER_WORKER__WATERMARK": "150"}, [],
         "worker.watermark (from JOBWORKER_WORKER__WATERMARK): must be 0..100"),
        ({"JOBWORKER_WORKER__MAX_SIZE": "1", "JOBWORKER_WORKER__CORE_SIZE": "3"}, [],
         "worker.max_size (from JOBWORKER_WORKER__MAX_SIZE): must be at least core_size"),
        ({"JOBWORKER_WORKR__CORE_SIZE": "2"}, [],
         "workr (from JOBWORKER_WORKR__CORE_SIZE): unknown key"),
        ({"PROFILE": "nope"}, [], "PROFILE: no profile named 'nope' (have: live, local)"),
        ({"REDIS_URL": "http://x"}, [],
         "redis.url (from REDIS_URL): must start with redis://, rediss:// or unix://"),
        ({}, ["--jobs", "no_such_module_here"],
         "--jobs: cannot import 'no_such_module_here': ModuleNotFoundError"),
        ({"JOBWORKER_REDIS__EMBEDDED": "false"}, [],
         "redis.url: no Redis configured and redis.embedded is false"),
    ],
)  # fmt: skip
def test_bad_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, extra_env: dict[str, str], args: list[str], message: str
) -> None:
    env = base_env(tmp_path, JOBWORKER_GRPC__PORT=str(free_port()), **extra_env)
    result = _run_cli(env, "worker", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"jobworker: config error: {message}")


def test_user_jobs_from_a_module(
    tmp_path: Path, worker_env: dict[str, str], start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
) -> None:  # fmt: skip
    (tmp_path / "userjobs.py").write_text(
        textwrap.dedent("""
        from app import job
        from app.job_registry import job as job_as_before  # the import of the first release

        @job
        async def double(n: int) -> int:
            return 2 * n

        @job_as_before(name="shout")
        def shout_blocking(text: str) -> str:
            return text.upper()
    """)
    )
    env = {**worker_env, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    worker = start_worker(env, "--jobs", "userjobs")
    client = connect(worker)
    assert json.loads(client.run("double", "d", n="21").result_json) == 42
    assert json.loads(client.run("shout", "s", text="hi").result_json) == "HI"
    assert {"double", "shout", "echo"} <= set(client.status().job_names)
    err = rpc_error(lambda: client.send("double", "bad", n="x"))
    assert err.details() == "params.n: expected an integer, got 'x'"


def test_job_modules_are_found_in_the_current_directory(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    """`jobworker worker --jobs myjobs` from the folder of myjobs.py, through the console script
    (whose own folder, not the current one, is first on its path; `python -m` would hide it)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "myjobs.py").write_text(
        "from app import job\n\n\n@job\nasync def hello() -> str:\n    return 'hi'\n"
    )
    script = Path(sys.executable).parent / "jobworker"
    assert script.is_file(), "the venv has no jobworker console script"
    env = {**worker_env, "PYTHONPATH": ""}  # the project is installed; the folder is not on it
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(script), "worker", "--jobs", "myjobs"], env=env, cwd=folder,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(
                lambda: process.poll() is not None or "worker ready" in log_path.read_text(),
                timeout=20,
                what="the worker to start or exit",
            )
            text = log_path.read_text()
            assert process.poll() is None, text
            assert re.search(r"worker ready: .*jobs \S*\bhello\b", text), text
        finally:
            process.kill()
            process.wait(10)


@BOTH_PATHS
def test_cli_clients(worker_env: dict[str, str], start_worker: StartWorker) -> None:
    worker = start_worker(worker_env)
    env = {**worker_env}
    target = ["--target", worker.target]
    direct = ["--worker", worker.target]  # the job commands go to an orchestrator otherwise
    submitted = _run_cli(
        env, "submit", *direct, "echo", "-p", "a=1", "--id", "c1", "--wait", "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["state"] == "SUCCEEDED"
    status = _run_cli(env, "status", "--worker", worker.target)
    assert json.loads(status.stdout)["grpcPort"] == worker.port
    assert _run_cli(env, "health", *target).stdout.strip() == "SERVING"
    missing = _run_cli(env, "job", *direct, "nope")
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "jobworker: NOT_FOUND: no job with id 'nope'",
    )


@BOTH_PATHS
def test_prometheus_metrics(
    worker_env: dict[str, str],
    start_worker: StartWorker,
    connect: Callable[[WorkerProcess], Client],
    fast_path: bool,
) -> None:
    port = free_port()
    worker = start_worker({**worker_env, "JOBWORKER_METRICS__PORT": str(port)})
    client = connect(worker)
    client.run("echo", "m1")
    client.run("fail", "m2")
    raw = client.channel.unary_unary("/worker.WorkerService/GetJob", request_serializer=bytes)
    assert rpc_error(lambda: raw(b"\x0a\xff", timeout=10)).code() == grpc.StatusCode.INTERNAL
    metrics = scrape(port)
    calls = {
        path: metrics[("jobworker_grpc_calls_total", frozenset({("path", path)}))]
        for path in ("fast", "general")
    }
    # the two RunWork and the GetJob that did not decode, by the path that served them
    assert calls == ({"fast": 3, "general": 0} if fast_path else {"fast": 0, "general": 3})
    mode = "on" if fast_path else "off"
    assert metrics[("jobworker_grpc_fast_path", frozenset({("jobworker_grpc_fast_path", mode)}))]
    codec = {
        dict(labels)["kind"]: value
        for (name, labels), value in metrics.items()
        if name == "jobworker_grpc_codec_events_total"
    }
    assert codec["decode_error"] == 1
    assert sum(codec.values()) == 1
    assert metrics[("jobworker_jobs_total", frozenset({("outcome", "succeeded")}))] == 1
    assert metrics[("jobworker_jobs_total", frozenset({("outcome", "failed")}))] == 1
    assert metrics[("jobworker_status", frozenset({("jobworker_status", "IDLE")}))] == 1
    assert metrics[("jobworker_max_size", frozenset())] == 8
    assert metrics[("jobworker_registry_connected", frozenset())] == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
    assert info.value.code == 404
    info.value.close()
