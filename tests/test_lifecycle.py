"""Every long-lived component of the kernel and the roles reports its lifecycle, its statistics
and a repr with its counters, the same way (asyncio and trio: these need anyio only)."""

from __future__ import annotations

import anyio
import pytest

from app.config import OrchestratorConfig
from app.core.balancer import RoundRobin
from app.core.lifecycle import Lifecycle
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.memory_worker_client import MemoryWorkerClient
from app.scheduling.schedule_manager import ScheduleManager
from app.stores.memory import MemoryJobEvents, MemoryJobStore, MemoryPodRegistry
from app.worker.builtin_jobs import builtin_specs
from app.worker.job_master import JobMaster
from app.worker.job_registry import JobRegistry
from tests.helpers import eventually

pytestmark = pytest.mark.anyio


async def test_the_job_master_goes_created_running_draining_stopped() -> None:
    registry = JobRegistry()
    registry.update(builtin_specs())
    master = JobMaster(registry, core_size=1, max_size=1)
    assert master.statistics().state is Lifecycle.CREATED
    async with anyio.create_task_group() as tg:
        await tg.start(master.run)
        assert master.statistics().state is Lifecycle.RUNNING
        master.submit_nowait("echo", job_id="a")
        await eventually(lambda: master.statistics().jobs.succeeded == 1)
        master.submit_nowait("sleep", job_id="b", params={"seconds": "0.05"})
        master.begin_drain(5)
        assert master.statistics().state is Lifecycle.DRAINING
        assert "DRAINING active=1/1" in repr(master)
        await master.wait_stopped()
    s = master.statistics()
    assert (s.state, s.jobs.succeeded, s.jobs.accepted) == (Lifecycle.STOPPED, 2, 2)
    assert "succeeded=2" in repr(master)


async def test_the_scheduler_reports_its_lifecycle() -> None:
    manager = ScheduleManager()
    assert manager.statistics().state is Lifecycle.CREATED
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        assert manager.statistics().state is Lifecycle.RUNNING
        manager.begin_drain(1)
        assert manager.statistics().state is Lifecycle.DRAINING
        await manager.wait_stopped()
    assert manager.statistics().state is Lifecycle.STOPPED
    assert repr(manager).endswith("STOPPED>")


async def test_the_directory_and_the_dispatcher_report_theirs() -> None:
    store = MemoryJobStore()
    directory = WorkerDirectory(MemoryPodRegistry(), refresh_seconds=0.01)
    dispatcher = Dispatcher(
        store, MemoryJobEvents(store), directory, MemoryWorkerClient(), RoundRobin(),
        OrchestratorConfig(), consumer="o1",
    )  # fmt: skip
    assert (directory.statistics().state, dispatcher.statistics().state) == (
        Lifecycle.CREATED, Lifecycle.CREATED,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        await tg.start(directory.run)
        await tg.start(dispatcher.run)
        assert dispatcher.statistics().state is Lifecycle.RUNNING
        await eventually(lambda: directory.statistics().refreshes >= 2)
        assert directory.statistics().state is Lifecycle.RUNNING
        assert "refreshes=" in repr(directory)
        dispatcher.begin_drain()
        assert "DRAINING inflight=0" in repr(dispatcher)
        await eventually(lambda: dispatcher.statistics().state is Lifecycle.STOPPED)
        tg.cancel_scope.cancel()
    assert directory.statistics().state is Lifecycle.STOPPED
