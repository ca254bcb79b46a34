"""The explicit install step: probe grpclib's and h2's internals, then build the fast server.

Nothing of the fast path is applied on import. `install_fast_server` runs the start-up probe
(probe.py); when everything is there it applies the one process-wide h2 tweak and returns a
FastServer with the upb codec. When something is missing (a newer grpclib or h2, a changed
betterproto2) it logs one warning naming it and returns None: the caller serves with grpclib's
own Server, and the process keeps working.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from app.grpc.codec import CheckedProtoCodec, status_details_codec
from app.grpc.fastpath.probe import missing_internals, versions
from app.grpc.limits import GrpcLimits
from app.grpc.statistics import CallCounters, CodecCounters

if TYPE_CHECKING:
    from grpclib._typing import IServable
    from grpclib.server import Server

log = logging.getLogger("app.grpc")


def install_fast_server(
    handlers: Collection[IServable],
    *,
    calls: CallCounters,
    codec_counters: CodecCounters,
    limits: GrpcLimits,
    unary: bool = True,
) -> Server | None:
    """A FastServer for `handlers`, or None (after one warning) when its internals are missing.

    With `unary=False` every call takes grpclib's own path and codec, and the server only holds
    connections to `limits` (h2 settings, the handshake timeout, the message size before
    grpclib buffers it). `calls` and `codec_counters` receive the server's counts. Call it with
    the event loop running, as for grpclib's own Server.
    """
    missing = missing_internals()
    if not missing:
        try:  # imported only now: its imports name internals, which the probe has just checked
            from app.grpc.fastpath.codec import UpbProtoCodec
            from app.grpc.fastpath.server import FastServer, install_lazy_frame_repr
        except Exception as exc:
            missing = [f"app.grpc.fastpath ({type(exc).__name__}: {exc})"]
    if missing:
        log.warning(
            "gRPC fast path off: grpclib/h2 internals it relies on are missing or changed (%s): "
            "%s; serving with grpclib's own server (the connection limits are h2's defaults, "
            "the message size limit holds once a message is read)",
            versions(),
            ", ".join(missing),
        )
        return None
    install_lazy_frame_repr()
    size = limits.max_receive_message_bytes
    codec = (
        UpbProtoCodec(codec_counters, max_message_bytes=size)
        if unary
        else CheckedProtoCodec(codec_counters, max_message_bytes=size)
    )
    return FastServer(
        handlers,
        calls=calls,
        codec=codec,
        status_details_codec=status_details_codec(),
        limits=limits,
        unary=unary,
    )
