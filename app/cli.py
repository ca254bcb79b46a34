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
    from app.worker_main import build_job_registry, serve_worker

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["grpc.port"] = args.port
    if args.host is not None:
        overrides["grpc.host"] = args.host
    env = dict(os.environ)
    config = load_config(env, profile=args.profile, config_dir=args.config_dir, overrides=overrides)
    _setup_logging(config.log.level)
    registry = build_job_registry(config, args.jobs)
    try:
        run_async(lambda: serve_worker(config, registry, env))
    except BaseExceptionGroup as group:
        # a config problem found at run time (no Redis to embed) surfaces from the task group
        config_errors = group.subgroup(ConfigError)
        if config_errors is None:
            raise
        found: BaseException = config_errors
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        raise found from None
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

    def client(
        name: str, help_: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument(
            "--target", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})"
        )
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
