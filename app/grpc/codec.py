"""grpclib's ProtoCodec, with a request that does not decode answered INTERNAL and counted.

grpclib lets a decode error escape the method handler: the client gets UNKNOWN "Internal Server
Error" and the log a traceback, for what is the client's mistake. Like grpc-go, grpc-java and
grpcio, the server answers such a request with INTERNAL and a one-line reason, and logs nothing
(the count shows it). Everything else is grpclib's ProtoCodec, through its public codec API
only, so this is the codec with the fast path off too.
"""

from __future__ import annotations

import importlib
from typing import Any

from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec
from grpclib.exceptions import GRPCError

from app.grpc.statistics import CodecCounters


def _type_name(message_type: Any) -> str:
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else getattr(message_type, "__qualname__", "message")


class CheckedProtoCodec(ProtoCodec):
    """ProtoCodec (`application/grpc+proto`) whose decode errors become INTERNAL, counted."""

    def __init__(self, counters: CodecCounters | None = None) -> None:
        self.counters = counters if counters is not None else CodecCounters()

    def decode(self, data: bytes, message_type: Any) -> Any:
        """The message, or GRPCError(INTERNAL) when `data` does not decode as `message_type`."""
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            self.counters.decode_error += 1
            raise GRPCError(
                Status.INTERNAL, f"cannot decode the request message as {_type_name(message_type)}"
            ) from exc


def status_details_codec() -> ProtoStatusDetailsCodec | None:
    """grpclib's default for `grpc-status-details-bin`: only when googleapis' protos are there."""
    try:
        importlib.import_module("google.rpc.status_pb2")
    except ImportError:
        return None
    return ProtoStatusDetailsCodec()
