"""The gRPC server's counters: live mutable counts that the serving code bumps, and snapshots.

A counter is one attribute increment on the hot path; `snapshot()` copies the counts into a frozen
Struct for status, logs and /metrics.
"""

from __future__ import annotations

import msgspec


class CodecStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What the codec could not do its fast way, by kind (all 0 with the fast path off but errors).

    - `decode_fallback`: a request with unknown or non-canonically encoded fields, decoded by
      betterproto2's own code (it keeps unknown fields);
    - `decode_upb_rejected`: a request upb refused and betterproto2 accepted (it is more lenient;
      the service gets what betterproto2 makes of it, as with the fast path off);
    - `decode_error`: a request nothing could decode, answered with INTERNAL;
    - `encode_fallback`: a reply carrying unknown fields, encoded by betterproto2;
    - `encode_upb_error`: a reply upb could not encode, handed to betterproto2.
    """

    decode_fallback: int = 0
    decode_upb_rejected: int = 0
    decode_error: int = 0
    encode_fallback: int = 0
    encode_upb_error: int = 0


class CodecCounters:
    """The live counts behind CodecStatistics, bumped by the server's codec."""

    __slots__ = (
        "decode_error",
        "decode_fallback",
        "decode_upb_rejected",
        "encode_fallback",
        "encode_upb_error",
    )

    def __init__(self) -> None:
        self.decode_fallback = 0
        self.decode_upb_rejected = 0
        self.decode_error = 0
        self.encode_fallback = 0
        self.encode_upb_error = 0

    def snapshot(self) -> CodecStatistics:
        """The counts now, frozen."""
        return CodecStatistics(
            decode_fallback=self.decode_fallback,
            decode_upb_rejected=self.decode_upb_rejected,
            decode_error=self.decode_error,
            encode_fallback=self.encode_fallback,
            encode_upb_error=self.encode_upb_error,
        )
