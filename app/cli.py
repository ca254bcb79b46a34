"""`jobworker`: the one console script, with a subcommand per role and per client task."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

from app import __version__
from app.config import load_config
from app.errors import ConfigError

log = logging.getLogger("app")
T = TypeVar("T")

EXIT_CONFIG = 2
DEFAULT_TARGET = "localhost:9091"
DEFAULT_ORCHESTRATOR = "localhost:9090"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """grpclib and redis-py need asyncio; uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        options: dict[str, Any] = {}
    else:
        options = {"use_uvloop": True}
    return anyio.run(fn, backend="asyncio", backend_options=options)


def _worker(args: argparse.Namespace) -> int:
    from app.worker.main import build_job_registry, serve_worker

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["grpc.port"] = args.port
    if args.host is not None:
        overrides["grpc.host"] = args.host
    env = dict(os.environ)
    config = load_config(env, profile=args.profile, config_dir=args.config_dir, overrides=overrides)
    _setup_logging(config.log.level)
    registry = build_job_registry(config, args.jobs)
    _run_service(lambda: serve_worker(config, registry, env))
    return 0


def _run_service(main: Callable[[], Awaitable[None]]) -> None:
    try:
        run_async(main)
    except BaseExceptionGroup as group:
        # a config problem found at run time (no Redis to embed) surfaces from the task group
        config_errors = group.subgroup(ConfigError)
        if config_errors is None:
            raise
        found: BaseException = config_errors
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        raise found from None


def _orchestrator(args: argparse.Namespace) -> int:
    from app.orchestrator.main import serve_orchestrator

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["orchestrator.port"] = args.port
    if args.host is not None:
        overrides["orchestrator.host"] = args.host
    config = load_config(
        dict(os.environ), profile=args.profile, config_dir=args.config_dir, overrides=overrides
    )
    _setup_logging(config.log.level)
    _run_service(lambda: serve_orchestrator(config))
    return 0


# --- clients ---------------------------------------------------------------------------------


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--target", f"expected HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def _client_call(target: str, call: Callable[[Any], Awaitable[T]], timeout: float) -> T:
    """Open a channel to `target`, run `call(channel)` under `timeout`, close the channel."""
    from grpclib.client import Channel

    host, port = _split_target(target)

    async def main() -> T:
        channel = Channel(host, port)
        try:
            with anyio.fail_after(timeout):
                return await call(channel)
        finally:
            channel.close()

    return run_async(main)


def _print_message(message: Any) -> None:
    print(json.dumps(message.to_dict(), indent=2, sort_keys=False))


def _status(args: argparse.Namespace) -> int:
    from app.pb import worker as pb

    res = _client_call(
        args.target, lambda ch: pb.WorkerServiceStub(ch).get_status(pb.StatusReq()), args.timeout
    )
    _print_message(res)
    return 0


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--param", f"expected KEY=VALUE, got {pair!r}")
        params[key] = value
    return params


def _submit(args: argparse.Namespace) -> int:
    import uuid

    from app.pb import worker as pb

    req = pb.SendWorkReq(
        id=args.id or uuid.uuid4().hex,
        name=args.name,
        params=_parse_params(args.param),
        timeout_seconds=args.job_timeout or 0.0,
    )

    async def call(ch: Any) -> Any:
        stub = pb.WorkerServiceStub(ch)
        return await (stub.run_work(req) if args.wait else stub.send_work(req))

    res = _client_call(args.target, call, args.timeout)
    _print_message(res)
    ok = not args.wait or res.state == pb.JobState.SUCCEEDED
    return 0 if ok else 1


def _job(args: argparse.Namespace) -> int:
    from app.pb import worker as pb

    def call(ch: Any) -> Awaitable[Any]:
        stub = pb.WorkerServiceStub(ch)
        ref = pb.JobRef(id=args.id)
        return stub.cancel_job(ref) if args.command == "cancel" else stub.get_job(ref)

    _print_message(_client_call(args.target, call, args.timeout))
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING (for HEALTHCHECK and probes), else 1."""
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    async def call(ch: Any) -> Any:
        return await HealthStub(ch).Check(HealthCheckRequest(service=args.service))

    res = _client_call(args.target, call, args.timeout)
    status = HealthCheckResponse.ServingStatus.Name(res.status)
    print(status)
    return 0 if res.status == HealthCheckResponse.SERVING else 1


def _jobs(args: argparse.Namespace) -> int:
    """`jobworker jobs submit|get|cancel|watch` against an orchestrator."""
    from app.pb import orchestrator as pb

    async def call(ch: Any) -> Any:
        stub = pb.OrchestratorServiceStub(ch)
        if args.action == "submit":
            req = pb.BatchExecutionRequest(
                job_id=args.id or "",
                job_type=args.job_type,
                params=_parse_params(args.param),
                timeout_seconds=args.job_timeout or 0.0,
                deadline_seconds=args.deadline or 0.0,
                priority=args.priority,
                retry_on_failure=args.retry_on_failure,
                max_attempts=args.max_attempts or 0,
            )
            return await (stub.execute(req) if args.wait else stub.submit(req))
        ref = pb.JobRequest(job_id=args.id)
        if args.action == "watch":
            async for job in stub.watch_job(ref):
                print(json.dumps(job.to_dict()), flush=True)
            return None
        return await (stub.cancel_job(ref) if args.action == "cancel" else stub.get_job(ref))

    res = _client_call(args.target, call, args.timeout)
    if res is None:
        return 0
    _print_message(res)
    if args.action == "submit" and args.wait:
        return 0 if res.job.state == pb.JobState.SUCCEEDED else 1
    return 0


def _workers(args: argparse.Namespace) -> int:
    from app.pb import orchestrator as pb

    res = _client_call(
        args.target,
        lambda ch: pb.OrchestratorServiceStub(ch).list_workers(pb.ListWorkersRequest()),
        args.timeout,
    )
    _print_message(res)
    return 0


def _cron_preview(args: argparse.Namespace) -> int:
    """The next N fire instants of an expression, one a line: the instant with its offset in
    the zone first (what scripts read), then the same in UTC, then a mark when DST moved it."""
    from datetime import UTC, datetime

    from app.scheduling.cron import (
        CronError,
        RepeatedTime,
        SkippedTime,
        next_fire,
        parse_cron,
        parse_zone,
    )

    try:
        cron = parse_cron(args.expression)
    except CronError as exc:
        raise ConfigError("EXPR", str(exc)) from None
    try:
        zone = parse_zone(args.tz)
    except ValueError as exc:
        raise ConfigError("--tz", str(exc)) from None
    if args.n < 1:
        raise ConfigError("-n", f"must be at least 1, got {args.n}")
    after = datetime.now(UTC)
    if args.after:
        try:
            after = datetime.fromisoformat(args.after)
        except ValueError:
            raise ConfigError("--after", f"expected ISO 8601, got {args.after!r}") from None
        if after.tzinfo is None:
            after = after.replace(tzinfo=zone)  # a wall time in the zone
    printed = 0
    while printed < args.n:
        fire = next_fire(
            cron,
            zone,
            after,
            skipped=SkippedTime(args.skipped),
            repeated=RepeatedTime(args.repeated),
        )
        if fire is None:
            break
        after = fire.at
        if fire.skipped:
            continue  # not a fire instant
        at_utc = fire.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        mark = ""
        if fire.moved:
            mark = f"  moved (DST): {fire.nominal.isoformat()} does not exist"
        elif fire.repeat:
            mark = f"  repeated (DST): second {fire.nominal.isoformat()}"
        print(f"{fire.at.isoformat()}  {at_utc}{mark}")
        printed += 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobworker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jobworker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser("worker", help="run a gRPC job worker")
    worker.add_argument("--profile", help="config profile (default: $PROFILE, else local)")
    worker.add_argument("--config-dir", type=_path, help="folder of external application*.toml")
    worker.add_argument(
        "--jobs",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE so its @job functions register (repeatable)",
    )
    worker.add_argument("--port", type=int, help="first gRPC port to try (grpc.port)")
    worker.add_argument("--host", help="address to bind (grpc.host)")
    worker.set_defaults(func=_worker)

    orchestrator = sub.add_parser("orchestrator", help="run the gateway: queue, balance, delegate")
    orchestrator.add_argument("--profile", help="config profile (default: $PROFILE, else local)")
    orchestrator.add_argument(
        "--config-dir", type=_path, help="folder of external application*.toml"
    )
    orchestrator.add_argument("--port", type=int, help="first gRPC port to try (orchestrator.port)")
    orchestrator.add_argument("--host", help="address to bind (orchestrator.host)")
    orchestrator.set_defaults(func=_orchestrator)

    def client(
        name: str,
        help_: str,
        func: Callable[[argparse.Namespace], int],
        target: str = DEFAULT_TARGET,
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_)
        p.add_argument("--target", default=target, help=f"HOST:PORT (default {target})")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
        p.set_defaults(func=func)
        return p

    client("status", "print a worker's status", _status)
    submit = client("submit", "send a job to a worker", _submit)
    submit.add_argument("name", help="job name")
    submit.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--id", help="job id (default: a new uuid)")
    submit.add_argument("--wait", action="store_true", help="wait for the outcome (RunWork)")
    submit.add_argument("--job-timeout", type=float, help="the job's own timeout in seconds")
    client("job", "print a job by id", _job).add_argument("id")
    client("cancel", "cancel a job by id", _job).add_argument("id")
    health = client("health", "exit 0 when the server reports SERVING", _health)
    health.add_argument("--service", default="", help="service name (default: the whole server)")

    jobs = sub.add_parser("jobs", help="jobs on an orchestrator: submit, get, cancel, watch")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    target = DEFAULT_ORCHESTRATOR
    submit_job = client("submit", "queue a job (--wait: run and wait)", _jobs, target, actions)
    submit_job.add_argument("job_type", help="the worker's job name")
    submit_job.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    submit_job.add_argument("--id", help="job id (default: generated); a known id is idempotent")
    submit_job.add_argument("--wait", action="store_true", help="wait for the outcome (Execute)")
    submit_job.add_argument("--job-timeout", type=float, help="the job's run time limit, seconds")
    submit_job.add_argument("--deadline", type=float, help="seconds it may wait and run in all")
    submit_job.add_argument("--priority", type=int, default=0, help="0 (default) to 9")
    submit_job.add_argument("--retry-on-failure", action="store_true")
    submit_job.add_argument("--max-attempts", type=int)
    for action, help_ in (("get", "print a job"), ("cancel", "cancel a job"),
                          ("watch", "print the job on each change until it ends")):  # fmt: skip
        client(action, help_, _jobs, target, actions).add_argument("id")
    client("workers", "the fleet as an orchestrator sees it", _workers, target)

    cron = sub.add_parser("cron", help="cron expressions: preview fire times")
    cron_actions = cron.add_subparsers(dest="action", required=True, metavar="ACTION")
    preview = cron_actions.add_parser("preview", help="print the next fire instants")
    preview.add_argument("expression", metavar="EXPR", help="5 fields, 6 (seconds first), @daily")
    preview.add_argument("--tz", default="UTC", metavar="ZONE", help="IANA zone (default UTC)")
    preview.add_argument("-n", type=int, default=10, help="how many (default 10)")
    preview.add_argument("--after", metavar="TIME", help="ISO 8601; without offset: in ZONE")
    preview.add_argument(
        "--skipped", choices=["run_at_transition", "skip"], default="run_at_transition",
        help="a time a DST gap skips (default: run at the transition)",
    )  # fmt: skip
    preview.add_argument(
        "--repeated", choices=["once", "twice"], default="once",
        help="a time a DST fold repeats (default: once, the first)",
    )  # fmt: skip
    preview.set_defaults(func=_cron_preview)
    return parser


def _path(value: str) -> Any:
    from pathlib import Path

    return Path(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"jobworker: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _client_failure(exc)


def _client_failure(exc: Exception) -> int:
    """One line for what a person can act on; a traceback only for what is a bug."""
    from grpclib.exceptions import GRPCError

    if isinstance(exc, GRPCError):
        print(f"jobworker: {exc.status.name}: {exc.message}", file=sys.stderr)
        return 1
    if isinstance(exc, OSError | TimeoutError):
        print(f"jobworker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    raise exc
