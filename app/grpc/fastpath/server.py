"""A lean path for unary-unary calls on grpclib's HTTP/2 server, same wire behaviour.

grpclib serves every call through the same machinery as a bidirectional stream: a protocol
stream with three events, a read buffer on an asyncio.Queue, a server stream with dispatch
hooks, a deadline wrapper, and one socket write for each of the headers, the message and the
trailers. For a unary-unary call none of that is needed: the request is one message.

`FastServer` is a `grpclib.server.Server` whose connections take a well-formed unary-unary
request (POST, gRPC content type, `te: trailers`, a known method, a valid `grpc-timeout`) off
the h2 events directly: the message is collected from its DATA frames, one task runs the method
handler with a `UnaryStream` (the `grpclib.server.Stream` API for one request and one reply),
an OK reply without metadata is framed in one piece (`send_ok_reply`), and what h2 has to send
is written once per event-loop turn, so concurrent replies share a write. Everything else
(streaming methods such as reflection and health Watch, malformed requests, servers with
grpclib event listeners) takes grpclib's own path unchanged.

What a client sees is what grpclib sends: the same headers, trailers-only replies for errors,
`grpc-status`/`grpc-message`/`grpc-status-details-bin`, RST_STREAM(NO_ERROR) after an error
status on a stream the client has not finished, DEADLINE_EXCEEDED when `grpc-timeout` runs
out, and the same log records on the `grpclib.server` logger.

Importing this module changes nothing in grpclib or h2. The closed-streams limit is set on each
server connection's own H2Connection, and the one process-wide tweak (h2's frame-trace `repr`)
is applied by `install.install_fast_server`, after the probe, when a fast server is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import struct
import time
from typing import TYPE_CHECKING, Any

import h2.connection
import h2.exceptions
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.const import Handler as MethodHandler
from grpclib.encoding.base import GRPC_CONTENT_TYPE
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.metadata import (
    _STATUS_DETAILS_KEY,
    Deadline,
    decode_metadata,
    decode_timeout,
    encode_bin_value,
    encode_grpc_message,
    encode_metadata,
)
from grpclib.protocol import EventsProcessor, H2Protocol, Peer
from grpclib.server import Handler, Server
from grpclib.stream import StreamIterator
from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from h2.stream import StreamInputs
from hpack.hpack import encode_integer
from hyperframe.frame import HeadersFrame
from multidict import MultiDict

from app.grpc.codec import status_details_codec as default_status_details_codec
from app.grpc.codec import too_large
from app.grpc.fastpath.closed_streams import MAX_CLOSED_STREAMS, limit_closed_streams
from app.grpc.fastpath.codec import UpbProtoCodec
from app.grpc.limits import GrpcLimits
from app.grpc.statistics import CallCounters, CodecCounters

if TYPE_CHECKING:
    from asyncio import Transport
    from collections.abc import Collection

    from grpclib._typing import IServable
    from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
    from grpclib.protocol import Connection


class _BoundedFrameBuffer(FrameBuffer):
    """h2's frame buffer, with a header block (HEADERS and its CONTINUATIONs) bounded in bytes.

    hpack enforces SETTINGS_MAX_HEADER_LIST_SIZE only as it decodes, and h2 buffers up to 64
    CONTINUATION frames first: a megabyte of Huffman-coded header held the event loop ~100 ms.
    Past `max_block` encoded bytes the connection ends (a ProtocolError, as for too many
    CONTINUATIONs) before anything is decoded.
    """

    def __init__(self, *, max_block: int) -> None:
        super().__init__(server=True)
        self.max_block = max_block

    def _update_header_buffer(self, f: Any) -> Any:
        if f is not None and (self._headers_buffer or isinstance(f, HeadersFrame)):
            size = len(f.data) + sum(len(x.data) for x in self._headers_buffer)
            if size > self.max_block:
                raise h2.exceptions.ProtocolError("header block too large")
        return super()._update_header_buffer(f)


class _LazyRepr:
    """repr(obj), computed only if a log record is ever formatted."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __str__(self) -> str:
        return repr(self.obj)


def install_lazy_frame_repr() -> None:
    """Let h2 format a received frame for its trace log only when that log is on.

    h2 formats every received frame for a trace log that is off unless a logger is configured
    (H2Configuration.logger): a few % of a unary call's CPU. This one tweak is process-wide by
    its nature (it replaces the name `repr` in h2.connection's globals), and it is safe for every
    connection, clients included: `_receive_frame`'s `"Received frame: %s"` is the only use of
    `repr` in h2.connection, and `%s` of the lazy object is the same text, so a trace log that
    is on reads exactly as before. Idempotent; called once a fast-path server is created.
    """
    h2.connection.repr = _LazyRepr  # type: ignore[attr-defined]


# the records grpclib writes for the same outcomes, on its logger
log = logging.getLogger("grpclib.server")

_Headers = list[tuple[str, str]]
_ENDS_WITH_BIN = operator.methodcaller("endswith", "-bin")
_MESSAGE_PREFIX = 5  # compressed flag (1 byte) and length (4 bytes, big endian)

# --- an OK unary reply in one write: HEADERS, DATA, HEADERS(END_STREAM) ---------------------------
# The header blocks use only HPACK representations that leave the dynamic table alone (an indexed
# static entry, literals without indexing), so they are the same bytes on every connection and
# h2's encoder state stays what it was. h2's state machines still see every frame.
_FRAME_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_DATA, _HEADERS = 0x0, 0x1
_END_STREAM, _END_HEADERS = 0x1, 0x4
_STATUS_200 = b"\x88"  # static table entry 8, ":status: 200"
_CONTENT_TYPE_INDEX = 31  # static table name "content-type"


def _hpack_string(value: bytes) -> bytes:
    return bytes(encode_integer(len(value), 7)) + value  # no Huffman coding


def _hpack_literal(name: bytes | int, value: bytes) -> bytes:
    """A header field "literal without indexing" (RFC 7541 6.2.2), name by index or literal."""
    if isinstance(name, int):
        return bytes(encode_integer(name, 4)) + _hpack_string(value)
    return b"\x00" + _hpack_string(name) + _hpack_string(value)


def _ok_headers(content_type: str) -> bytes:
    """The header block of a reply: `:status: 200` and the content type."""
    return _STATUS_200 + _hpack_literal(_CONTENT_TYPE_INDEX, content_type.encode("ascii"))


_OK_TRAILERS = _hpack_literal(b"grpc-status", b"0")


def _frame_head(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEAD.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id)


class _Call:
    """One unary-unary request on a connection, from its HEADERS frame to its reply."""

    __slots__ = (
        "chunks",
        "deadline",
        "done",
        "fields",
        "headers",
        "method",
        "method_name",
        "needed",
        "received",
        "started",
        "stream_id",
        "task",
        "terminated",
        "timed_out",
        "timer",
        "too_large",
    )

    def __init__(
        self,
        stream_id: int,
        method_name: str,
        method: MethodHandler,
        headers: _Headers,
        fields: dict[str, str],
    ) -> None:
        self.stream_id = stream_id
        self.method_name = method_name
        self.method = method
        self.headers = headers
        self.fields = fields
        self.deadline: float | None = None  # time.monotonic() when grpc-timeout runs out
        self.chunks: list[bytes] = []
        self.received = 0
        self.needed = -1  # prefix plus message length, once the prefix is in
        self.started = False
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.terminated: str | None = None  # why the client reset the stream
        self.too_large = 0  # the announced message length, when it is over the limit

    def message_bytes(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = [data]
        return data


class UnaryStream(StreamIterator[Any]):
    """`grpclib.server.Stream` for one unary-unary call: the same methods, state and errors."""

    def __init__(self, processor: _FastProcessor, call: _Call) -> None:
        self._processor = processor
        self._call = call
        self._codec = processor.codec
        self._recv_type = call.method.request_type
        self._send_type = call.method.reply_type
        self._metadata: MultiDict[Any] | None = None
        self._received = False
        self.deadline: Deadline | None = None
        self.user_agent: str | None = None
        self._send_initial_metadata_done = False
        self._send_message_done = False
        # the framed reply, held back to go out with its headers and trailers in one write
        self._held: bytes | None = None
        self._send_trailing_metadata_done = False
        self._cancel_done = False

    # --- what grpclib.server.Stream offers a handler --------------------------------------------

    @property
    def metadata(self) -> MultiDict[Any]:
        """Invocation metadata from the request headers, as a multi-dict."""
        if self._metadata is None:
            self._metadata = decode_metadata(self._call.headers)
        return self._metadata

    @metadata.setter
    def metadata(self, value: MultiDict[Any]) -> None:
        self._metadata = value

    @property
    def peer(self) -> Peer:
        """The client's end of the connection, as grpclib's `Peer`."""
        return self._processor.connection.get_peer()

    async def recv_message(self) -> Any:
        """The request message; None once it has been received (or when none was sent)."""
        if self._received:
            return None
        self._received = True
        call = self._call
        if not call.received:
            return None
        data = call.message_bytes()
        if len(data) < _MESSAGE_PREFIX:
            raise AssertionError("Received less data than expected")
        if data[0]:
            raise NotImplementedError("Compression not implemented")
        if len(data) < call.needed:
            raise AssertionError("Received less data than expected")
        message = self._codec.decode(data[_MESSAGE_PREFIX : call.needed], self._recv_type)
        connection = self._processor.connection
        connection.messages_received += 1
        connection.last_message_received = time.monotonic()
        return message

    async def send_initial_metadata(self, *, metadata: Any = None) -> None:
        """Send the response headers now, with `metadata` added; ProtocolError the second time."""
        if self._send_initial_metadata_done:
            raise ProtocolError("Initial metadata was already sent")
        headers = self._response_headers()
        if metadata:
            headers.extend(encode_metadata(MultiDict(metadata)))
        await self._processor.send_headers(self._call, headers)
        self._send_initial_metadata_done = True

    def _response_headers(self) -> _Headers:
        return [(":status", "200"), ("content-type", self._processor.content_type)]

    async def send_message(self, message: Any) -> None:
        """Encode and frame the reply; ProtocolError the second time.

        Unless the initial metadata has been sent, the message is held back, to go out with the
        headers and trailers in one write.
        """
        if self._send_message_done:
            raise ProtocolError("Message was already sent")
        reply = self._codec.encode(message, self._send_type)
        data = b"\x00" + len(reply).to_bytes(4, "big") + reply
        if self._send_initial_metadata_done:
            await self._processor.send_data(self._call, data)
        else:
            # a unary client reads nothing before the trailers: hold the default headers and the
            # message back, so that an OK reply goes out as one write (send_trailing_metadata)
            self._held = data
            self._send_initial_metadata_done = True
        self._send_message_done = True
        connection = self._processor.connection
        connection.messages_sent += 1
        connection.last_message_sent = time.monotonic()

    async def send_trailing_metadata(
        self,
        *,
        status: Status = Status.OK,
        status_message: str | None = None,
        status_details: Any = None,
        metadata: Any = None,
    ) -> None:
        """Send `grpc-status` and the other trailers, ending the stream.

        A plain OK after a held-back message goes out in one write; with no headers sent yet it is a
        trailers-only reply. A status other than OK then resets the stream if the client has not
        finished it. ProtocolError when sent twice, or for OK without a message.
        """
        if self._send_trailing_metadata_done:
            raise ProtocolError("Trailing metadata was already sent")
        if not self._send_message_done and status is Status.OK:
            raise ProtocolError(
                "Unary response with OK status requires a single message to be sent"
            )
        if self._held is not None:
            held, self._held = self._held, None
            plain_ok = (
                status is Status.OK
                and status_message is None
                and status_details is None
                and not metadata
            )
            if plain_ok and self._processor.send_ok_reply(self._call, held):
                self._send_trailing_metadata_done = True
                return
            await self._processor.send_headers(self._call, self._response_headers())
            await self._processor.send_data(self._call, held)
        # after the response headers: trailers; else a trailers-only response
        headers = [] if self._send_initial_metadata_done else self._response_headers()
        headers.append(("grpc-status", str(status.value)))
        if status_message is not None:
            headers.append(("grpc-message", encode_grpc_message(status_message)))
        details_codec = self._processor.status_details_codec
        if status_details is not None and details_codec is not None:
            encoded = details_codec.encode(status, status_message, status_details)
            headers.append((_STATUS_DETAILS_KEY, encode_bin_value(encoded).decode("ascii")))
        if metadata:
            headers.extend(encode_metadata(MultiDict(metadata)))
        await self._processor.send_headers(self._call, headers, end_stream=True)
        self._send_trailing_metadata_done = True
        if status is not Status.OK:
            self._processor.reset_if_open(self._call)

    async def cancel(self) -> None:
        """Reset the stream with RST_STREAM(NO_ERROR); ProtocolError the second time."""
        if self._cancel_done:
            raise ProtocolError("Stream was already cancelled")
        await self._processor.reset(self._call)
        self._cancel_done = True

    # --- the end of the call: what grpclib.server.Stream.__aexit__ does -------------------------

    async def finish(self, exc: BaseException | None) -> None:
        """Send the trailers the handler's outcome calls for, unless they have been sent."""
        if (
            self._send_trailing_metadata_done
            or self._cancel_done
            or self._processor.connection.is_closing()
        ):
            return
        protocol_error = None
        status_message: str | None = None
        status_details: Any = None
        if isinstance(exc, GRPCError):
            status, status_message, status_details = exc.status, exc.message, exc.details
        elif exc is not None:
            status, status_message = Status.UNKNOWN, "Internal Server Error"
        elif not self._send_message_done:
            status, status_message = Status.UNKNOWN, "Internal Server Error"
            protocol_error = (
                f"Unary response with OK status requires a single message to be sent: "
                f"{self._call.method_name!r}"
            )
        else:
            status = Status.OK
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            await self.send_trailing_metadata(
                status=status, status_message=status_message, status_details=status_details
            )
        if protocol_error is not None:
            raise ProtocolError(protocol_error)


class _Framing:
    """Where a request stream is in its gRPC messages (5-byte prefix, then that many bytes)."""

    __slots__ = ("head", "left")

    def __init__(self) -> None:
        self.head = b""  # the part of the next prefix received so far
        self.left = 0  # bytes of the current message still to come

    def feed(self, data: bytes, limit: int) -> int | None:
        """Account for `data`; the announced length of a message over `limit`, else None."""
        i, n = 0, len(data)
        while i < n:
            if self.left:
                step = min(self.left, n - i)
                self.left -= step
                i += step
                continue
            need = _MESSAGE_PREFIX - len(self.head)
            self.head += data[i : i + need]
            i += need
            if len(self.head) == _MESSAGE_PREFIX:
                length = int.from_bytes(self.head[1:], "big")
                self.head = b""
                if length > limit:
                    return length
                self.left = length
        return None


class _FastProcessor(EventsProcessor):
    """grpclib's h2 event processor, with unary-unary calls taken off the events directly."""

    def __init__(self, handler: FastHandler, connection: Connection) -> None:
        super().__init__(handler, connection)
        self.fast_handler = handler
        self.codec: CodecBase = handler.codec
        self.status_details_codec: StatusDetailsCodecBase | None = handler.status_details_codec
        self.content_type = f"{GRPC_CONTENT_TYPE}+{self.codec.__content_subtype__}"
        self._accepted_content_types = {self.content_type}
        if self.codec.__content_subtype__ == "proto":
            self._accepted_content_types.add(GRPC_CONTENT_TYPE)
        self._h2: H2Connection = connection._connection
        self._transport: Transport = connection._transport
        self._loop = asyncio.get_running_loop()
        self._calls: dict[int, _Call] = {}
        # replies waiting for flow-control window: set on a WINDOW_UPDATE for them or for all
        self._window_waiters: dict[_Call, asyncio.Event] = {}
        self._flush_scheduled = False
        self._ok_headers = _ok_headers(self.content_type)
        self._counts = handler.calls
        self._max_message = handler.limits.max_receive_message_bytes
        # grpclib's streams: where each is in its request messages, to refuse one too large
        # before grpclib buffers it (its reads acknowledge the data, so nothing else bounds it)
        self._framing: dict[int, _Framing] = {}
        self._refused: set[int] = set()
        self.handshaken = False  # the client's SETTINGS came

    # --- h2 events ----------------------------------------------------------------------------

    def process_request_received(self, event: RequestReceived) -> None:
        if self._refuse_unknown_method(event):
            return
        call = self._unary_call(event)
        if call is None:
            self._counts.general += 1
            super().process_request_received(event)
            if event.stream_id is not None:
                self._framing[event.stream_id] = _Framing()
            return
        self._counts.fast += 1
        connection = self.connection
        connection.streams_started += 1
        connection.last_stream_created = time.monotonic()
        self._calls[call.stream_id] = call
        # HEADERS with END_STREAM (no message) comes with a StreamEnded event, which starts it

    def _refuse_unknown_method(self, event: RequestReceived) -> bool:
        """Answer UNIMPLEMENTED, naming the services served, for a well-formed call to a method
        this server lacks; False for anything else (grpclib's path answers it).

        grpclib answers it without a content-type, which grpclib and grpc-go clients report as
        `UNKNOWN: Missing content-type header`: a client pointed at the wrong tier learnt nothing.
        """
        headers: _Headers = event.headers  # type: ignore[assignment]
        stream_id = event.stream_id
        if stream_id is None or not headers:
            return False
        fields = dict(headers)
        path = fields.get(":path")
        if (
            path is None
            or path in self.fast_handler.mapping
            or fields.get(":method") != "POST"
            or fields.get("content-type") not in self._accepted_content_types
        ):
            return False
        services = sorted({name.split("/")[1] for name in self.fast_handler.mapping})
        ours = [s for s in services if not s.startswith("grpc.")]
        message = f"unknown method {path}: this server serves {', '.join(ours or services)}"
        self._refused.add(stream_id)
        headers_out = self._response_headers()
        headers_out.append(("grpc-status", str(Status.UNIMPLEMENTED.value)))
        headers_out.append(("grpc-message", encode_grpc_message(message[:512])))
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.send_headers(stream_id, headers_out, end_stream=True)
        h2_stream = self._h2.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed:
            # the request's DATA is not wanted (RST_STREAM(NO_ERROR), as after an early reply)
            self._h2.reset_stream(stream_id, error_code=ErrorCodes.NO_ERROR)
        self._schedule_flush()
        return True

    def _unary_call(self, event: RequestReceived) -> _Call | None:
        """A call for the fast path, or None for grpclib's (which answers odd requests)."""
        headers: _Headers = event.headers  # type: ignore[assignment]
        stream_id = event.stream_id
        if stream_id is None or not headers:
            return None
        fields = dict(headers)
        method_name = fields.get(":path")
        method = self.fast_handler.unary.get(method_name)  # type: ignore[arg-type]
        if (
            method is None
            or fields.get(":method") != "POST"
            or fields.get("content-type") not in self._accepted_content_types
            or fields.get("te") != "trailers"
            or self.fast_handler.dispatch_has_listeners()
        ):
            return None
        if any(map(_ENDS_WITH_BIN, fields)):
            try:  # grpclib decodes metadata up front and gives up on a bad value
                decode_metadata(headers)
            except Exception:
                return None
        call = _Call(stream_id, method_name, method, headers, fields)  # type: ignore[arg-type]
        if "grpc-timeout" in fields:
            try:
                if len(fields) == len(headers):  # the usual case: no header twice
                    timeout = decode_timeout(fields["grpc-timeout"])
                else:
                    timeout = min(decode_timeout(v) for k, v in headers if k == "grpc-timeout")
            except ValueError:
                return None  # grpclib answers UNKNOWN "Invalid grpc-timeout header"
            if timeout <= 0:
                return None  # grpclib answers an expired deadline its own way
            call.deadline = time.monotonic() + timeout
            call.timer = self._loop.call_later(timeout, self._deadline_expired, call)
        return call

    def process_data_received(self, event: DataReceived) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:
            self._general_data_received(event)
            return
        data: bytes = event.data
        size = len(data)
        connection = self.connection
        connection.data_received += size
        connection.last_data_received = time.monotonic()
        if event.flow_controlled_length:
            self._h2.acknowledge_received_data(event.flow_controlled_length, call.stream_id)
        if call.started or not size:
            return  # a unary call reads one message; grpclib leaves the rest unread too
        call.chunks.append(data)
        call.received += size
        if call.needed < 0 and call.received >= _MESSAGE_PREFIX:
            head = call.message_bytes()
            length = int.from_bytes(head[1:_MESSAGE_PREFIX], "big")
            if length > self._max_message:
                # answered now, from the prefix: the rest is acknowledged and dropped as it comes
                call.too_large = length
                call.chunks = []
                self._start(call)
                return
            call.needed = _MESSAGE_PREFIX + length
        if 0 <= call.needed <= call.received:
            self._start(call)

    def _general_data_received(self, event: DataReceived) -> None:
        """DATA for grpclib's streams: refuse a message over the limit before it is buffered."""
        stream_id = event.stream_id
        if stream_id in self._refused:  # refused already: keep the connection's window open
            if event.flow_controlled_length and stream_id is not None:
                self._h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
            return
        framing = self._framing.get(stream_id)
        if framing is not None:
            length = framing.feed(event.data, self._max_message)
            if length is not None and stream_id is not None:
                self._refuse_general(stream_id, length, event.flow_controlled_length)
                return
        super().process_data_received(event)

    def _refuse_general(self, stream_id: int, length: int, ack: int | None) -> None:
        """Answer RESOURCE_EXHAUSTED on grpclib's stream `stream_id` and end grpclib's handler.

        The status goes out as grpclib would send it (trailers-only, then RST_STREAM(NO_ERROR));
        grpclib then sees the stream reset, which cancels its handler quietly.
        """
        self._framing.pop(stream_id, None)
        self._refused.add(stream_id)
        self.fast_handler.codec_counters.decode_too_large += 1
        if ack:
            self._h2.acknowledge_received_data(ack, stream_id)
        h2_stream = self._h2.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed:
            error = too_large(length, self._max_message)
            headers_sent = getattr(h2_stream.state_machine, "headers_sent", False)
            headers: _Headers = [] if headers_sent else self._response_headers()
            headers.append(("grpc-status", str(error.status.value)))
            headers.append(("grpc-message", encode_grpc_message(error.message or "")))
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.send_headers(stream_id, headers, end_stream=True)
            h2_stream = self._h2.streams.get(stream_id)
            if h2_stream is not None and not h2_stream.closed:
                self._h2.reset_stream(stream_id, error_code=ErrorCodes.NO_ERROR)
            self._schedule_flush()
        super().process_stream_reset(
            StreamReset(stream_id=stream_id, error_code=ErrorCodes.NO_ERROR, remote_reset=False)
        )

    def _response_headers(self) -> _Headers:
        return [(":status", "200"), ("content-type", self.content_type)]

    def process_stream_ended(self, event: StreamEnded) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:
            if event.stream_id in self._refused:
                self._refused.discard(event.stream_id)
            else:
                super().process_stream_ended(event)
            self._framing.pop(event.stream_id, None)
            return
        self.connection.streams_succeeded += 1
        if not call.started:  # the client ended its side before a whole message came
            self._start(call)

    def process_stream_reset(self, event: StreamReset) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:
            self._framing.pop(event.stream_id, None)
            self._refused.discard(event.stream_id)
            super().process_stream_reset(event)
            return
        self.connection.streams_failed += 1
        if event.remote_reset:
            reason = f"Stream reset by remote party, error_code: {event.error_code}"
        else:
            reason = "Protocol error"
        call.terminated = reason
        if call.task is not None:
            call.task.cancel()
        else:
            log.info("Request was cancelled: %s", StreamTerminatedError(reason))
            self._release(call)

    def process_window_updated(self, event: WindowUpdated) -> None:
        super().process_window_updated(event)
        for call, window_updated in self._window_waiters.items():
            if event.stream_id in (0, call.stream_id):
                window_updated.set()

    def process_remote_settings_changed(self, event: RemoteSettingsChanged) -> None:
        self.handshaken = True
        super().process_remote_settings_changed(event)
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for window_updated in self._window_waiters.values():
                window_updated.set()

    def close(self, reason: str = "Connection closed") -> None:
        # grpclib's close cancels the handler's tasks, ours among them
        super().close(reason)
        for call in list(self._calls.values()):
            if call.task is None:
                self._release(call)

    # --- running a call -------------------------------------------------------------------------

    def _start(self, call: _Call) -> None:
        call.started = True
        call.task = self._loop.create_task(self._run(call))
        self.fast_handler.track(call, call.task)

    async def _run(self, call: _Call) -> None:
        stream = UnaryStream(self, call)
        try:
            try:
                await self._handle(call, stream)
            except Exception as exc:  # GRPCError included: its status goes to the trailers
                await stream.finish(exc)
            else:
                await stream.finish(None)
        except ProtocolError:
            log.exception("Application error")
        except Exception:
            log.exception("Server error")
        finally:
            self._release(call)
            self.fast_handler.untrack(call)
            if not self._calls:
                # the last reply in flight goes out now, ahead of what the handler started (a
                # job's task); with more calls going, replies share the write at the turn's end
                self._flush()

    async def _handle(self, call: _Call, stream: UnaryStream) -> None:
        """What grpclib's request_handler does around the method handler."""
        if call.deadline is not None:
            stream.deadline = Deadline(_timestamp=call.deadline)
        stream.user_agent = call.fields.get("user-agent")
        try:
            if call.timed_out:  # before the message was in
                raise asyncio.CancelledError  # noqa: TRY301
            if call.too_large:
                self.fast_handler.codec_counters.decode_too_large += 1
                raise too_large(call.too_large, self._max_message)  # noqa: TRY301
            await call.method.func(stream)
        except asyncio.CancelledError:
            if call.terminated is not None:
                err = StreamTerminatedError(call.terminated)
                log.info("Request was cancelled: %s", err)
                raise err from None
            if call.timed_out:
                log.info("Deadline exceeded")
                raise GRPCError(Status.DEADLINE_EXCEEDED) from None
            raise
        except GRPCError:
            if call.timed_out:
                log.exception("Failed to handle cancellation")
                raise GRPCError(Status.DEADLINE_EXCEEDED) from None
            raise
        except Exception:
            if call.timed_out:
                log.exception("Failed to handle cancellation")
                raise GRPCError(Status.DEADLINE_EXCEEDED) from None
            log.exception("Application error")
            raise
        finally:
            if call.timer is not None:  # the deadline covers the handler, not the trailers
                call.timer.cancel()
                call.timer = None
        if call.timed_out:
            log.error("Failed to handle cancellation")
            raise GRPCError(Status.DEADLINE_EXCEEDED)

    def _deadline_expired(self, call: _Call) -> None:
        call.timer = None
        if call.done:
            return
        call.timed_out = True
        if call.task is not None:
            call.task.cancel()
        else:  # still waiting for the message: answer now, as grpclib's cancelled read does
            self._start(call)

    def _release(self, call: _Call) -> None:
        if call.done:
            return
        call.done = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        self._calls.pop(call.stream_id, None)
        self.connection.stream_close_waiter.set()

    # --- sending ----------------------------------------------------------------------------------

    def _writable(self, call: _Call) -> None:
        if call.stream_id not in self._h2.streams:
            raise h2.exceptions.StreamClosedError(call.stream_id)

    async def send_headers(
        self, call: _Call, headers: _Headers, *, end_stream: bool = False
    ) -> None:
        connection = self.connection
        if not connection.write_ready.is_set():
            await connection.write_ready.wait()
        self._writable(call)
        self._h2.send_headers(call.stream_id, headers, end_stream=end_stream)
        connection.ping_count_in_sequence = 0  # Connection.headers_send_process
        self._schedule_flush()

    async def send_data(self, call: _Call, data: bytes) -> None:
        connection = self.connection
        h2c = self._h2
        view = memoryview(data)
        while True:
            if not connection.write_ready.is_set():
                await connection.write_ready.wait()
            window = h2c.local_flow_control_window(call.stream_id)
            if window <= 0:
                window_updated = self._window_waiters[call] = asyncio.Event()
                try:
                    await window_updated.wait()
                finally:
                    del self._window_waiters[call]
                continue
            size = min(window, h2c.max_outbound_frame_size, len(view))
            h2c.send_data(call.stream_id, view[:size].tobytes())
            view = view[size:]
            connection.data_sent += size
            connection.ping_count_in_sequence = 0  # Connection.data_send_process
            connection.last_data_sent = time.monotonic()
            self._schedule_flush()
            if not view:
                return

    def send_ok_reply(self, call: _Call, data: bytes) -> bool:
        """Headers, message and OK trailers in one go; False when they cannot go out now.

        What h2's send_headers, send_data and send_headers(end_stream=True) do, minus encoding
        the same headers each time: the state machines and flow-control windows are updated the
        same way, and a closed stream raises StreamClosedError the same way.
        """
        connection = self.connection
        h2c = self._h2
        self._writable(call)
        stream = h2c.streams[call.stream_id]
        size = len(data)
        if (
            not connection.write_ready.is_set()
            or size > h2c.local_flow_control_window(call.stream_id)
            or size > h2c.max_outbound_frame_size
        ):
            return False  # the general path waits for the transport or the window
        streams_sm, connection_sm = stream.state_machine, h2c.state_machine
        connection_sm.process_input(ConnectionInputs.SEND_HEADERS)
        streams_sm.process_input(StreamInputs.SEND_HEADERS)  # StreamClosedError when closed
        connection_sm.process_input(ConnectionInputs.SEND_DATA)
        streams_sm.process_input(StreamInputs.SEND_DATA)
        connection_sm.process_input(ConnectionInputs.SEND_HEADERS)
        streams_sm.process_input(StreamInputs.SEND_HEADERS)
        streams_sm.process_input(StreamInputs.SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        h2c.outbound_flow_control_window -= size
        sid, headers, trailers = call.stream_id, self._ok_headers, _OK_TRAILERS
        h2c._data_to_send += b"".join((
            _frame_head(len(headers), _HEADERS, _END_HEADERS, sid), headers,
            _frame_head(size, _DATA, 0, sid), data,
            _frame_head(len(trailers), _HEADERS, _END_HEADERS | _END_STREAM, sid), trailers,
        ))  # fmt: skip
        connection.ping_count_in_sequence = 0
        connection.data_sent += size
        connection.last_data_sent = time.monotonic()
        self._schedule_flush()
        return True

    def reset_if_open(self, call: _Call) -> None:
        """RST_STREAM(NO_ERROR) after an error status, when the stream is still open."""
        if self._transport.is_closing():
            return
        stream = self._h2.streams.get(call.stream_id)
        if stream is None or stream.closed:
            return
        if self._h2.state_machine.state is ConnectionState.CLOSED:
            return
        self._h2.reset_stream(call.stream_id, error_code=ErrorCodes.NO_ERROR)
        self._schedule_flush()

    async def reset(self, call: _Call) -> None:
        if not self.connection.write_ready.is_set():
            await self.connection.write_ready.wait()
        self._h2.reset_stream(call.stream_id, error_code=ErrorCodes.NO_ERROR)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Write what h2 has to send once this turn of the event loop is over."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.connection.is_closing():
            self.connection.flush()


class FastHandler(Handler):
    """grpclib's per-connection handler, which also keeps the fast path's tasks."""

    def __init__(
        self,
        *args: Any,
        calls: CallCounters,
        limits: GrpcLimits,
        unary: bool,
        codec_counters: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.calls = calls
        self.limits = limits
        self.codec_counters = codec_counters
        self.unary: dict[str, MethodHandler] = {
            name: method
            for name, method in self.mapping.items()
            if unary and method.cardinality is Cardinality.UNARY_UNARY
        }

    def dispatch_has_listeners(self) -> bool:
        """grpclib events (grpclib.events.listen) are served by grpclib's own path only."""
        return any(self.dispatch._listeners.values())

    def track(self, key: Any, task: asyncio.Task[None]) -> None:
        """Keep `task` like grpclib keeps a request's: Server.close cancels it, and waits."""
        self._tasks[key] = task

    def untrack(self, key: Any) -> None:
        """The task is ending: forget it now (grpclib sweeps its own every few calls)."""
        self._tasks.pop(key, None)


class _FastProtocol(H2Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(self.handler, FastHandler)
        limits = self.handler.limits
        h2c = self.connection._connection
        limit_closed_streams(h2c, MAX_CLOSED_STREAMS)  # the server side: many calls
        # in force once the client acknowledges them; hpack's limit holds from now on
        h2c.update_settings({
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        })  # fmt: skip
        h2c.decoder.max_header_list_size = limits.max_header_list_bytes
        # Huffman coding shrinks printable text; twice the list size is ample for a client's block
        h2c.incoming_buffer = _BoundedFrameBuffer(max_block=2 * limits.max_header_list_bytes + 1024)
        self.connection.flush()
        self.processor = _FastProcessor(self.handler, self.connection)
        self._handshake_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            limits.handshake_timeout_seconds, self._handshake_expired
        )

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        processor = self.processor
        if isinstance(processor, _FastProcessor) and not processor.handshaken:
            assert isinstance(self.handler, FastHandler)
            self.handler.calls.handshake_timeouts += 1
            peer = self.connection._transport.get_extra_info("peername")
            log.debug("closing a connection from %s: no HTTP/2 handshake in time", peer)
            self.connection._transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        super().connection_lost(exc)


class FastServer(Server):
    """`grpclib.server.Server` with the unary-unary fast path on every connection.

    Its default codec is `UpbProtoCodec` (grpclib's ProtoCodec, faster for betterproto2). Build
    it through `install.install_fast_server`, which checks first that the grpclib and h2
    internals it relies on are there; it counts the calls each path serves in `calls`.
    """

    def __init__(
        self,
        handlers: Collection[IServable],
        *,
        calls: CallCounters | None = None,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        config: Configuration | None = None,
        limits: GrpcLimits | None = None,
        unary: bool = True,
    ) -> None:
        if codec is None:  # what grpclib does for its default codec
            codec = UpbProtoCodec()
            if status_details_codec is None:
                status_details_codec = default_status_details_codec()
        super().__init__(
            handlers, codec=codec, status_details_codec=status_details_codec, config=config
        )
        self.calls = calls if calls is not None else CallCounters()
        self.limits = limits if limits is not None else GrpcLimits()
        self.unary = unary

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = FastHandler(
            self._mapping,
            self._codec,
            self._status_details_codec,
            self.__dispatch__,
            calls=self.calls,
            limits=self.limits,
            unary=self.unary,
            codec_counters=getattr(self._codec, "counters", None) or CodecCounters(),
        )
        self._handlers.add(handler)
        return _FastProtocol(handler, self._config, self._h2_config)


__all__ = [
    "MAX_CLOSED_STREAMS",
    "FastHandler",
    "FastServer",
    "UnaryStream",
    "install_lazy_frame_repr",
]
