"""The grpclib edge: one adapter task owns the server's start, close and wait_closed.

It binds the first free candidate port, serves the given services with server reflection
(v1 and v1alpha, for grpcurl) and `grpc.health.v1.Health`, and closes when its task is cancelled.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterable, Sequence
from typing import Any, cast

import anyio
import anyio.abc
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2

from app.grpc.fastpath.server import FastServer
from app.pb.google_proto_descriptor_pool import default_google_proto_descriptor_pool

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


class GrpcServer:
    """Serves `services` until cancelled. `port` is known once `run` has reported started."""

    def __init__(
        self, services: Sequence[Any], *, host: str, close_grace_seconds: float = 2.0
    ) -> None:
        self._status = ServiceStatus()
        checks = {service: [self._status] for service in services}
        checks[OVERALL] = [self._status]
        health = Health(checks)
        all_services = ServerReflection.extend([*services, health], pool=_descriptor_pool())
        # grpclib's server; unary-unary calls take a leaner path with the same wire behaviour
        self._server = FastServer(all_services)
        self._host = host
        self._close_grace = close_grace_seconds
        self.port = 0

    def __repr__(self) -> str:
        return f"<GrpcServer {self._host}:{self.port} serving={self._status.__status__()}>"

    def set_serving(self, serving: bool) -> None:
        """What `grpc.health.v1.Health/Check` answers (SERVING or NOT_SERVING)."""
        self._status.set(serving)

    async def run(
        self,
        ports: Iterable[int],
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind the first free port of `ports`, report it, serve until cancelled, then close."""
        for port in ports:
            try:
                await self._server.start(self._host, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                log.debug("port %d is taken", port)
                continue
            break
        else:
            raise OSError(errno.EADDRINUSE, "no free port among the candidates")
        # grpclib keeps the asyncio.Server private; its socket tells the port when 0 was asked
        listener = cast("asyncio.Server | None", self._server._server)
        sockets = listener.sockets if listener is not None else ()
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        self.set_serving(True)
        log.info("->SVC::gRPC server started on port %d", self.port)
        try:
            task_status.started(self.port)
            await anyio.sleep_forever()
        finally:
            self.set_serving(False)
            # close() cancels in-flight RPCs; give their handlers a moment to send their status
            with anyio.move_on_after(self._close_grace, shield=True):
                self._server.close()
                await self._server.wait_closed()
            log.info("gRPC server on port %d closed", self.port)
