"""The composition root of `jobworker worker`: config in, one task group, signals, drain.

    root task group
    ├── embedded redis-server        only when no Redis is configured
    ├── JobMaster                    CapacityLimiter + bounded queue; a task per running job
    ├── GrpcServer (grpclib)         WorkerService, reflection, health
    ├── HttpServer (Hypercorn)       /metrics, /healthz, /readyz when `metrics.port` is set
    ├── RedisMonitor                 Redis up or down; re-registers at once if it lost its data
    └── ScheduleManager              ApplicationInfoReportJob every report interval

Shutdown (SIGTERM/SIGINT): PodInfo DRAINING and health NOT_SERVING at once, new work refused
with UNAVAILABLE, running and queued jobs get `drain_grace_seconds` to finish and are cancelled
after it (a second signal cancels them at once), the PodInfo key is deleted, and the process
exits 0.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio

from app.config import Config
from app.core.clock import SystemClock
from app.errors import ConfigError
from app.grpc.limits import limits_from
from app.grpc.ports import (
    LAST_PORT_FILE,
    candidate_ports,
    read_last_port,
    state_dir,
    write_last_port,
)
from app.grpc.server import GrpcServer
from app.scheduling.schedule_manager import ScheduleManager
from app.scheduling.triggers import IntervalTrigger
from app.stores.redis.client import create_redis
from app.stores.redis.embedded import EmbeddedRedis
from app.stores.redis.job_store import RedisJobStore
from app.stores.redis.monitor import RedisMonitor
from app.stores.redis.pod_registry import RedisPodRegistry
from app.stores.redis.pool import pool_statistics
from app.worker.builtin_jobs import builtin_specs
from app.worker.job_master import JobMaster
from app.worker.job_registry import JobRegistry, default_registry, load_job_modules
from app.worker.outcome_writer import OutcomeWriter
from app.worker.reporter import ApplicationInfoReportJob, make_identity
from app.worker.service import WorkerService
from app.worker.superseded_runs import SupersededRuns

log = logging.getLogger("app.worker")

REPORT_SCHEDULE = "ApplicationInfoReportJob"
# how long shutdown waits on Redis for the DRAINING report and the key's deletion
REGISTRY_SHUTDOWN_SECONDS = 3.0


def build_job_registry(config: Config, extra_modules: list[str]) -> JobRegistry:
    """Built-ins (unless turned off), then every @job of the configured modules."""
    registry = JobRegistry()
    if config.worker.builtin_jobs:
        registry.update(builtin_specs())
    load_job_modules(config.worker.job_modules)
    load_job_modules(extra_modules, key="--jobs")
    registry.update(default_registry.specs())
    if not registry.names():
        raise ConfigError(
            "worker.builtin_jobs", "no jobs: built-ins are off and no module adds any"
        )
    return registry


def port_candidates(config: Config, env: dict[str, str]) -> list[int]:
    """`grpc.port` when set, else the last port used, else `grpc.default_port`; then neighbours."""
    first = config.grpc.port
    if first is None:
        last = (
            read_last_port(state_dir(env) / LAST_PORT_FILE) if config.grpc.remember_port else None
        )
        first = last or config.grpc.default_port
    return list(candidate_ports(first, config.grpc.port_search if first else 0))


async def serve_worker(config: Config, registry: JobRegistry, env: dict[str, str]) -> None:
    """Run the worker until a signal drains it."""
    w = config.worker
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            redis_url: str | None = None  # configured: the config's endpoint (or its sentinels)
            if config.redis.configured:
                pass
            elif config.redis.embedded:
                redis_url = await tg.start(EmbeddedRedis().run)
            else:
                raise ConfigError("redis.url", "no Redis configured and redis.embedded is false")
            redis = create_redis(config.redis, redis_url)
            # health and PodInfo reports on connections of their own: a busy pool must not make
            # this worker look gone to the fleet
            liveness = create_redis(config.redis, redis_url, liveness=True)
            # the system's clock, steps included: the scheduler notices an NTP step or a resumed
            # VM, and PodInfo.updateDatetime is what other hosts compare with their own clocks
            clock = SystemClock()
            # each run an orchestrator asked for leaves its outcome in the job store, under the
            # attempt's fencing token: it outlives the orchestrator that asked
            job_store = RedisJobStore(
                redis,
                job_prefix=config.orchestrator.job_prefix,
                retention_seconds=config.orchestrator.retention_seconds,
            )
            outcomes = OutcomeWriter(job_store, clock=clock)
            await tg.start(outcomes.run)
            job_master = JobMaster(
                registry,
                core_size=w.core_size,
                max_size=w.max_size,
                queue_capacity=w.queue_capacity,
                watermark=w.watermark,
                keep_alive_seconds=w.keep_alive_seconds,
                default_timeout_seconds=w.default_timeout_seconds,
                history_size=w.history_size,
                history_max_bytes=w.history_max_bytes,
                max_result_bytes=w.max_result_bytes,
                on_finished=outcomes.finished,
            )
            await tg.start(job_master.run)
            schedules = ScheduleManager(clock)
            service = WorkerService(job_master, schedules)
            server = GrpcServer(
                [service],
                host=config.grpc.host,
                fast_path=config.grpc.fast_path,
                close_grace_seconds=config.grpc.close_grace_seconds,
                limits=limits_from(config.grpc),
            )
            port = await tg.start(server.run, port_candidates(config, env))
            if config.grpc.remember_port and config.grpc.port is None:
                # only a port the worker chose itself: a one-off `--port` must not become
                # every later plain start's port
                write_last_port(state_dir(env) / LAST_PORT_FILE, port)
            identity = make_identity(
                config.grpc.advertise_port or port,
                bound_host=config.grpc.host,
                advertise_ip=config.grpc.advertise_ip,
            )
            report = ApplicationInfoReportJob(
                RedisPodRegistry(liveness),
                job_master,
                identity,
                key_prefix=config.redis.key_prefix,
                ttl_seconds=config.redis.ttl_seconds,
                interval_seconds=config.schedule.report_interval_seconds,
                retry_max_seconds=config.redis.retry_max_seconds,
                clock=clock,
                # back from an absence: stop the runs the fleet started again elsewhere
                on_return=SupersededRuns(
                    job_store, job_master, address=f"{identity.ip}:{identity.grpc_port}"
                ),
                unrecorded_ids=outcomes.unwritten_ids,
            )
            service.identity = identity
            service.report_job = report

            async def re_register() -> None:
                await report.report(force=True)

            # the worker serves without Redis: the monitor only says so, and notices a data loss
            where = config.redis.display_url() if config.redis.configured else "embedded"
            monitor = RedisMonitor(
                liveness,
                what=f"Redis at {where}",
                consequence="still serving; PodInfo and run outcomes wait for it",
                on_data_lost=re_register,
                data_loss_action="re-registering PodInfo now",
                on_went_back=re_register,
                went_back_action="re-registering PodInfo now",
                interval=config.redis.check_interval_seconds,
            )  # fmt: skip
            await tg.start(monitor.run)
            if config.metrics.port is not None:
                # the HTTP edge (Starlette, Hypercorn, prometheus_client: ~120 modules, ~4 MiB)
                # is imported only by a role that serves it
                from app.http.edge import start_http_edge
                from app.worker.metrics import worker_metrics

                await start_http_edge(
                    tg,
                    host=config.metrics.host,
                    port=config.metrics.port,
                    collect=lambda: worker_metrics(
                        job_master, report, server, monitor, pool_statistics(redis)
                    ),
                    draining=lambda: job_master.draining,
                    grpc_port=lambda: server.port,
                )
            try:
                await report.report()
                interval = config.schedule.report_interval_seconds
                schedules.add_schedule(
                    report,
                    IntervalTrigger(interval, clock.now() + timedelta(seconds=interval)),
                    name=REPORT_SCHEDULE,
                )
                await tg.start(schedules.run)
                # what start-up made (modules, config, registry, descriptors: ~50k objects) lives
                # as long as the process: out of the collector's sight, a full collection scans
                # only what requests made, ~1 ms instead of ~20 ms of stalled calls
                gc.freeze()
                log.info(
                    "worker ready: pid %d, port %d, profile %s, jobs %s, %r, %r",
                    identity.pid, port, config.profile, ",".join(registry.names()), job_master,
                    server,
                )  # fmt: skip
                await _wait_and_drain(signals, job_master, server, report, w.drain_grace_seconds)
            finally:
                await outcomes.close(within=REGISTRY_SHUTDOWN_SECONDS)
                with anyio.move_on_after(REGISTRY_SHUTDOWN_SECONDS, shield=True):
                    # stop the reports first, so that none rewrites the key after its deletion
                    if any(i.name == REPORT_SCHEDULE for i in schedules.schedules()):
                        schedules.remove_schedule(REPORT_SCHEDULE)
                    await report.unregister()
                with anyio.move_on_after(1, shield=True):
                    await redis.aclose()
                    await liveness.aclose()
                tg.cancel_scope.cancel()
    log.info("worker stopped")


async def _wait_and_drain(
    signals: AsyncIterator[signal.Signals],
    job_master: JobMaster,
    server: GrpcServer,
    report: ApplicationInfoReportJob,
    grace: float,
) -> None:
    signum = await anext(signals)
    log.info("%s: draining, %r, grace %gs", signum.name, job_master, grace)
    job_master.begin_drain(grace)
    server.set_serving(False)
    with anyio.move_on_after(REGISTRY_SHUTDOWN_SECONDS):
        await report.report(force=True)

    async def second_signal() -> None:
        async for again in signals:
            log.warning("%s again: cancelling running jobs now", again.name)
            job_master.cancel_all()

    async with anyio.create_task_group() as drain:
        drain.start_soon(second_signal)
        await job_master.wait_stopped()
        drain.cancel_scope.cancel()
    log.info("drained: %r", job_master)
