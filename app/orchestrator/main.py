"""The composition root of `jobworker orchestrator` (the seed's server-cloud gateway).

    root task group
    ├── RedisMonitor       Redis up or down (health, UNAVAILABLE), and whether it lost its data
    ├── JobEvents          one pub/sub connection: wakes Execute, WatchJob and CancelJob
    ├── WorkerDirectory    the workers' PodInfo, refreshed every discovery interval
    │                      (these three on a small pool of their own, the rest on the main one)
    ├── Dispatcher         the job queue → workers, with retry, breaker and fencing
    ├── IndexTrimmer       drops the job index's entries of expired records, once a minute
    ├── HttpServer         /metrics, /healthz, /readyz (Hypercorn) when `metrics.port` is set
    ├── GrpcServer         OrchestratorService, reflection, health
    └── RoleReporter       this orchestrator's RoleInfo (`jobworker status`), every report interval

Shutdown (SIGTERM/SIGINT): health NOT_SERVING, RoleInfo DRAINING, submissions refused with
UNAVAILABLE, no new stream entries taken; jobs in hand get `drain_grace_seconds` to end, and
those still going after it stay pending in the stream, where another orchestrator claims them;
the RoleInfo record is removed.

While Redis is unreachable: health NOT_SERVING and /readyz 503, calls that need Redis answered
UNAVAILABLE with a retry-after, jobs in hand wait where they are; all back once it answers.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket

import anyio
import anyio.abc

from app import __version__
from app.config import Config
from app.core.balancer import make_balancer
from app.core.clock import SystemClock
from app.errors import ConfigError
from app.fleet.role_info import Role, RoleIdentity, RoleInfo
from app.grpc.limits import limits_from
from app.grpc.ports import advertised_ip, candidate_ports
from app.grpc.server import GrpcServer
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.grpc_worker_client import GrpcWorkerClient
from app.orchestrator.index_trimmer import IndexTrimmer
from app.orchestrator.service import OrchestratorService
from app.stores.abc import JobEvents, JobStore
from app.stores.bad_data import BadData
from app.stores.redis.batcher import CommandBatcher
from app.stores.redis.client import create_redis, wait_for_redis_unless_stopped
from app.stores.redis.job_events import RedisJobEvents
from app.stores.redis.job_store import RedisJobStore
from app.stores.redis.monitor import RedisMonitor
from app.stores.redis.pod_registry import RedisPodRegistry
from app.stores.redis.pool import pool_statistics
from app.stores.redis.role_registry import redis_role_reporter

log = logging.getLogger("app.orchestrator")

# how long shutdown waits on Redis for the DRAINING report and the record's removal
REGISTRY_SHUTDOWN_SECONDS = 3.0


async def serve_orchestrator(config: Config) -> None:
    """Run an orchestrator until a signal drains it."""
    o = config.orchestrator
    if not config.redis.configured:
        raise ConfigError(
            "redis.url", "the orchestrator needs the Redis its workers use; set REDIS_URL"
        )
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            redis = create_redis(config.redis)
            # health, the job events' subscription and the workers' reports on connections of
            # their own: a pool busy with the load must not read as Redis or a worker being away
            liveness = create_redis(config.redis, liveness=True)
            bad_data = BadData()  # junk met in the store: said once, counted in /metrics
            # the jobs' commands of a loop turn, sent to Redis in one pipeline (see run below)
            batcher = CommandBatcher(redis)
            store: JobStore = RedisJobStore(
                redis,
                job_prefix=o.job_prefix,
                stream_key=o.stream_key,
                group=o.group,
                retention_seconds=o.retention_seconds,
                bad_data=bad_data,
                lost_key=o.lost_key,
                index_key=o.index_key,
                batcher=batcher,
            )
            events: JobEvents = RedisJobEvents(liveness, job_prefix=o.job_prefix, bad_data=bad_data)
            directory = WorkerDirectory(
                RedisPodRegistry(liveness),
                prefix=config.redis.key_prefix,
                report_interval_seconds=o.worker_report_interval_seconds,
                refresh_seconds=o.discovery_interval_seconds,
            )
            client = GrpcWorkerClient(
                keepalive_seconds=o.keepalive_seconds,
                keepalive_timeout_seconds=o.keepalive_timeout_seconds,
            )
            consumer = o.consumer or f"{socket.gethostname()}:{os.getpid()}"
            dispatcher = Dispatcher(
                store, events, directory, client, make_balancer(o.balancer), o, consumer=consumer
            )
            service = OrchestratorService(store, events, directory, dispatcher, o)
            trimmer = IndexTrimmer(store, retention_seconds=o.retention_seconds)
            server = GrpcServer(
                [service],
                host=o.host,
                fast_path=config.grpc.fast_path,
                limits=limits_from(config.grpc),
            )

            def serving(redis_up: bool) -> None:
                server.set_serving(redis_up and not service.draining)

            monitor = RedisMonitor(
                liveness,
                what=f"Redis at {config.redis.display_url()}",
                consequence="health NOT_SERVING, calls that need it answered UNAVAILABLE,"
                " jobs in hand wait where they are",
                on_change=serving,
                on_data_lost=dispatcher.data_lost,
                data_loss_action="recreating the job queue's consumer group; jobs in hand whose"
                " records are gone end as lost (`jobworker lost` lists them)",
                on_went_back=dispatcher.went_back_in_time,
                went_back_action="for a while, a job to run with no attempt on record first"
                " asks the workers whether one of them has it",
                interval=config.redis.check_interval_seconds,
            )  # fmt: skip

            def store_down() -> tuple[str, int] | None:
                reason = monitor.down_reason()
                return None if reason is None else (reason, monitor.retry_after())

            service.store_down = store_down
            clock = SystemClock()
            interval = config.schedule.report_interval_seconds
            identity = RoleIdentity(
                role=Role.ORCHESTRATOR,
                ip=advertised_ip(o.host, config.grpc.advertise_ip),
                version=__version__,
                report_interval_seconds=interval,
                start_datetime=clock.now().isoformat(timespec="milliseconds"),
            )

            def role_info() -> RoleInfo:
                stats = dispatcher.statistics()
                return identity.report(
                    clock.now(), grpc_port=server.port, draining=service.draining,
                    inflight=stats.inflight, max_inflight=o.max_inflight,
                    waiting=stats.waiting_for_worker,
                )  # fmt: skip

            reporter = redis_role_reporter(liveness, config, role_info, clock)
            try:
                # nothing works without the shared Redis: wait for it (a signal still stops us)
                await wait_for_redis_unless_stopped(
                    redis, signals, tg.cancel_scope, what=f"Redis at {config.redis.display_url()}"
                )
                await tg.start(batcher.run)
                await tg.start(client.run)  # the work streams, one per worker
                await tg.start(monitor.run)
                await tg.start(events.run)
                await tg.start(directory.run)
                dispatcher_scope = anyio.CancelScope()
                dispatcher_done = anyio.Event()

                async def run_dispatcher(
                    *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                ) -> None:
                    with dispatcher_scope:
                        await dispatcher.run(task_status=task_status)  # returns once drained
                    dispatcher_done.set()

                await tg.start(run_dispatcher)
                await tg.start(trimmer.run)
                if config.metrics.port is not None:
                    # the HTTP edge (Starlette, Hypercorn, prometheus_client: ~120 modules, ~4 MiB)
                    # is imported only by a role that serves it
                    from app.http.edge import start_http_edge
                    from app.orchestrator.metrics import orchestrator_metrics

                    await start_http_edge(
                        tg,
                        host=config.metrics.host,
                        port=config.metrics.port,
                        collect=lambda: orchestrator_metrics(
                            dispatcher,
                            directory,
                            server,
                            bad_data,
                            monitor,
                            trimmer,
                            pool_statistics(redis),
                        ),
                        draining=lambda: service.draining,
                        grpc_port=lambda: server.port,
                        unready=monitor.down_reason,
                    )
                port = await tg.start(
                    server.run, candidate_ports(o.port, o.port_search if o.port else 0)
                )
                serving(monitor.up)  # the server starts SERVING; Redis may have gone meanwhile
                await tg.start(reporter.run)
                gc.freeze()  # start-up's objects out of the collector's sight (see worker_main)
                log.info(
                    "orchestrator ready: consumer %s, port %d, %r, %r, %r",
                    consumer, port, directory, server, monitor,
                )  # fmt: skip
                signum = await anext(signals)
                log.info(
                    "%s: draining, %r, grace %gs", signum.name, dispatcher, o.drain_grace_seconds
                )
                server.set_serving(False)
                service.draining = True
                dispatcher.begin_drain()
                with anyio.move_on_after(REGISTRY_SHUTDOWN_SECONDS):
                    await reporter.report(force=True)  # DRAINING, for `jobworker status`
                with anyio.move_on_after(o.drain_grace_seconds) as grace:

                    async def second_signal() -> None:
                        again = await anext(signals)
                        log.warning("%s again: leaving the jobs in hand to others now", again.name)
                        grace.cancel()

                    async with anyio.create_task_group() as drain:
                        drain.start_soon(second_signal)
                        await dispatcher_done.wait()
                        drain.cancel_scope.cancel()
                # jobs still in hand stay pending in the stream: another orchestrator claims them
                dispatcher_scope.cancel()
                log.info("drained: %r, %r", dispatcher, batcher)
            finally:
                client.close()
                with anyio.move_on_after(REGISTRY_SHUTDOWN_SECONDS, shield=True):
                    await reporter.close()
                with anyio.move_on_after(1, shield=True):
                    await redis.aclose()
                    await liveness.aclose()
                tg.cancel_scope.cancel()
    log.info("orchestrator stopped")
