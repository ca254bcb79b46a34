"""The unary fast path's one-write OK reply, the cases that must leave it for the general path,
and its fence: nothing patched on import, the start-up probe and its fallback, the switch, the
counters, and the codec's errors.

A FastServer (or a GrpcServer, fast path on or off) runs in the test's event loop (grpclib is
asyncio only) with a handler whose behaviour the request picks; a grpclib client checks what
arrives: message, status, metadata. The worker's own RPCs are covered end to end with grpcio and
grpcurl in test_worker_process.py, with the fast path on and off.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import grpclib.stream
import h2.connection
import hpack
import hpack.hpack
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler, Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.health.v1 import health_pb2
from grpclib.protocol import EventsProcessor, H2Protocol
from grpclib.server import Stream
from hyperframe.frame import PingFrame

from app.core.lifecycle import Lifecycle
from app.grpc.codec import CheckedProtoCodec
from app.grpc.fastpath.codec import UpbProtoCodec
from app.grpc.fastpath.probe import INTERNALS, missing_internals
from app.grpc.fastpath.server import (
    _OK_TRAILERS,
    MAX_CLOSED_STREAMS,
    FastServer,
    _FastProcessor,
    _FastProtocol,
    _ok_headers,
    install_lazy_frame_repr,
)
from app.grpc.server import GrpcServer
from app.grpc.statistics import CodecCounters, CodecStatistics, FastPathMode
from app.pb import worker as pb
from tests.helpers import ROOT

pytestmark = pytest.mark.anyio

METHOD = "/test.Replies/Reply"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Replies:
    """One unary method; `request.name` says how it answers, `params` with what."""

    async def reply(self, stream: Stream[pb.SendWorkReq, pb.SendWorkRes]) -> None:
        request = await stream.recv_message()
        assert request is not None
        size = int(request.params.get("size", "2"))
        message = pb.SendWorkRes(message="x" * size, state=pb.JobState.SUCCEEDED)
        if request.name == "headers":
            await stream.send_initial_metadata(metadata={"x-header": "h"})
        await stream.send_message(message)
        if request.name == "error-after-message":
            raise GRPCError(Status.ABORTED, "changed its mind")
        if request.name == "trailers":
            await stream.send_trailing_metadata(metadata={"x-trailer": "t"})

    def __mapping__(self) -> dict[str, Handler]:
        return {
            METHOD: Handler(self.reply, Cardinality.UNARY_UNARY, pb.SendWorkReq, pb.SendWorkRes)
        }


@pytest.fixture
def one_writes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each `send_ok_reply` answered: True for a reply sent as one write."""
    answers: list[bool] = []
    send_ok_reply = _FastProcessor.send_ok_reply

    def spy(self: _FastProcessor, *args: Any) -> bool:
        answers.append(send_ok_reply(self, *args))
        return answers[-1]

    monkeypatch.setattr(_FastProcessor, "send_ok_reply", spy)
    return answers


@pytest.fixture
async def channel() -> AsyncIterator[Channel]:
    server = FastServer([Replies()])
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = Channel("127.0.0.1", port)
    try:
        yield client
    finally:
        client.close()
        server.close()
        with anyio.fail_after(5):
            await server.wait_closed()


async def call(channel: Channel, name: str, **params: str) -> dict[str, Any]:
    """One call: the reply, the status and both metadata, as the client saw them."""
    async with channel.request(
        METHOD, Cardinality.UNARY_UNARY, pb.SendWorkReq, pb.SendWorkRes, timeout=10
    ) as stream:
        await stream.send_message(pb.SendWorkReq(id="1", name=name, params=params), end=True)
        error: GRPCError | None = None
        reply = None
        try:
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        except GRPCError as exc:
            error = exc
        return {
            "reply": reply,
            "error": error,
            "initial": dict(stream.initial_metadata or {}),
            "trailing": dict(stream.trailing_metadata or {}),
        }


async def test_ok_replies_on_one_connection(channel: Channel, one_writes: list[bool]) -> None:
    # many calls on one connection: h2's stream and flow-control state stays consistent
    for i in range(300):
        seen = await call(channel, "ok", size=str(i))
        assert seen["error"] is None
        assert seen["reply"].message == "x" * i
        assert seen["initial"] == seen["trailing"] == {}
    assert one_writes == [True] * 300
    protocol = channel._protocol
    assert protocol is not None
    assert protocol.connection._connection.open_outbound_streams == 0


async def test_a_reply_past_the_frame_size_and_window_takes_the_general_path(
    channel: Channel, one_writes: list[bool]
) -> None:
    # 16 KiB frames and a 64 KiB window by default: this one needs both split and waited for
    seen = await call(channel, "ok", size=str(200_000))
    assert seen["error"] is None
    assert seen["reply"].message == "x" * 200_000
    seen = await call(channel, "ok", size="3")  # and the connection goes on
    assert seen["reply"].message == "xxx"
    assert one_writes == [False, True]


async def test_an_error_after_the_message_sends_both(
    channel: Channel, one_writes: list[bool]
) -> None:
    seen = await call(channel, "error-after-message")
    assert seen["error"] is not None
    assert (seen["error"].status, seen["error"].message) == (Status.ABORTED, "changed its mind")
    assert one_writes == []


async def test_metadata_goes_out_with_the_reply(channel: Channel, one_writes: list[bool]) -> None:
    seen = await call(channel, "trailers")
    assert seen["reply"].message == "xx"
    assert seen["trailing"] == {"x-trailer": "t"}
    seen = await call(channel, "headers")
    assert seen["reply"].message == "xx"
    assert seen["initial"] == {"x-header": "h"}
    assert one_writes == []  # neither could use the fixed header blocks


def test_the_fixed_header_blocks_decode_with_any_table_state() -> None:
    decoder = hpack.Decoder()
    decoder.decode(b"\x40\x03foo\x03bar")  # something in the dynamic table first
    headers = decoder.decode(_ok_headers("application/grpc+proto"), raw=True)
    assert [tuple(h) for h in headers] == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc+proto"),
    ]
    assert [tuple(h) for h in decoder.decode(_OK_TRAILERS, raw=True)] == [(b"grpc-status", b"0")]
    assert len(decoder.header_table.dynamic_entries) == 1  # literals without indexing


def test_h2_frame_trace_is_formatted_only_when_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2.connection, "repr", repr, raising=False)  # undone after the test
    install_lazy_frame_repr()
    frame = PingFrame(0, b"12345678")
    lazy = h2.connection.repr(frame)  # type: ignore[attr-defined]
    assert not isinstance(lazy, str)  # nothing formatted yet
    # what a logger makes of h2's trace call, once one is configured
    record = logging.LogRecord(
        "h2", logging.DEBUG, __file__, 0, "Received frame: %s", (lazy,), None
    )
    assert record.getMessage() == f"Received frame: {frame!r}"


# --- the fence: nothing on import, the probe, the switch, the counters ---------------------------


def test_importing_the_fast_path_patches_nothing() -> None:
    # its own interpreter: this one may have installed the frame-trace tweak already
    script = textwrap.dedent("""
        import h2.connection
        import app.grpc.server, app.grpc.fastpath.server, app.grpc.fastpath.install
        print("repr" in vars(h2.connection), h2.connection.H2Connection.MAX_CLOSED_STREAMS)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", str(2**16)]


@asynccontextmanager
async def serving(fast_path: bool) -> AsyncIterator[tuple[GrpcServer, Channel]]:
    """A GrpcServer for `Replies` on a free port, and a grpclib client channel to it."""
    server = GrpcServer([Replies()], host="127.0.0.1", fast_path=fast_path, close_grace_seconds=1)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.run, [0])
        client = Channel("127.0.0.1", port)
        try:
            yield server, client
        finally:
            client.close()
            tg.cancel_scope.cancel()
    assert server.state is Lifecycle.STOPPED


def closed_streams_limit(h2c: h2.connection.H2Connection) -> int:
    """How many closed streams `h2c` remembers (h2's SizeLimitDict keeps it private)."""
    return int(cast(Any, h2c._closed_streams)._size_limit)


async def test_only_server_connections_remember_fewer_closed_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    protocols: list[H2Protocol] = []
    connection_made = _FastProtocol.connection_made

    def spy(self: _FastProtocol, transport: Any) -> None:
        connection_made(self, transport)
        protocols.append(self)

    monkeypatch.setattr(_FastProtocol, "connection_made", spy)
    async with serving(fast_path=True) as (server, client):
        assert (await call(client, "ok"))["reply"].message == "xx"
        assert client._protocol is not None
        client_h2 = client._protocol.connection._connection
        (protocol,) = protocols
        server_h2 = protocol.connection._connection
        assert closed_streams_limit(server_h2) == MAX_CLOSED_STREAMS == 4096
        assert server_h2.MAX_CLOSED_STREAMS == 4096
        # the client in the same process keeps h2's own default, as does the class
        assert h2.connection.H2Connection.MAX_CLOSED_STREAMS == 2**16
        assert closed_streams_limit(client_h2) == 2**16
        assert server.statistics().fast_path is FastPathMode.ON


async def test_the_probe_finds_everything_on_the_pinned_versions() -> None:
    assert missing_internals() == []
    assert len(INTERNALS) > 80  # one list, read once


@pytest.mark.parametrize(
    ("owner", "name", "replacement", "reported"),
    [
        (EventsProcessor, "process_stream_reset", None,
         "grpclib.protocol.EventsProcessor.process_stream_reset"),
        (hpack.hpack, "encode_integer", lambda value, bits: b"?",
         "hpack.hpack.encode_integer (not the shape the fast path needs)"),
        (h2.connection.H2Connection, "_data_to_send", 0, "<H2Connection>._data_to_send"),
    ],
)  # fmt: skip
async def test_the_probe_names_what_is_missing_or_changed(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, replacement: Any, reported: str
) -> None:
    if replacement is None:
        monkeypatch.delattr(owner, name)
    elif owner is h2.connection.H2Connection:  # an attribute instances set: change their shape
        init = owner.__init__

        def changed(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            setattr(self, name, replacement)

        monkeypatch.setattr(owner, "__init__", changed)
    else:
        monkeypatch.setattr(owner, name, replacement)
    missing = missing_internals()
    assert any(m.startswith(reported) for m in missing), missing


async def test_a_missing_internal_falls_back_to_grpclibs_server_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # something only the fast path uses (grpclib's own server already holds its reference)
    monkeypatch.delattr(grpclib.stream, "StreamIterator")
    caplog.set_level(logging.INFO)
    async with serving(fast_path=True) as (server, client):
        seen = await call(client, "ok")
        assert seen["error"] is None
        assert seen["reply"].message == "xx"
        s = server.statistics()
        assert (s.fast_path, s.state, s.fast_calls, s.general_calls) == (
            FastPathMode.FALLEN_BACK, Lifecycle.RUNNING, 0, 1
        )  # fmt: skip
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "grpclib.stream.StreamIterator" in message
    assert "serving with grpclib's own server" in message


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path-on", "fast-path-off"])
async def test_calls_are_counted_by_the_path_that_served_them(fast_path: bool) -> None:
    async with serving(fast_path) as (server, client):
        for _ in range(3):
            assert (await call(client, "ok"))["reply"].message == "xx"
        # health's Watch streams: grpclib's path on either server
        async with client.request(
            "/grpc.health.v1.Health/Watch", Cardinality.UNARY_STREAM,
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, timeout=10,
        ) as stream:  # fmt: skip
            await stream.send_message(health_pb2.HealthCheckRequest(), end=True)
            assert (await stream.recv_message()) is not None
            await stream.cancel()
        s = server.statistics()
        assert (s.fast_calls, s.general_calls) == ((3, 1) if fast_path else (0, 4))
        expected = "on" if fast_path else "off"
        assert f"RUNNING fast_path={expected} calls fast={s.fast_calls} general=" in repr(server)


# --- the codec: fallbacks counted, decode errors answered INTERNAL --------------------------------


class Raw:
    """A request's bytes as they are: grpclib's client codec sends what SerializeToString gives."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


async def call_raw(channel: Channel, data: bytes) -> tuple[Status | None, str | None, Any]:
    """Send `data` as the request message; (status or None, its message, reply)."""
    request_type: Any = Raw
    async with channel.request(
        METHOD, Cardinality.UNARY_UNARY, request_type, pb.SendWorkRes, timeout=10
    ) as stream:
        await stream.send_message(Raw(data), end=True)
        try:
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        except GRPCError as exc:
            return exc.status, exc.message, None
        return None, None, reply


@pytest.mark.parametrize("path", ["fast", "general", "plain"])
async def test_a_request_that_does_not_decode_gets_internal_on_every_path(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(fast_path=path != "plain") as (server, client):
        if path == "general":  # a listener sends every call of the fast server grpclib's way

            async def ignore(event: RecvRequest) -> None:
                pass

            listen(server._server, RecvRequest, ignore)
        # truncated: neither upb nor betterproto2 decodes it
        status, message, _ = await call_raw(client, b"\x0a\xff")
        assert (status, message) == (
            Status.INTERNAL, "cannot decode the request message as worker.SendWorkReq"
        )  # fmt: skip
        # not protobuf (field number 0 and a truncated varint): refused on every path alike
        status, message, _ = await call_raw(client, b"\xff\xff\xff")
        assert (status, message) == (
            Status.INTERNAL, "cannot decode the request message as worker.SendWorkReq"
        )  # fmt: skip
        # an unknown field (15): the service gets the request without it
        status, _, reply = await call_raw(client, bytes(pb.SendWorkReq(id="j")) + b"\x78\x05")
        assert status is None
        assert reply.message == "xx"
        s = server.statistics()
        assert s.codec.decode_error == 2
        assert (s.fast_calls > 0) is (path == "fast")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_codec_counts_each_way_out_of_upb() -> None:
    codec = UpbProtoCodec(CodecCounters())
    plain = pb.SendWorkReq(id="j", name="echo", params={"a": "1"})
    assert codec.decode(bytes(plain), pb.SendWorkReq) == plain
    assert codec.counters.snapshot() == CodecStatistics()
    # an unknown field (15, varint): read by upb, the field dropped (betterproto2 would keep
    # it, in time quadratic in their number)
    unknown = bytes(plain) + b"\x78\x05"
    decoded = codec.decode(unknown, pb.SendWorkReq)
    assert decoded == plain
    assert bytes(decoded) == bytes(plain)
    # not protobuf: INTERNAL
    for junk in (b"\x08", b"\xff\xff\xff"):
        with pytest.raises(GRPCError) as info:
            codec.decode(junk, pb.SendWorkReq)
        assert info.value.status is Status.INTERNAL
    # a reply with unknown fields: betterproto2 writes them back
    replied = pb.SendWorkReq.parse(unknown)
    assert codec.encode(replied, pb.SendWorkReq) == unknown
    # an int32 past its range: upb refuses, betterproto2 encodes it as it does with the path off
    big = pb.WorkerStatus(active=2**40)
    assert codec.encode(big, pb.WorkerStatus) == bytes(big)
    assert codec.counters.snapshot() == CodecStatistics(
        decode_fallback=1, decode_error=2, encode_fallback=1, encode_upb_error=1,
    )  # fmt: skip


def test_the_plain_codec_answers_internal_too() -> None:
    codec = CheckedProtoCodec()
    with pytest.raises(GRPCError) as info:
        codec.decode(b"\x0a\xff", health_pb2.HealthCheckRequest)
    assert (info.value.status, info.value.message) == (
        Status.INTERNAL, "cannot decode the request message as grpc.health.v1.HealthCheckRequest"
    )  # fmt: skip
    assert codec.counters.decode_error == 1
