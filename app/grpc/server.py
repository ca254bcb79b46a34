"""The grpclib edge: one adapter task owns the server's start, close and wait_closed.

It binds the first free candidate port, serves the given services with server reflection
(v1 and v1alpha, for grpcurl) and `grpc.health.v1.Health`, and closes when its task is cancelled.

With `fast_path` (the default; `grpc.fast_path` in the config) it serves with the fast path
(`fastpath/`), if the start-up probe finds the grpclib and h2 internals it relies on; with
`fast_path=False` the same server sends every call grpclib's own way, with grpclib's ProtoCodec.
Either way connections are held to `limits` (GrpcLimits). When the probe finds an internal
missing, grpclib's own Server serves (h2's default connection limits; the message size checked
once read). Every method handler's status is one bounded line (`status.guard_services`). It
counts the calls each path served and the codec's fallbacks and errors (`statistics()`).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import anyio.abc
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.server import Server

from app.core.lifecycle import Lifecycle
from app.grpc.codec import CheckedProtoCodec, status_details_codec
from app.grpc.fastpath.install import install_fast_server
from app.grpc.limits import GrpcLimits
from app.grpc.statistics import (
    CallCounters,
    CodecCounters,
    FastPathMode,
    GrpcServerStatistics,
)
from app.grpc.status import guard_services
from app.pb.google_proto_descriptor_pool import default_google_proto_descriptor_pool

#: Connections the kernel queues before we accept them (capped by net.core.somaxconn). asyncio's
#: 100 dropped handshakes when a thousand clients connected at once (each then waits out a
#: SYN retransmit, a second or more); Go's and grpc-core's servers ask for the system's maximum.
LISTEN_BACKLOG = socket.SOMAXCONN

log = logging.getLogger(__name__)


def _descriptor_pool() -> Any:
    """Our generated descriptors plus health and reflection, so grpcurl can describe them all."""
    pool = default_google_proto_descriptor_pool
    for module in (health_pb2, reflection_pb2, reflection_v1alpha_pb2):
        try:
            pool.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class _Health(Health):
    """grpclib's health service, whose NOT_FOUND says which names it knows (it said nothing)."""

    async def Check(self, stream: Any) -> None:
        """`grpc.health.v1.Health/Check`; an unknown service is NOT_FOUND naming the known."""
        request = await stream.recv_message()
        if request is not None and request.service not in self._checks:
            known = ", ".join(name or '"" (the whole server)' for name in sorted(self._checks))
            raise GRPCError(
                Status.NOT_FOUND,
                f"no health status for service {request.service!r}; known: {known}",
            )
        await super().Check(_Replayed(stream, request))  # type: ignore[arg-type]


class _Replayed:
    """`stream` whose first message, already read, is read again."""

    def __init__(self, stream: Any, message: Any) -> None:
        self._stream = stream
        self._message = message

    async def recv_message(self) -> Any:
        message, self._message = self._message, None
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class GrpcServer:
    """Serves `services` until cancelled. `port` is known once `run` has reported started.

    Create it with the event loop running (grpclib's Server asks for it).
    """

    def __init__(
        self,
        services: Sequence[Any],
        *,
        host: str,
        fast_path: bool = True,
        close_grace_seconds: float = 2.0,
        limits: GrpcLimits | None = None,
    ) -> None:
        self._status = ServiceStatus()
        checks = {service: [self._status] for service in services}
        checks[OVERALL] = [self._status]
        health = _Health(checks)
        all_services = guard_services(
            ServerReflection.extend([*services, health], pool=_descriptor_pool())
        )
        self._calls = CallCounters()
        self._codec_counters = CodecCounters()
        self.limits = limits = limits if limits is not None else GrpcLimits()
        # with the fast path off, the same server holds connections to the limits, and every
        # call takes grpclib's own path and codec
        server = install_fast_server(
            all_services,
            calls=self._calls,
            codec_counters=self._codec_counters,
            limits=limits,
            unary=fast_path,
        )
        if server is not None:
            self._fast_path = FastPathMode.ON if fast_path else FastPathMode.OFF
        else:
            self._fast_path = FastPathMode.FALLEN_BACK if fast_path else FastPathMode.OFF
            server = Server(
                all_services,
                codec=CheckedProtoCodec(
                    self._codec_counters, max_message_bytes=limits.max_receive_message_bytes
                ),
                status_details_codec=status_details_codec(),
            )
            # grpclib's public events API; never on the fast server, which gives way to
            # grpclib's path for every call while a listener is attached
            listen(server, RecvRequest, self._count_general)
        self._server = server
        self._host = host
        self._close_grace = close_grace_seconds
        self._state = Lifecycle.CREATED
        self.port = 0

    def __repr__(self) -> str:
        s = self.statistics()
        errors = s.codec.decode_error
        return (
            f"<GrpcServer {self._host}:{s.port} {s.state.name} fast_path={s.fast_path.value}"
            f" calls fast={s.fast_calls} general={s.general_calls} decode_errors={errors}>"
        )

    @property
    def state(self) -> Lifecycle:
        """Where the server is in its life."""
        return self._state

    def statistics(self) -> GrpcServerStatistics:
        """A snapshot: state, port, fast path mode, calls by path, codec counts."""
        return GrpcServerStatistics(
            state=self._state,
            port=self.port,
            fast_path=self._fast_path,
            fast_calls=self._calls.fast,
            general_calls=self._calls.general,
            codec=self._codec_counters.snapshot(),
            handshake_timeouts=self._calls.handshake_timeouts,
        )

    async def _count_general(self, event: RecvRequest) -> None:
        self._calls.general += 1

    def set_serving(self, serving: bool) -> None:
        """What `grpc.health.v1.Health/Check` answers (SERVING or NOT_SERVING)."""
        self._status.set(serving)

    async def _start(self, ports: Iterable[int]) -> int:
        """Start on the first free port of `ports`; the port bound (0 asks for any free one)."""
        for port in ports:
            try:
                if port == 0:
                    # grpclib tells no port it bound; a socket of ours does (public `sock=`)
                    family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
                    sock = socket.create_server(
                        (self._host, 0), family=family, backlog=LISTEN_BACKLOG
                    )
                    await self._server.start(sock=sock)
                    return int(sock.getsockname()[1])
                await self._server.start(self._host, port, backlog=LISTEN_BACKLOG)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                log.debug("port %d is taken", port)
                continue
            return port
        raise OSError(errno.EADDRINUSE, "no free port among the candidates")

    async def run(
        self,
        ports: Iterable[int],
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind the first free port of `ports`, report it, serve until cancelled, then close."""
        try:
            port = await self._start(ports)
        except BaseException:
            self._state = Lifecycle.STOPPED
            raise
        self.port = port
        self._state = Lifecycle.RUNNING
        self.set_serving(True)
        log.info("->SVC::gRPC server started on port %d", self.port)
        try:
            task_status.started(self.port)
            await anyio.sleep_forever()
        finally:
            self._state = Lifecycle.DRAINING
            self.set_serving(False)
            # close() cancels in-flight RPCs; give their handlers a moment to send their status
            with anyio.move_on_after(self._close_grace, shield=True):
                self._server.close()
                await self._server.wait_closed()
            self._state = Lifecycle.STOPPED
            log.info("gRPC server on port %d closed", self.port)
