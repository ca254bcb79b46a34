"""Ours: the no-op job our worker runs (`--jobs peer_ours`), and the client the driver uses.

The client is the official grpcio asyncio client (grpc.aio, its C core) on one channel to the
orchestrator, with stubs generated at run time from proto/orchestrator.proto: Submit to enqueue,
Execute to run and wait. "Done" is the orchestrator's: its queue stream holds an entry until the
job's end is recorded, then acks and deletes it, so XLEN 0 means every job has ended.
"""

from __future__ import annotations

import itertools
import sys
from types import ModuleType
from typing import Any

from bench_stamps import stamp

from app import job

RPC_TIMEOUT = 60.0
STREAM_KEY = "wpm-jobs:stream"  # orchestrator.stream_key's default


@job(name="bench_noop")
async def bench_noop(tag: str) -> None:
    """The benchmark's no-op: records its start."""
    stamp(tag)


class Adapter:
    """Submit and Execute on the orchestrator over grpc.aio."""

    blocking = False

    def __init__(self, redis_url: str, target: str, stubs: str, poll: float) -> None:
        self._redis_url = redis_url
        self._target = target
        self._stubs = stubs
        self._pb2: ModuleType | None = None
        self._stubs_: list[Any] = []
        self._channels: list[Any] = []
        self._turn = itertools.count()
        self._redis: Any = None

    async def start(self) -> None:
        import grpc
        import redis.asyncio

        sys.path.insert(0, self._stubs)
        import orchestrator_pb2  # type: ignore[import-not-found]
        import orchestrator_pb2_grpc  # type: ignore[import-not-found]

        self._pb2 = orchestrator_pb2
        # one channel per orchestrator (--orchestrators N), the calls dealt out in turn
        self._channels = [grpc.aio.insecure_channel(t) for t in self._target.split(",")]
        self._stubs_ = [orchestrator_pb2_grpc.OrchestratorServiceStub(c) for c in self._channels]
        self._turn = itertools.count()
        self._redis = redis.asyncio.Redis.from_url(self._redis_url)

    def _next(self) -> Any:
        return self._stubs_[next(self._turn) % len(self._stubs_)]

    def _request(self, tag: str) -> Any:
        assert self._pb2 is not None
        return self._pb2.BatchExecutionRequest(
            job_id=tag, job_type="bench_noop", params={"tag": tag}
        )

    async def enqueue(self, tag: str) -> None:
        await self._call(self._next().Submit, tag)

    async def execute(self, tag: str) -> None:
        assert self._pb2 is not None
        reply = await self._call(self._next().Execute, tag)
        if reply.job.state != self._pb2.SUCCEEDED:
            state = self._pb2.JobState.Name(reply.job.state)
            raise RuntimeError(f"job {tag} ended {state}: {reply.job.error}")

    async def _call(self, method: Any, tag: str) -> Any:
        import grpc

        try:
            return await method(self._request(tag), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:  # one line, not grpcio's many
            raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None

    async def unfinished(self) -> tuple[int, str]:
        """Jobs not yet ended, and the one Redis command that asked."""
        return int(await self._redis.xlen(STREAM_KEY)), "xlen"

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        if self._redis is not None:
            await self._redis.aclose()
