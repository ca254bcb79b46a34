"""Client commands for people and probes: a worker's status, jobs and health; an orchestrator's.

Each opens one grpclib channel to `--target`, makes its call under `--timeout`, prints the answer
as JSON and exits 0 (1 when the call failed or the job did not succeed).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

from app.cli.runtime import run_async
from app.errors import ConfigError

T = TypeVar("T")

DEFAULT_TARGET = "localhost:9091"
DEFAULT_ORCHESTRATOR = "localhost:9090"


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--target", f"expected HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def _client_call(target: str, call: Callable[[Any], Awaitable[T]], timeout: float) -> T:
    """Open a channel to `target`, run `call(channel)` under `timeout`, close the channel."""
    from grpclib.client import Channel

    from app.grpc.status import StatusDetailsCodec

    host, port = _split_target(target)

    async def main() -> T:
        # RetryInfo in a status is decoded into GRPCError.details (see app.cli._client_failure)
        channel = Channel(host, port, status_details_codec=StatusDetailsCodec())
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


def add_parsers(sub: Any) -> None:
    """The client commands, on the `jobworker` subparsers `sub`."""

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
