"""The composition root of `jobworker trigger` (the seed's server-batch scheduler).

    root task group
    ├── TriggerReplica      leases, heartbeats; a ScheduleRunner per schedule it works
    ├── HttpServer          /metrics, /healthz, /readyz (Hypercorn) when `metrics.port` is set
    ├── GrpcServer          TriggerService, reflection, health
    └── RoleReporter        this replica's RoleInfo (`jobworker status`), every report interval

Start: the `[[schedules]]` of the config are checked (a bad one exits 2 naming its key), Redis is
waited for, the config's schedules are synced into the store, then the replica takes its share
of the schedules and the gRPC server opens. Any number of replicas run against one Redis; none
is configured as a leader.

Shutdown (SIGTERM/SIGINT): health NOT_SERVING and changes refused with UNAVAILABLE; runners stop
between steps (one in the middle of a tick gets `trigger.drain_grace_seconds`), the leases are
released so that another replica takes the schedules over at once, the RoleInfo record (DRAINING
meanwhile) is removed, exit 0. A second signal
stops at once; the leases then run out.
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
from app.core.clock import SystemClock
from app.errors import ConfigError
from app.fleet.role_info import Role, RoleIdentity, RoleInfo
from app.grpc.limits import limits_from
from app.grpc.ports import advertised_ip, candidate_ports
from app.grpc.server import GrpcServer
from app.stores.redis.client import create_redis, wait_for_redis_unless_stopped
from app.stores.redis.monitor import RedisMonitor
from app.stores.redis.pool import pool_statistics
from app.stores.redis.role_registry import redis_role_reporter
from app.stores.redis.schedule_store import RedisScheduleStore
from app.trigger.config_sync import config_specs, sync_config_schedules
from app.trigger.orchestrator_client import GrpcOrchestratorClient
from app.trigger.replica import TriggerReplica, default_replica_id
from app.trigger.service import TriggerService

log = logging.getLogger("app.trigger")

# how long shutdown waits on Redis for the DRAINING report and the record's removal
REGISTRY_SHUTDOWN_SECONDS = 3.0


async def serve_trigger(config: Config) -> None:
    """Run a trigger replica until a signal drains it."""
    t = config.trigger
    if not config.redis.configured:
        raise ConfigError(
            "redis.url", "the trigger needs the Redis its replicas share; set REDIS_URL"
        )
    clock = SystemClock()
    min_grace = 2 * t.lease_seconds
    # a bad [[schedules]] entry stops the process here, before it touches anything
    declared = config_specs(config.schedules, now=clock.timestamp(), min_grace=min_grace)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            redis = create_redis(config.redis)
            # health on a connection of its own: a pool busy with the load is not an outage
            liveness = create_redis(config.redis, liveness=True)
            store = RedisScheduleStore(
                redis,
                prefix=t.key_prefix,
                ledger_size=t.ledger_size,
                ledger_retention_seconds=t.ledger_retention_seconds,
            )
            client = GrpcOrchestratorClient(
                t.orchestrators, call_timeout_seconds=t.call_timeout_seconds
            )
            replica = TriggerReplica(
                store,
                client,
                replica_id=t.replica_id or default_replica_id(socket.gethostname(), os.getpid()),
                clock=clock,
                lease_seconds=t.lease_seconds,
                ledger_limit=t.ledger_size,
                drain_grace_seconds=t.drain_grace_seconds,
            )
            service = TriggerService(
                store,
                client,
                replica,
                clock=clock,
                min_grace=min_grace,
                ledger_size=t.ledger_size,
                ledger_retention_seconds=t.ledger_retention_seconds,
            )
            server = GrpcServer(
                [service],
                host=t.host,
                fast_path=config.grpc.fast_path,
                close_grace_seconds=config.grpc.close_grace_seconds,
                limits=limits_from(config.grpc),
            )

            def serving(redis_up: bool) -> None:
                server.set_serving(redis_up and not service.draining)

            async def resync() -> None:
                await sync_config_schedules(store, declared, now=clock.timestamp())

            # says once when Redis goes, comes back without its data (the declared schedules
            # are synced again then; those made through the API are gone) or without its last
            # writes; health NOT_SERVING meanwhile
            monitor = RedisMonitor(
                liveness,
                what=f"Redis at {config.redis.display_url()}",
                consequence="health NOT_SERVING, runners wait for it",
                on_change=serving,
                on_data_lost=resync,
                data_loss_action="syncing the declared schedules again (those made through the"
                " API are gone with it)",
                interval=config.redis.check_interval_seconds,
            )  # fmt: skip
            interval = config.schedule.report_interval_seconds
            identity = RoleIdentity(
                role=Role.TRIGGER,
                ip=advertised_ip(t.host, config.grpc.advertise_ip),
                version=__version__,
                report_interval_seconds=interval,
                start_datetime=clock.now().isoformat(timespec="milliseconds"),
            )

            def role_info() -> RoleInfo:
                stats = replica.statistics()
                return identity.report(
                    clock.now(), grpc_port=server.port, draining=service.draining,
                    schedules_held=stats.owned, schedules=stats.schedules, replicas=stats.replicas,
                )  # fmt: skip

            reporter = redis_role_reporter(liveness, config, role_info, clock)
            try:
                # nothing works without the shared Redis: wait for it (a signal still stops
                # us), then make the declared schedules the config's
                async def sync() -> None:
                    await sync_config_schedules(store, declared, now=clock.timestamp())

                await wait_for_redis_unless_stopped(
                    redis, signals, tg.cancel_scope,
                    what=f"Redis at {config.redis.display_url()}", then=sync,
                )  # fmt: skip
                await tg.start(monitor.run)
                await tg.start(replica.run)
                if config.metrics.port is not None:
                    # the HTTP edge is imported only by a role that serves it
                    from app.http.edge import start_http_edge
                    from app.stores.redis.metrics import redis_metrics
                    from app.trigger.metrics import trigger_metrics

                    await start_http_edge(
                        tg,
                        host=config.metrics.host,
                        port=config.metrics.port,
                        collect=lambda: [
                            *trigger_metrics(replica, server, store.bad_data),
                            *redis_metrics(monitor.statistics(), pool_statistics(redis)),
                        ],
                        draining=lambda: service.draining,
                        grpc_port=lambda: server.port,
                        unready=monitor.down_reason,
                    )
                port = await tg.start(
                    server.run, candidate_ports(t.port, t.port_search if t.port else 0)
                )
                serving(monitor.up)  # the server starts SERVING; Redis may have gone meanwhile
                await tg.start(reporter.run)
                gc.freeze()  # start-up's objects out of the collector's sight (see worker_main)
                log.info(
                    "trigger ready: replica %s, port %d, orchestrators %s, %r, %r",
                    replica.replica_id, port, ",".join(t.orchestrators), replica, server,
                )  # fmt: skip
                signum = await anext(signals)
                log.info("%s: draining, %r", signum.name, replica)
                server.set_serving(False)
                service.draining = True
                replica.begin_drain()
                with anyio.move_on_after(REGISTRY_SHUTDOWN_SECONDS):
                    await reporter.report(force=True)  # DRAINING, for `jobworker status`
                with anyio.move_on_after(t.drain_grace_seconds + 3) as grace:

                    async def second_signal() -> None:
                        again = await anext(signals)
                        log.warning("%s again: stopping now; the leases run out", again.name)
                        grace.cancel()

                    async with anyio.create_task_group() as drain:
                        drain.start_soon(second_signal)
                        await replica.wait_stopped()
                        drain.cancel_scope.cancel()
                log.info("drained: %r", replica)
            finally:
                client.close()
                with anyio.move_on_after(REGISTRY_SHUTDOWN_SECONDS, shield=True):
                    await reporter.close()
                with anyio.move_on_after(1, shield=True):
                    await redis.aclose()
                    await liveness.aclose()
                tg.cancel_scope.cancel()
    log.info("trigger stopped")
