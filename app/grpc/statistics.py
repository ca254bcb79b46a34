"""The gRPC server's vocabulary: the fast path's mode, live counters, snapshots.

The counters are plain mutable objects that the serving code bumps (one attribute increment per
call); `GrpcServer.statistics()` copies them into frozen Structs for status, logs and /metrics.
"""

from __future__ import annotations

import enum

import msgspec

from app.core.lifecycle import Lifecycle


class FastPathMode(enum.Enum):
    """Which server serves: the fast path, grpclib's own by choice, or grpclib's own by need."""

    ON = "on"
    OFF = "off"  # grpc.fast_path = false
    FALLEN_BACK = "fallen_back"  # asked for, but the start-up probe found an internal missing


class CallCounters:
    """Calls by the path that served them.

    `fast`: unary-unary calls the fast path took off the h2 events. `general`: calls served by
    grpclib's own machinery (every call with the fast path off; on the fast server, streaming
    methods and the requests it leaves to grpclib, odd ones included).
    """

    __slots__ = ("fast", "general", "handshake_timeouts")

    def __init__(self) -> None:
        self.fast = 0
        self.general = 0
        # connections closed for not completing the HTTP/2 handshake in time
        self.handshake_timeouts = 0


class CodecStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What the codec could not do its fast way, and what it refused, by kind.

    - `decode_fallback`: a request with unknown or non-canonically encoded fields, read by upb
      with the unknown fields dropped (fast path only);
    - `decode_error`: a request that is not valid protobuf, answered with INTERNAL;
    - `decode_too_large`: a request over grpc.max_receive_message_bytes, RESOURCE_EXHAUSTED;
    - `encode_fallback`: a reply carrying unknown fields, encoded by betterproto2;
    - `encode_upb_error`: a reply upb could not encode, handed to betterproto2.
    """

    decode_fallback: int = 0
    decode_error: int = 0
    decode_too_large: int = 0
    encode_fallback: int = 0
    encode_upb_error: int = 0


class CodecCounters:
    """The live counts behind CodecStatistics, bumped by the server's codec."""

    __slots__ = (
        "decode_error",
        "decode_fallback",
        "decode_too_large",
        "encode_fallback",
        "encode_upb_error",
    )

    def __init__(self) -> None:
        self.decode_fallback = 0
        self.decode_error = 0
        self.decode_too_large = 0
        self.encode_fallback = 0
        self.encode_upb_error = 0

    def snapshot(self) -> CodecStatistics:
        """The counts now, frozen."""
        return CodecStatistics(
            decode_fallback=self.decode_fallback,
            decode_error=self.decode_error,
            decode_too_large=self.decode_too_large,
            encode_fallback=self.encode_fallback,
            encode_upb_error=self.encode_upb_error,
        )


class GrpcServerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a GrpcServer for logs and metrics."""

    state: Lifecycle
    port: int
    fast_path: FastPathMode
    fast_calls: int
    general_calls: int
    codec: CodecStatistics
    handshake_timeouts: int = 0
