"""The worker directory: the freshest report per address counts; junk is skipped, said once."""

from __future__ import annotations

import logging

import pytest

from app.core.clock import ManualClock
from app.fleet.pod_info import PodInfo, PodStatus, encode_pod_info
from app.orchestrator.directory import WorkerDirectory
from app.stores.memory import MemoryPodRegistry

pytestmark = pytest.mark.anyio


def report(port: int, at_ms: int, ip: str = "127.0.0.1") -> bytes:
    return encode_pod_info(
        PodInfo(grpc_port=port, status=PodStatus.IDLE, update_datetime="", update_epoch_ms=at_ms,
                ip=ip)
    )  # fmt: skip


async def test_a_restarted_worker_s_old_key_does_not_hide_its_new_one() -> None:
    clock = ManualClock()
    now_ms = int(clock.timestamp() * 1000)
    registry = MemoryPodRegistry()
    # the old pid's key sorts after the new one's and lingers until its TTL
    await registry.put("wpm-apps:127.0.0.1:999", report(9091, now_ms - 30_000), 60)
    await registry.put("wpm-apps:127.0.0.1:1000", report(9091, now_ms - 200), 60)
    directory = WorkerDirectory(registry, clock=clock)
    await directory.refresh()
    (entry,) = directory.entries()
    assert entry.key == "wpm-apps:127.0.0.1:1000"
    assert directory.stale_reason(entry) is None


async def test_reports_no_worker_could_have_made_are_skipped_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    now_ms = int(clock.timestamp() * 1000)
    registry = MemoryPodRegistry()
    await registry.put("wpm-apps:a:1", report(99_999_999, now_ms), 60)
    await registry.put("wpm-apps:a:2", report(-5, now_ms), 60)
    await registry.put("wpm-apps:a:3", report(0, now_ms), 60)
    await registry.put("wpm-apps:a:4", report(9091, now_ms, ip=""), 60)
    await registry.put("wpm-apps:a:5", b"\xff not json", 60)
    await registry.put("wpm-apps:a:6", report(9092, now_ms), 60)
    directory = WorkerDirectory(registry, clock=clock)
    caplog.set_level(logging.WARNING, logger="app.orchestrator.directory")
    for _ in range(3):
        await directory.refresh()
    assert [e.address for e in directory.entries()] == ["127.0.0.1:9092"]
    assert directory.statistics().skipped == 5
    assert len([r for r in caplog.records if "ignoring wpm-apps:a:" in r.getMessage()]) == 5
    await registry.delete("wpm-apps:a:5")
    await directory.refresh()
    assert directory.statistics().skipped == 4  # what is gone is forgotten
