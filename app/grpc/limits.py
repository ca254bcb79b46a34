"""The limits a gRPC server holds every client to, on either server path."""

from __future__ import annotations

import msgspec

from app.grpc.codec import DEFAULT_MAX_MESSAGE_BYTES


class GrpcLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one request or connection may ask of a server (the `[grpc]` keys of the same names).

    - `max_receive_message_bytes`: a larger request message is RESOURCE_EXHAUSTED, answered as
      soon as its length prefix is in (on the fast path; grpclib's reads it first);
    - `max_header_list_bytes`: HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE, enforced by hpack as it
      decodes (a larger header block closes the connection);
    - `max_concurrent_streams`: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection;
    - `handshake_timeout_seconds`: a connection without the HTTP/2 preface and SETTINGS by then is
      closed (half a handshake no longer holds a connection open for good).
    """

    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_header_list_bytes: int = 16 * 1024
    max_concurrent_streams: int = 100
    handshake_timeout_seconds: float = 5.0


def limits_from(section: object) -> GrpcLimits:
    """The limits from a config section with the same names (the `[grpc]` one)."""
    return GrpcLimits(**{name: getattr(section, name) for name in GrpcLimits.__struct_fields__})
