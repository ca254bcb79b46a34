"""The unary fast path's one-write OK reply, and the cases that must leave it for the general path.

A FastServer runs in the test's event loop (grpclib is asyncio only) with a handler whose
behaviour the request picks; a grpclib client checks what arrives: message, status, metadata.
The worker's own RPCs are covered end to end with grpcio and grpcurl in test_worker_process.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import h2.connection
import hpack
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1 import health_pb2
from grpclib.server import Stream
from hyperframe.frame import PingFrame

import app.grpc.fastpath.server  # noqa: F401  (h2 settings the worker's server applies)
from app.grpc.codec import CheckedProtoCodec
from app.grpc.fastpath.codec import UpbProtoCodec
from app.grpc.fastpath.server import _OK_TRAILERS, FastServer, _FastProcessor, _ok_headers
from app.grpc.statistics import CodecCounters, CodecStatistics
from app.pb import worker as pb

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


def test_h2_frame_trace_is_formatted_only_when_logged() -> None:
    frame = PingFrame(0, b"12345678")
    lazy = h2.connection.repr(frame)  # type: ignore[attr-defined]
    assert not isinstance(lazy, str)  # nothing formatted yet
    # what a logger makes of h2's trace call, once one is configured
    record = logging.LogRecord(
        "h2", logging.DEBUG, __file__, 0, "Received frame: %s", (lazy,), None
    )
    assert record.getMessage() == f"Received frame: {frame!r}"


# --- the codec: fallbacks counted, decode errors answered INTERNAL --------------------------------


def test_the_codec_counts_each_way_out_of_upb() -> None:
    codec = UpbProtoCodec(CodecCounters())
    plain = pb.SendWorkReq(id="j", name="echo", params={"a": "1"})
    assert codec.decode(bytes(plain), pb.SendWorkReq) == plain
    assert codec.counters.snapshot() == CodecStatistics()
    # an unknown field (15, varint): betterproto2 decodes it and keeps the field
    unknown = bytes(plain) + b"\x78\x05"
    decoded = codec.decode(unknown, pb.SendWorkReq)
    assert decoded == plain
    assert bytes(decoded) == unknown
    assert codec.encode(decoded, pb.SendWorkReq) == unknown  # written back, by betterproto2
    # upb refuses, betterproto2 reads an empty message
    assert codec.decode(b"\xff\xff\xff", pb.SendWorkReq) == pb.SendWorkReq()
    # neither can
    with pytest.raises(GRPCError) as info:
        codec.decode(b"\x08", pb.SendWorkReq)
    assert info.value.status is Status.INTERNAL
    # an int32 past its range: upb refuses, betterproto2 encodes it as it does with the path off
    big = pb.WorkerStatus(active=2**40)
    assert codec.encode(big, pb.WorkerStatus) == bytes(big)
    assert codec.counters.snapshot() == CodecStatistics(
        decode_fallback=1, decode_upb_rejected=1, decode_error=1, encode_fallback=1,
        encode_upb_error=1,
    )  # fmt: skip


def test_the_plain_codec_answers_internal_too() -> None:
    codec = CheckedProtoCodec()
    with pytest.raises(GRPCError) as info:
        codec.decode(b"\x0a\xff", health_pb2.HealthCheckRequest)
    assert (info.value.status, info.value.message) == (
        Status.INTERNAL, "cannot decode the request message as grpc.health.v1.HealthCheckRequest"
    )  # fmt: skip
    assert codec.counters.decode_error == 1
