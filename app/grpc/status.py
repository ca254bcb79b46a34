"""What a status carries besides its code: a one-line reason, and a retry hint machines can read.

`retry_later(message, seconds)` is the RESOURCE_EXHAUSTED (or UNAVAILABLE) error of a server
that wants the client back later. The hint goes out twice: as the standard `google.rpc.RetryInfo`
detail of a `google.rpc.Status` in `grpc-status-details-bin` (what grpcio-status, grpc-go's
`status.FromError` and grpcurl read), and as a `retry-after-ms` trailer for clients without
googleapis' protos.

The Status message is written and read here with a few lines of protobuf wire format, so that a
process needs neither googleapis-common-protos nor generated code for three small messages.
`StatusDetailsCodec` is the grpclib codec for `grpc-status-details-bin` on every server and client
of ours; it also packs plain protobuf messages (as grpclib's own does) when googleapis is there.

`guard_services` wraps every method handler so that whatever status leaves it has a one-line
reason of bounded length, and the retry trailer; an echoed id of a megabyte no longer turns into
a megabyte header that hpack's Huffman coder takes quadratic time over.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import msgspec
from grpclib.const import Handler, Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

#: Connection-level failures of a call, at either end (no status: the peer or the connection is
#: gone, reset or broken), as grpclib and the socket raise them.
CALL_ERRORS: tuple[type[Exception], ...] = (
    OSError, ConnectionError, StreamTerminatedError, ProtocolError,
)  # fmt: skip

RETRY_INFO_TYPE_URL = "type.googleapis.com/google.rpc.RetryInfo"
#: The trailer that repeats the RetryInfo delay, in whole milliseconds.
RETRY_AFTER_TRAILER = "retry-after-ms"
#: Longest status message sent (characters); longer ones are cut with "…".
MAX_STATUS_MESSAGE = 512


class RetryInfo(msgspec.Struct, frozen=True):
    """google.rpc.RetryInfo: wait `retry_delay_seconds` before trying again."""

    retry_delay_seconds: float


def retry_later(status: Status, message: str, retry_after_seconds: float) -> GRPCError:
    """A status error whose details and trailers tell the client when to come back."""
    return GRPCError(status, message, [RetryInfo(retry_after_seconds)])


def retry_info(details: Any) -> RetryInfo | None:
    """The RetryInfo among a GRPCError's decoded `details`, if any."""
    if isinstance(details, Sequence):
        for detail in details:
            if isinstance(detail, RetryInfo):
                return detail
    return None


def one_line(message: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """`message` on one line and at most `limit` characters (a status message is not a dump)."""
    if len(message) > 4 * limit:  # never scan a megabyte for line breaks
        message = message[: 4 * limit]
    line = " ".join(message.split()) if not message.isprintable() else message
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- google.rpc.Status on the wire --------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64: ten bytes of two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _tag_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data if data else b""


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a message: varints as int, length-delimited as bytes."""
    i, n = 0, len(data)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("truncated varint")
            byte = data[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        number, kind = key >> 3, key & 7
        if kind == 0:
            yield number, varint()
        elif kind == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated field")
            yield number, data[i : i + size]
            i += size
        elif kind in (1, 5):
            i += 8 if kind == 1 else 4
        else:
            raise ValueError(f"wire type {kind}")


def _duration(seconds: float) -> bytes:
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    return _tag_varint(1, whole) + _tag_varint(2, nanos)


def encode_status(status: Status, message: str | None, details: Iterable[Any]) -> bytes:
    """google.rpc.Status{code, message, details} with RetryInfo (and protobuf messages) packed."""
    out = [_tag_varint(1, status.value), _tag_bytes(2, (message or "").encode())]
    for detail in details:
        if isinstance(detail, RetryInfo):
            value = _tag_bytes(1, _duration(detail.retry_delay_seconds))
            url = RETRY_INFO_TYPE_URL
        elif hasattr(detail, "SerializeToString") and hasattr(detail, "DESCRIPTOR"):
            value = detail.SerializeToString()
            url = f"type.googleapis.com/{detail.DESCRIPTOR.full_name}"
        else:
            continue  # nothing a client could read
        out.append(_tag_bytes(3, _tag_bytes(1, url.encode()) + _tag_bytes(2, value)))
    return b"".join(out)


def decode_retry_info(data: bytes) -> RetryInfo | None:
    """The RetryInfo packed in an encoded google.rpc.Status, if any (ValueError if malformed)."""
    for number, value in _fields(data):
        if number != 3 or not isinstance(value, bytes):
            continue
        any_fields = dict(_fields(value))
        if any_fields.get(1) != RETRY_INFO_TYPE_URL.encode():
            continue
        payload = any_fields.get(2, b"")
        duration = dict(_fields(payload)).get(1, b"") if isinstance(payload, bytes) else b""
        parts = dict(_fields(duration)) if isinstance(duration, bytes) else {}
        seconds, nanos = parts.get(1, 0), parts.get(2, 0)
        if isinstance(seconds, int) and isinstance(nanos, int):
            return RetryInfo(seconds + nanos / 1e9)
    return None


class StatusDetailsCodec(StatusDetailsCodecBase):
    """`grpc-status-details-bin` as google.rpc.Status: RetryInfo here, other messages if possible.

    Decoding gives the RetryInfo found (a list of zero or one): what our clients act on.
    """

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        """The Status bytes for `details` (a sequence of RetryInfo or protobuf messages)."""
        return encode_status(status, message, details or ())

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        """[RetryInfo] when the details carry one, else []; [] for bytes that do not parse."""
        try:
            found = decode_retry_info(data)
        except ValueError:
            return []
        return [found] if found is not None else []


def googleapis_available() -> bool:
    """Whether google.rpc's generated protos are importable (grpcio-status brings them)."""
    try:
        importlib.import_module("google.rpc.status_pb2")
    except ImportError:
        return False
    return True


# --- every handler's way out ----------------------------------------------------------------------

_Func = Callable[[Any], Awaitable[None]]


def _guarded(func: _Func) -> _Func:
    @functools.wraps(func)
    async def handler(stream: Any) -> None:
        try:
            await func(stream)
        except GRPCError as exc:
            message = one_line(exc.message) if exc.message is not None else None
            hint = retry_info(exc.details)
            if hint is None:
                if message == exc.message:
                    raise
                raise GRPCError(exc.status, message, exc.details) from None
            # the trailer needs the trailers sent here; the stream then ends the call quietly
            await stream.send_trailing_metadata(
                status=exc.status,
                status_message=message,
                status_details=exc.details,
                metadata={RETRY_AFTER_TRAILER: str(round(hint.retry_delay_seconds * 1000))},
            )

    return handler


class _Guarded:
    """A servable whose method handlers go through `_guarded`; reflection and health see through."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def __mapping__(self) -> dict[str, Handler]:
        return {
            name: Handler(_guarded(h.func), h.cardinality, h.request_type, h.reply_type)
            for name, h in self.service.__mapping__().items()
        }


def guard_services(services: Iterable[Any]) -> list[Any]:
    """`services` with every method handler's status made one bounded line, retry hints added."""
    return [_Guarded(service) for service in services]
