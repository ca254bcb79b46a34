"""ApplicationInfoReportJob: the PodInfo it writes, and how it rides out a registry outage."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from app.core.clock import ManualClock
from app.fleet.pod_info import PodStatus, decode_pod_info
from app.stores.memory import MemoryPodRegistry
from app.worker.builtin_jobs import builtin_specs
from app.worker.job_master import JobMaster
from app.worker.job_registry import JobRegistry
from app.worker.reporter import ApplicationInfoReportJob, PodIdentity

pytestmark = pytest.mark.anyio

IDENTITY = PodIdentity(ip="10.0.0.7", pid=4242, host="h", grpc_port=9091, start_datetime="t0")


class FlakyRegistry(MemoryPodRegistry):
    """A memory registry that can be switched off, like a Redis that went away."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.attempts = 0

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("Connection refused")
        await super().put(key, value, ttl_seconds)


@pytest.fixture
async def job_master() -> AsyncIterator[JobMaster]:
    registry = JobRegistry()
    registry.update(builtin_specs())
    async with anyio.create_task_group() as tg:
        master = JobMaster(registry, core_size=1, max_size=2, watermark=40)
        await tg.start(master.run)
        yield master
        tg.cancel_scope.cancel()


async def test_pod_info_has_the_seed_keys_and_the_live_load(job_master: JobMaster) -> None:
    store = MemoryPodRegistry()
    job = ApplicationInfoReportJob(
        store, job_master, IDENTITY, key_prefix="wpm-apps", ttl_seconds=60
    )
    assert job.key == "wpm-apps:10.0.0.7:4242"
    assert await job.report()
    raw = await store.get(job.key)
    assert raw is not None
    assert list(decode_pod_info(raw).__struct_fields__)[:3] == [
        "grpc_port",
        "status",
        "update_datetime",
    ]
    assert raw.startswith(b'{"grpcPort":9091,"status":"IDLE","updateDatetime":"')
    job_master.submit_nowait("sleep", job_id="a", params={"seconds": "30"})
    job_master.submit_nowait("sleep", job_id="b", params={"seconds": "30"})  # queued
    await job.report()
    info = decode_pod_info(await store.get(job.key) or b"")
    assert (info.status, info.active, info.queued, info.max_size) == (PodStatus.BUSY, 1, 1, 2)
    await job.unregister()
    assert await store.get(job.key) is None


async def test_outage_is_logged_once_backs_off_and_reregisters(
    job_master: JobMaster, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyRegistry()
    clock = ManualClock()
    job = ApplicationInfoReportJob(
        store, job_master, IDENTITY, interval_seconds=5, retry_max_seconds=20, clock=clock
    )
    caplog.set_level(logging.INFO, logger="app")
    assert await job.report()
    store.down = True
    await store.delete(job.key)  # as if the key had expired meanwhile
    tried_at: list[float] = []
    for _ in range(60):  # a minute of 1-second ticks
        if not await job.report() and store.attempts > len(tried_at) + 1:
            tried_at.append(clock.monotonic())
        clock.advance(1)
    assert not job.connected
    # backoff: from the 5 s interval, doubling up to 20 s; no attempt in between
    assert tried_at == [0, 5, 15, 35, 55]
    assert job.failures == 5
    warnings = [r for r in caplog.records if "registry unreachable" in r.getMessage()]
    assert len(warnings) == 1
    store.down = False
    assert not await job.report()  # still backing off: the next attempt is due at 75 s
    clock.advance(15)
    assert await job.report()
    assert job.connected
    assert await store.get(job.key) is not None
    assert any("re-registered" in r.getMessage() for r in caplog.records)
