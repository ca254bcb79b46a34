"""Bad requests against real worker and orchestrator processes (issue 10, point 6).

Every field of every RPC fuzzed at the wire (hypothesis): every reply is OK or a status other
than UNKNOWN with a one-line reason, and the process stays healthy. Garbage, HTTP/1.1 and half
a handshake on the gRPC port are closed; a megabyte id and an oversized message are answered at
once while other clients are served; 2,000 streams that never read leave the server responsive
and its memory bounded; RESOURCE_EXHAUSTED carries RetryInfo that the official client decodes.
No process log has a traceback.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import psutil
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import RedisServer, WorkerProcess, base_env, free_port, scrape, wait_for

HANDSHAKE_TIMEOUT = 1.0
MiB = 1024 * 1024

# --- the processes: one worker and one orchestrator for the module ------------------------------


def _start(tmp: Path, role: str, log: str, **env: str) -> WorkerProcess:
    port_key = "JOBWORKER_GRPC__PORT" if role == "worker" else "JOBWORKER_ORCHESTRATOR__PORT"
    env.setdefault(port_key, str(free_port()))
    environment = base_env(
        tmp / log,
        JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS="0.5",
        JOBWORKER_ORCHESTRATOR__HOST="127.0.0.1",
        JOBWORKER_GRPC__HANDSHAKE_TIMEOUT_SECONDS=str(HANDSHAKE_TIMEOUT),
        **env,
    )
    return WorkerProcess(environment, tmp / f"{log}.log", [], role).wait_ready()


@pytest.fixture(scope="module")
def procs(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("bad_requests")
    started: list[WorkerProcess] = []
    try:
        # a worker with one slot and no queue, so that a running job fills it
        metrics_port = free_port()
        worker = _start(
            tmp, "worker", "worker", REDIS_URL=redis_server.url,
            JOBWORKER_WORKER__CORE_SIZE="1", JOBWORKER_WORKER__MAX_SIZE="1",
            JOBWORKER_WORKER__QUEUE_CAPACITY="0", JOBWORKER_METRICS__PORT=str(metrics_port),
            JOBWORKER_METRICS__HOST="127.0.0.1",
        )  # fmt: skip
        started.append(worker)
        # an orchestrator that sees no worker (its own key prefix): submissions wait in a queue
        # of one per job type
        orch = _start(
            tmp, "orchestrator", "orchestrator", REDIS_URL=redis_server.url,
            JOBWORKER_REDIS__KEY_PREFIX="bad-requests-none",
            JOBWORKER_ORCHESTRATOR__QUEUE_BOUND_PER_TYPE="1",
            JOBWORKER_ORCHESTRATOR__STREAM_KEY="bad-requests:stream",
            JOBWORKER_ORCHESTRATOR__JOB_PREFIX="bad-requests-job",
        )  # fmt: skip
        started.append(orch)
        yield SimpleNamespace(worker=worker, orch=orch, tmp=tmp, metrics_port=metrics_port)
    finally:
        for proc in started:
            proc.close()
    for proc in started:
        assert "Traceback" not in proc.log(), proc.log()[-3000:]


@pytest.fixture(scope="module")
def channels(procs: SimpleNamespace) -> Iterator[SimpleNamespace]:
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    worker = grpc.insecure_channel(procs.worker.target, options=options)
    orch = grpc.insecure_channel(procs.orch.target, options=options)
    try:
        yield SimpleNamespace(worker=worker, orch=orch)
    finally:
        worker.close()
        orch.close()


def _raw(channel: grpc.Channel, method: str) -> Callable[..., Any]:
    call: Callable[..., Any] = channel.unary_unary(
        method, request_serializer=bytes, response_deserializer=bytes
    )
    return call


def _check_reply(call: Callable[[], Any], seen: Counter[str] | None = None) -> grpc.RpcError | None:
    """Make the call: OK, or a status other than UNKNOWN with a one-line reason."""
    try:
        call()
    except grpc.RpcError as err:
        if seen is not None:
            seen[err.code().name] += 1
        code, details = err.code(), err.details() or ""
        assert code is not grpc.StatusCode.UNKNOWN, details
        assert details, code
        assert "\n" not in details, details[:200]
        assert len(details) <= 600, details[:200]
        assert "Traceback" not in details
        return err
    if seen is not None:
        seen["OK"] += 1
    return None


def _alive(channel: grpc.Channel, method: str) -> None:
    _raw(channel, method)(b"", timeout=5)


# --- the protobuf wire, written by hand so that anything can be sent ------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _double_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<d", value)


TOO_MANY_FIELDS = (
    "more than 1088 fields, more than a request may hold (1024 entries in its lists and maps)"
)


def _map_field(number: int, entries: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(_len_field(number, _len_field(1, k) + _len_field(2, v)) for k, v in entries)


_CONTROL = st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=20)
# strings as bytes, so that invalid UTF-8 can be sent too
strings = st.one_of(
    st.just(b""),
    st.text(max_size=40).map(str.encode),
    _CONTROL.map(str.encode),
    st.sampled_from([b"echo", b"fail", b"demo", b"nosuchjob", b"\xff\xfe", b"\xc3\x28", b"a\x00b"]),
    st.sampled_from([300, 70_000, MiB, 3 * MiB]).map(lambda n: b"x" * n),
)
doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1e308, -0.0, 5e-324, 0.01]),
)
integers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, 9, 10, 2**31, -1]),
)
params = st.one_of(
    st.lists(st.tuples(strings, strings), max_size=5),
    st.integers(min_value=60, max_value=3000).map(
        lambda n: [(f"k{i}".encode(), b"v") for i in range(n)]
    ),
    st.just([(b"big", b"x" * (70 * 1024))]),
)
junk = st.binary(max_size=64)

# the request fields of each RPC: (number, strategy, encoder)
STRING, INT, DOUBLE, MAP = "string", "int", "double", "map"
_ENCODE: dict[str, Callable[[int, Any], bytes]] = {
    STRING: _len_field, INT: _int_field, DOUBLE: _double_field, MAP: _map_field,
}  # fmt: skip
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    STRING: strings, INT: integers, DOUBLE: doubles, MAP: params,
}  # fmt: skip


def _field(number: int, kind: str) -> st.SearchStrategy[bytes]:
    encode = _ENCODE[kind]
    return st.one_of(st.just(b""), _VALUES[kind].map(lambda value: encode(number, value)))


def request(fields: list[tuple[int, str]]) -> st.SearchStrategy[bytes]:
    """A request: its fields, each present or not with any value, maybe with unknown fields or
    junk after them; or just junk."""
    drawn = [_field(number, kind) for number, kind in fields]
    extra = st.one_of(
        st.just(b""), junk, integers.map(lambda v: _int_field(15, v)), st.just(b"\x78" * 10)
    )
    message = st.tuples(*drawn, extra).map(b"".join) if drawn else extra
    return st.one_of(message, junk)


SEND_WORK = [(1, STRING), (2, STRING), (3, MAP), (4, DOUBLE), (5, INT)]
JOB_REF = [(1, STRING)]
BATCH = [(1, STRING), (2, STRING), (3, MAP), (4, DOUBLE), (5, INT), (6, DOUBLE), (7, INT), (8, INT),
         (9, STRING)]  # fmt: skip
LIST_JOBS = [(1, INT), (2, STRING), (3, STRING), (4, STRING), (5, STRING), (6, INT), (7, STRING)]

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)  # fmt: skip


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("/worker.WorkerService/SendWork", SEND_WORK),
        ("/worker.WorkerService/RunWork", SEND_WORK),
        ("/worker.WorkerService/GetJob", JOB_REF),
        ("/worker.WorkerService/CancelJob", JOB_REF),
        ("/worker.WorkerService/GetStatus", []),
    ],
)
def test_every_worker_field_fuzzed(
    channels: SimpleNamespace, method: str, fields: list[tuple[int, str]]
) -> None:
    call = _raw(channels.worker, method)
    seen: Counter[str] = Counter()

    @FUZZ
    @given(data=request(fields))
    def fuzz(data: bytes) -> None:
        _check_reply(lambda: call(data, timeout=10), seen)

    fuzz()
    print(method, dict(seen))
    assert sum(seen.values()) >= 40
    assert len(seen) >= 2, seen  # the fuzz reached past the first check
    _alive(channels.worker, "/worker.WorkerService/GetStatus")


# RunWorkStream's messages: WorkBatch{repeated WorkItem items = 1}, WorkItem{seq = 1, work = 2}
_work_item = st.tuples(_field(1, INT), request(SEND_WORK).map(lambda b: _len_field(2, b))).map(
    b"".join
)
work_batches = st.one_of(
    st.lists(_work_item, max_size=4).map(lambda items: b"".join(_len_field(1, i) for i in items)),
    junk,
)


def test_the_work_stream_fuzzed(channels: SimpleNamespace) -> None:
    """Junk batches on RunWorkStream: the call answers its items (each refused with a status
    and a reason, or run) and ends OK, or ends with a status; never UNKNOWN, never a traceback."""
    call = channels.worker.stream_stream(
        "/worker.WorkerService/RunWorkStream", request_serializer=bytes,
        response_deserializer=bytes,
    )  # fmt: skip
    seen: Counter[str] = Counter()

    @FUZZ
    @given(data=work_batches)
    def fuzz(data: bytes) -> None:
        _check_reply(lambda: list(call(iter([data]), timeout=10)), seen)

    fuzz()
    print(dict(seen))
    assert sum(seen.values()) >= 40
    assert len(seen) >= 2, seen  # some calls went through, some did not read
    _alive(channels.worker, "/worker.WorkerService/GetStatus")


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("/orchestrator.OrchestratorService/Submit", BATCH),
        ("/orchestrator.OrchestratorService/Execute", BATCH),
        ("/orchestrator.OrchestratorService/GetJob", JOB_REF),
        ("/orchestrator.OrchestratorService/CancelJob", JOB_REF),
        ("/orchestrator.OrchestratorService/WatchJob", JOB_REF),
        ("/orchestrator.OrchestratorService/ListWorkers", []),
        ("/orchestrator.OrchestratorService/ListJobs", LIST_JOBS),
    ],
)
def test_every_orchestrator_field_fuzzed(
    channels: SimpleNamespace, method: str, fields: list[tuple[int, str]]
) -> None:
    if method.endswith("WatchJob"):
        stream = channels.orch.unary_stream(
            method, request_serializer=bytes, response_deserializer=bytes
        )

        def call(data: bytes) -> Any:
            return list(stream(data, timeout=1))
    else:
        unary = _raw(channels.orch, method)
        # Execute waits for a job no worker runs: its client deadline ends it
        timeout = 1 if method.endswith("Execute") else 10

        def call(data: bytes) -> Any:
            return unary(data, timeout=timeout)

    examples = 15 if method.endswith(("Execute", "WatchJob")) else 40
    seen: Counter[str] = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(data=request(fields))
    def fuzz(data: bytes) -> None:
        _check_reply(lambda: call(data), seen)

    fuzz()
    print(method, dict(seen))
    assert sum(seen.values()) >= examples
    assert len(seen) >= 2, seen
    _alive(channels.orch, "/orchestrator.OrchestratorService/ListWorkers")


# --- not gRPC at all ------------------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Read until the server closes; the seconds it took (fails if it stays open)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {seconds}s") from None
    return time.monotonic() - start


@pytest.mark.parametrize(
    "payload",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 200,  # a TLS ClientHello
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,  # the preface, then junk frames
        bytes(range(256)) * 4,
    ],
    ids=["tls", "http1", "preface-then-junk", "bytes"],
)
def test_garbage_on_the_grpc_port_is_closed(procs: SimpleNamespace, payload: bytes) -> None:
    for proc in (procs.worker, procs.orch):
        with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
            sock.sendall(payload)
            _closed_within(sock, 5)
    assert "Traceback" not in procs.worker.log() + procs.orch.log()


@pytest.mark.parametrize("sent", [b"", b"PRI * HTTP/2.0\r\n"], ids=["nothing", "half-preface"])
def test_half_a_handshake_is_closed_after_the_timeout(
    procs: SimpleNamespace, channels: SimpleNamespace, sent: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", procs.worker.port), timeout=5) as sock:
        sock.sendall(sent)
        took = _closed_within(sock, HANDSHAKE_TIMEOUT + 4)
    assert took >= HANDSHAKE_TIMEOUT * 0.8
    # a client that completed the handshake is not closed for idling past the same timeout
    _alive(channels.worker, "/worker.WorkerService/GetStatus")
    with _h2_connection(procs.worker.port) as (sock, conn):
        time.sleep(HANDSHAKE_TIMEOUT + 0.5)
        conn.ping(b"12345678")
        sock.sendall(conn.data_to_send())
        sock.settimeout(5)
        acked = False
        while not acked:
            data = sock.recv(65536)
            assert data, "closed"
            acked = any(isinstance(e, h2.events.PingAckReceived) for e in conn.receive_data(data))


# --- large values and messages: answered at once, others served meanwhile ------------------------


class _Pollers:
    """Threads calling a cheap RPC in a loop on their own channel; the slowest answer seen."""

    def __init__(self, target: str, method: str, threads: int = 3) -> None:
        self.target, self.method = target, method
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll) for _ in range(threads)]

    def _poll(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            call = _raw(channel, self.method)
            call(b"", timeout=10)  # connected before the measured calls
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    call(b"", timeout=10)
                except grpc.RpcError as err:
                    self.errors.append(err)
                self.latencies.append(time.monotonic() - start)

    def __enter__(self) -> _Pollers:
        for t in self._threads:
            t.start()
        wait_for(lambda: len(self.latencies) >= 3, what="the pollers' first answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        assert not self.errors, self.errors[:3]


def _rss(proc: WorkerProcess) -> int:
    return int(psutil.Process(proc.pid).memory_info().rss)


@pytest.mark.parametrize(
    ("who", "method", "request_bytes", "code", "details"),
    [
        (
            "worker",
            "/worker.WorkerService/GetJob",
            _len_field(1, b"x" * MiB),
            "INVALID_ARGUMENT",
            "id: at most 256 characters",
        ),
        (
            "worker",
            "/worker.WorkerService/CancelJob",
            _len_field(1, b"x" * MiB),
            "INVALID_ARGUMENT",
            "id: at most 256 characters",
        ),
        (
            "worker",
            "/worker.WorkerService/SendWork",
            _len_field(1, b"j") + _len_field(2, b"echo") + _map_field(3, [(b"v", b"x" * 8 * MiB)]),
            "RESOURCE_EXHAUSTED",
            "received message larger than max ({size} vs. 4194304 bytes)",
        ),
        (
            "orch",
            "/orchestrator.OrchestratorService/GetJob",
            _len_field(1, b"x" * MiB),
            "INVALID_ARGUMENT",
            "job_id: letters, digits and _.:@/- only, at most 256",
        ),
        (
            "orch",
            "/orchestrator.OrchestratorService/Submit",
            _len_field(2, b"echo") + _map_field(3, [(b"v", b"x" * 64 * MiB)]),
            "RESOURCE_EXHAUSTED",
            "received message larger than max ({size} vs. 4194304 bytes)",
        ),
        # under the size limit, but 400k tiny entries: refused before any parser sees them
        (
            "worker",
            "/worker.WorkerService/SendWork",
            _len_field(1, b"j") + _len_field(2, b"echo") + _map_field(3, [(b"k", b"v")] * 400_000),
            "INVALID_ARGUMENT",
            TOO_MANY_FIELDS,
        ),
        (
            "orch",
            "/orchestrator.OrchestratorService/Submit",
            _len_field(2, b"echo") + _map_field(3, [(b"k", b"v")] * 400_000),
            "INVALID_ARGUMENT",
            TOO_MANY_FIELDS,
        ),
    ],
    ids=[
        "worker-getjob-1mb-id",
        "worker-cancel-1mb-id",
        "worker-8mb-sendwork",
        "orch-getjob-1mb-id",
        "orch-64mb-submit",
        "worker-400k-params",
        "orch-400k-params",
    ],
)
def test_large_requests_are_answered_at_once_and_others_are_served(
    procs: SimpleNamespace,
    channels: SimpleNamespace,
    who: str,
    method: str,
    request_bytes: bytes,
    code: str,
    details: str,
) -> None:
    proc, channel = getattr(procs, who), getattr(channels, who)
    cheap = "/worker.WorkerService/GetStatus" if who == "worker" else (
        "/orchestrator.OrchestratorService/ListWorkers"
    )  # fmt: skip
    before = _rss(proc)
    with _Pollers(proc.target, cheap) as pollers:
        for _ in range(3):
            err = _check_reply(lambda: _raw(channel, method)(request_bytes, timeout=30))
            assert err is not None
            expected = details.format(size=len(request_bytes))
            assert (err.code().name, err.details()) == (code, expected)
    # liveness, not a benchmark: nobody waited on the event loop behind the large request
    assert max(pollers.latencies) < 1.0, max(pollers.latencies)
    grown = (_rss(proc) - before) / MiB
    print(f"{method}: slowest other call {max(pollers.latencies):.3f}s, RSS +{grown:.1f} MiB")
    assert grown < 40, f"RSS grew by {grown:.0f} MiB"


def test_an_oversized_message_on_a_streaming_rpc_is_refused_before_it_is_buffered(
    procs: SimpleNamespace, channels: SimpleNamespace
) -> None:
    # WatchJob is server-streaming: grpclib's own path serves it, on the fast server too
    watch = channels.orch.unary_stream(
        "/orchestrator.OrchestratorService/WatchJob",
        request_serializer=bytes,
        response_deserializer=bytes,
    )
    before = _rss(procs.orch)
    with pytest.raises(grpc.RpcError) as info:
        list(watch(_len_field(1, b"x" * 32 * MiB), timeout=30))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "received message larger than max (33554437 vs. 4194304 bytes)"
    assert (_rss(procs.orch) - before) / MiB < 20
    _alive(channels.orch, "/orchestrator.OrchestratorService/ListWorkers")


# --- 2,000 streams that never read ---------------------------------------------------------------


class _h2_connection:
    """A raw HTTP/2 client connection with its handshake done."""

    def __init__(self, port: int, *, window: int = 65535) -> None:
        self.port, self.window = port, window

    def __enter__(self) -> tuple[socket.socket, h2.connection.H2Connection]:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window}
        )
        conn.initiate_connection()
        self.sock.sendall(conn.data_to_send())
        return self.sock, conn

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _get_status_request(conn: h2.connection.H2Connection, stream_id: int, port: int) -> None:
    conn.send_headers(
        stream_id,
        [(":method", "POST"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"),
         (":path", "/worker.WorkerService/GetStatus"), ("content-type", "application/grpc"),
         ("te", "trailers")],
    )  # fmt: skip
    conn.send_data(stream_id, b"\x00\x00\x00\x00\x00", end_stream=True)


def test_2000_streams_that_never_read(procs: SimpleNamespace) -> None:
    worker = procs.worker
    before = _rss(worker)
    calls_before = _calls(procs)
    sockets: list[socket.socket] = []
    try:
        with _Pollers(worker.target, "/worker.WorkerService/GetStatus") as pollers:
            # 20 connections of 100 streams (the limit per connection), a window of 0: the
            # replies can never be sent, and nothing is ever read from these sockets
            for _ in range(20):
                sock = socket.create_connection(("127.0.0.1", worker.port), timeout=5)
                sockets.append(sock)
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.local_settings = h2.settings.Settings(
                    client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
                )
                conn.initiate_connection()
                for i in range(100):
                    _get_status_request(conn, 2 * i + 1, worker.port)
                sock.sendall(conn.data_to_send())
            # each stream's call ran; its reply waits for a window that never opens
            wait_for(
                lambda: _calls(procs) - calls_before >= 2000, timeout=30, what="2,000 calls taken"
            )
            grown = (_rss(worker) - before) / MiB
        print(f"2,000 streams: slowest other call {max(pollers.latencies):.3f}s, +{grown:.1f} MiB")
        assert max(pollers.latencies) < 1.0, max(pollers.latencies)
        assert grown < 40, f"RSS grew by {grown:.0f} MiB for 2,000 streams"
        # more streams than allowed on one connection: the connection is refused as a whole
        with _h2_connection(worker.port) as (sock, conn):
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            for i in range(150):
                _get_status_request(conn, 2 * i + 1, worker.port)
            sock.sendall(conn.data_to_send())
            _closed_within(sock, 5)
    finally:
        for sock in sockets:
            sock.close()
    with grpc.insecure_channel(worker.target) as channel:
        _alive(channel, "/worker.WorkerService/GetStatus")


def _calls(proc: SimpleNamespace) -> float:
    """gRPC calls the process has taken, by its /metrics."""
    metrics = scrape(proc.metrics_port)
    return sum(v for (name, _), v in metrics.items() if name == "jobworker_grpc_calls_total")


# --- RESOURCE_EXHAUSTED with RetryInfo ----------------------------------------------------------


def _retry_delay(err: grpc.RpcError) -> float:
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin"
    assert status.code == err.code().value[0]
    assert status.message == err.details()
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1
    delay = infos[0].retry_delay
    return float(delay.seconds + delay.nanos / 1e9)


def _trailer(err: grpc.RpcError, key: str) -> str | None:
    return next((v for k, v in err.trailing_metadata() or () if k == key), None)


def test_resource_exhausted_carries_retry_info(
    procs: SimpleNamespace, channels: SimpleNamespace, stubs: SimpleNamespace,
    orch_stubs: SimpleNamespace,
) -> None:  # fmt: skip
    worker = stubs.grpc.WorkerServiceStub(channels.worker)
    pb = stubs.pb2
    worker.SendWork(pb.SendWorkReq(id="hold", name="sleep", params={"seconds": "30"}), timeout=5)
    try:
        with pytest.raises(grpc.RpcError) as info:
            worker.SendWork(pb.SendWorkReq(id="more", name="echo"), timeout=5)
        err = info.value
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == "queue is full (0 waiting, 1 running)"
        assert _retry_delay(err) == 1.0
        assert _trailer(err, "retry-after-ms") == "1000"
    finally:
        worker.CancelJob(pb.JobRef(id="hold"), timeout=10)
    orch = orch_stubs.grpc.OrchestratorServiceStub(channels.orch)
    opb = orch_stubs.pb2
    job_type = f"retry{time.monotonic_ns()}"
    orch.Submit(opb.BatchExecutionRequest(job_type=job_type), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        orch.Submit(opb.BatchExecutionRequest(job_type=job_type), timeout=5)
    err = info.value
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_delay(err) == 5.0
    assert _trailer(err, "retry-after-ms") == "5000"
    assert not math.isnan(_retry_delay(err))


def test_the_cli_reads_the_retry_hint(procs: SimpleNamespace, stubs: SimpleNamespace) -> None:
    import subprocess
    import sys

    with grpc.insecure_channel(procs.worker.target) as channel:
        worker = stubs.grpc.WorkerServiceStub(channel)
        worker.SendWork(
            stubs.pb2.SendWorkReq(id="hold-cli", name="sleep", params={"seconds": "30"}), timeout=5
        )
        try:
            result = subprocess.run(
                [sys.executable, "-m", "app", "submit", "echo", "--worker", procs.worker.target],
                capture_output=True, text=True, timeout=30, env=procs.worker.env, check=False,
            )  # fmt: skip
        finally:
            worker.CancelJob(stubs.pb2.JobRef(id="hold-cli"), timeout=10)
    assert (result.returncode, result.stderr.strip()) == (
        1,
        "jobworker: RESOURCE_EXHAUSTED: queue is full (0 waiting, 1 running) (retry after 1s)",
    )


def test_the_fuzz_left_no_traceback(procs: SimpleNamespace) -> None:
    with ThreadPoolExecutor(2) as pool:
        logs = list(pool.map(lambda p: p.log(), (procs.worker, procs.orch)))
    for log in logs:
        assert "Traceback" not in log
        assert "Exception" not in log


def test_the_limits_hold_with_the_fast_path_off(
    tmp_path: Path, redis_server: RedisServer, stubs: SimpleNamespace
) -> None:
    worker = _start(
        tmp_path, "worker", "worker-off", REDIS_URL=redis_server.url,
        JOBWORKER_GRPC__FAST_PATH="false", JOBWORKER_WORKER__CORE_SIZE="1",
        JOBWORKER_WORKER__MAX_SIZE="1", JOBWORKER_WORKER__QUEUE_CAPACITY="0",
    )  # fmt: skip
    try:
        assert "fast_path=off" in worker.log()
        with grpc.insecure_channel(worker.target) as channel:
            before = _rss(worker)
            big = (
                _len_field(1, b"j")
                + _len_field(2, b"echo")
                + _map_field(3, [(b"v", b"x" * 32 * MiB)])
            )
            with _Pollers(worker.target, "/worker.WorkerService/GetStatus") as pollers:
                err = _check_reply(
                    lambda: _raw(channel, "/worker.WorkerService/SendWork")(big, timeout=30)
                )
                assert err is not None
                assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert (
                    err.details()
                    == f"received message larger than max ({len(big)} vs. 4194304 bytes)"
                )
                err = _check_reply(
                    lambda: _raw(channel, "/worker.WorkerService/GetJob")(
                        _len_field(1, b"x" * MiB), timeout=30
                    )
                )
                assert err is not None
                assert err.details() == "id: at most 256 characters"
            assert max(pollers.latencies) < 1.0
            assert (_rss(worker) - before) / MiB < 40
            stub = stubs.grpc.WorkerServiceStub(channel)
            pb = stubs.pb2
            stub.SendWork(
                pb.SendWorkReq(id="hold", name="sleep", params={"seconds": "30"}), timeout=5
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.SendWork(pb.SendWorkReq(id="more", name="echo"), timeout=5)
            assert _retry_delay(info.value) == 1.0
            assert _trailer(info.value, "retry-after-ms") == "1000"
        with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n")
            assert _closed_within(sock, HANDSHAKE_TIMEOUT + 4) >= HANDSHAKE_TIMEOUT * 0.8
    finally:
        worker.close()
    assert "Traceback" not in worker.log()


def _hpack_int(value: int, prefix: int, flags: int) -> bytes:
    top = (1 << prefix) - 1
    if value < top:
        return bytes([flags | value])
    out = [flags | top]
    value -= top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def test_a_huge_header_block_closes_its_connection_before_it_is_decoded(
    procs: SimpleNamespace, channels: SimpleNamespace
) -> None:
    worker = procs.worker
    # metadata under the 16 KiB header list limit passes
    metadata = (("x-note", "n" * 8000),)
    _raw(channels.worker, "/worker.WorkerService/GetStatus")(b"", timeout=5, metadata=metadata)
    # a megabyte of Huffman-coded "a" in one header, over 61 frames (h2 takes up to 64)
    a8 = bytes([0x18, 0xC6, 0x31, 0x8C, 0x63])  # eight "a" (00011 each)
    value = a8 * (MiB // 8)
    block = (
        b"\x83\x86\x41\x01x"  # :method POST, :scheme http, :authority x
        + b"\x04" + _hpack_int(31, 7, 0) + b"/worker.WorkerService/GetStatus"
        + b"\x00" + _hpack_int(5, 7, 0) + b"x-big" + _hpack_int(len(value), 7, 0x80) + value
    )  # fmt: skip
    parts = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    frames = b"".join(
        struct.pack(">I", len(part))[1:]
        + bytes([1 if i == 0 else 9, 4 if i == len(parts) - 1 else 0])
        + struct.pack(">I", 1)
        + part
        for i, part in enumerate(parts)
    )
    with (
        _Pollers(worker.target, "/worker.WorkerService/GetStatus") as pollers,
        _h2_connection(worker.port) as (sock, _),
    ):
        sock.sendall(frames)
        _closed_within(sock, 5)
    assert max(pollers.latencies) < 1.0
    assert "Traceback" not in worker.log()
