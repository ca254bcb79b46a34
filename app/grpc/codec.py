"""grpclib's ProtoCodec with the request checked first: its size, its wire format, its lists.

grpclib lets a decode error escape the method handler: the client gets UNKNOWN "Internal Server
Error" and the log a traceback, for what is the client's mistake. Like grpc-go, grpc-java and
grpcio (gRPC's status code table: "error parsing request proto" is INTERNAL), the server answers
such a request with INTERNAL and a one-line reason, and logs nothing (the count shows it).

A request goes through protobuf's C parser (upb) before betterproto2 sees it, because
betterproto2's pure-Python parser takes quadratic time over unknown fields (4 MiB of them held
the event loop for 90 s): upb refuses what is not valid protobuf (invalid UTF-8 in a string
included), unknown fields are dropped (no service reads them), and betterproto2 parses the
canonical bytes. Before that, a message over `max_message_bytes` is RESOURCE_EXHAUSTED, and a
list or map with more than `MAX_ELEMENTS` entries is INVALID_ARGUMENT naming the field, before
any Python object is made for its entries.
"""

from __future__ import annotations

from typing import Any

import betterproto2
from google.protobuf import message_factory  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from app.grpc.statistics import CodecCounters
from app.grpc.status import StatusDetailsCodec

#: gRPC's default for the largest message a server receives.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Entries a repeated field or map of a request may hold (the services allow far fewer).
MAX_ELEMENTS = 1024


def _type_name(message_type: Any) -> str:
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else getattr(message_type, "__qualname__", "message")


def too_large(size: int, limit: int) -> GRPCError:
    """RESOURCE_EXHAUSTED for a request message of `size` bytes over `limit` (grpc's wording)."""
    return GRPCError(
        Status.RESOURCE_EXHAUSTED,
        f"received message larger than max ({size} vs. {limit} bytes)",
    )


def _repeated(field: Any) -> bool:
    # protobuf 6.31 added `is_repeated` and later releases drop `label`
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else bool(field.label == field.LABEL_REPEATED)


#: Top-level fields a request may carry besides MAX_ELEMENTS entries of its lists and maps.
_OTHER_FIELDS = 64


def check_field_count(data: bytes) -> None:
    """INVALID_ARGUMENT when `data` has more top-level fields than a request may hold.

    Counted before upb parses anything: a 4 MiB request of ~340k tiny map entries held the event
    loop for 60-160 ms in upb before `check_elements` could refuse it. The walk skips whole
    fields (a length-delimited one in one step), so it costs at most ~MAX_ELEMENTS steps; bytes
    that are not protobuf end the walk, and upb says what is wrong with them.
    """
    i, n, count, limit = 0, len(data), 0, MAX_ELEMENTS + _OTHER_FIELDS
    if n <= 2 * limit:
        return  # a field takes two bytes at least: nothing this short can hold that many
    while i < n:
        key, i = _varint_at(data, i)
        kind = key & 7
        if key < 0 or kind not in (0, 1, 2, 5):
            return
        if kind == 0:
            _, i = _varint_at(data, i)
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        else:
            size, i = _varint_at(data, i)
            if size < 0:
                return
            i += size
        if i < 0:
            return
        count += 1
        if count > limit:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"more than {limit} fields, more than a request may hold ({MAX_ELEMENTS}"
                f" entries in its lists and maps)",
            )


def _varint_at(data: bytes, i: int) -> tuple[int, int]:
    """The varint at `i` and the index after it; (-1, -1) when it is cut off or too long."""
    value = shift = 0
    n = len(data)
    while i < n and shift < 64:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    return -1, -1


def check_elements(upb: Any) -> None:
    """INVALID_ARGUMENT naming the first list or map of `upb` (a parsed message) past MAX_ELEMENTS.

    Reads lengths only, in upb's own containers: nothing is converted before this passes.
    """
    for field, value in upb.ListFields():
        if _repeated(field):
            if len(value) > MAX_ELEMENTS:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"{field.name}: {len(value)} entries, more than a request may hold"
                    f" ({MAX_ELEMENTS})",
                )
        elif field.message_type is not None:
            check_elements(value)


class CheckedProtoCodec(ProtoCodec):
    """ProtoCodec (`application/grpc+proto`): size and lists checked, decode errors INTERNAL."""

    def __init__(
        self,
        counters: CodecCounters | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.counters = counters if counters is not None else CodecCounters()
        self.max_message_bytes = max_message_bytes
        self._upb_classes: dict[type, Any] = {}

    def cannot_decode(self, message_type: Any) -> GRPCError:
        """Count a request that does not decode; the INTERNAL error to answer it with."""
        self.counters.decode_error += 1
        return GRPCError(
            Status.INTERNAL, f"cannot decode the request message as {_type_name(message_type)}"
        )

    def check_size(self, data: bytes) -> None:
        """RESOURCE_EXHAUSTED (counted) when `data` is over `max_message_bytes`."""
        if len(data) > self.max_message_bytes:
            self.counters.decode_too_large += 1
            raise too_large(len(data), self.max_message_bytes)

    def _upb_class(self, message_type: type) -> Any:
        try:
            return self._upb_classes[message_type]
        except KeyError:
            pass
        upb_cls = None
        if issubclass(message_type, betterproto2.Message):
            try:
                upb_cls = message_factory.GetMessageClass(message_type.DESCRIPTOR)  # type: ignore[attr-defined]
            except Exception:
                upb_cls = None
        self._upb_classes[message_type] = upb_cls
        return upb_cls

    def decode(self, data: bytes, message_type: Any) -> Any:
        """The message; RESOURCE_EXHAUSTED, INVALID_ARGUMENT or INTERNAL as the module says."""
        self.check_size(data)
        check_field_count(data)
        upb_cls = self._upb_class(message_type) if isinstance(message_type, type) else None
        if upb_cls is not None:
            try:
                upb = upb_cls.FromString(data)
            except Exception as exc:
                raise self.cannot_decode(message_type) from exc
            upb.DiscardUnknownFields()
            check_elements(upb)
            if upb.ByteSize() != len(data):
                data = upb.SerializeToString()
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            raise self.cannot_decode(message_type) from exc


def status_details_codec() -> StatusDetailsCodec:
    """The codec for `grpc-status-details-bin`: google.rpc.Status, RetryInfo included."""
    return StatusDetailsCodec()
