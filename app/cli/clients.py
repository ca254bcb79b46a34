"""Client commands for people and probes: a worker's status and health, an orchestrator's
workers; and the plumbing every client command shares (targets, the call, its bounds).

Each opens one grpclib channel to its target, makes its call under `--timeout`, prints the answer
as JSON and exits 0 (1 when the call failed). The target is
`--target`, else `$JOBWORKER_TARGET` (a worker) or `$JOBWORKER_ORCHESTRATOR_TARGET`, else the
config key `client.worker` / `client.orchestrator`, else the fleet of a running `jobworker dev`
(its record), else localhost:9091 or localhost:9090 (see `app.cli.targets`). A target that does
not answer, or is another tier, is said in one line naming it and where it came from. The job
commands are in `app.cli.jobs`, the fleet's status in `app.cli.status`.

Waiting for a job (`_client_call` with no timeout) has no time limit: the connection is bounded
instead, and keepalive pings notice a server that goes silent.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from app.cli import targets
from app.cli.runtime import run_async
from app.cli.targets import TARGET_ENV, Target
from app.errors import ConfigError

T = TypeVar("T")

DEFAULT_TARGET = "localhost:9091"
DEFAULT_ORCHESTRATOR = "localhost:9090"
#: what each kind of target defaults to, and the variable that names it
DEFAULTS = {
    "worker": DEFAULT_TARGET,
    "orchestrator": DEFAULT_ORCHESTRATOR,
    "trigger": "localhost:9089",
}
#: an answer that is not a job's outcome, unless --timeout says otherwise
DEFAULT_TIMEOUT_SECONDS = 10.0
#: waiting for a job without a time limit: the connection to the server still has one
CONNECT_TIMEOUT_SECONDS = 10.0
# while a job runs no data flows: pings show the server is still there (the servers accept
# the orchestrator's, every 2 s)
KEEPALIVE_SECONDS = 10.0


def resolve_target(
    kind: str,
    flag: str | None,
    env: Mapping[str, str] = os.environ,
    *,
    profile: str | None = None,
    config_dir: Path | None = None,
) -> str:
    """Where a `kind` command ("worker", "orchestrator", "trigger") goes: `flag` (--target),
    else its environment variable, else the config key `client.<kind>`, else the running
    `jobworker dev` fleet, else localhost on the tier's port (`targets.resolve`, which also
    says where the address came from)."""
    return targets.resolve(kind, flag, env, profile=profile, config_dir=config_dir).address


def _target(args: argparse.Namespace) -> Target:
    """The target of a parsed command, with where it came from (`str()` of it: HOST:PORT)."""
    return targets.resolve(args.target_kind, args.target, **targets.config_args(args))


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--target", f"expected HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def _timeout(args: argparse.Namespace) -> float | None:
    """`--timeout`, else none for a wait on a job's end (`--wait`, `watch`), else the default."""
    if args.timeout is not None:
        return float(args.timeout)
    if getattr(args, "wait", False) or getattr(args, "action", None) == "watch":
        return None
    return DEFAULT_TIMEOUT_SECONDS


def _client_call(
    target: str | Target, call: Callable[[Any], Awaitable[T]], timeout: float | None
) -> T:
    """Open a channel to `target`, run `call(channel)` under `timeout` (None: connecting is
    bounded, the answer is not), close the channel. A target that does not answer, or is not
    the tier asked for, raises `targets.ClientFailure` saying so in one line."""
    from grpclib.client import Channel
    from grpclib.config import Configuration

    from app.grpc.status import StatusDetailsCodec

    if not isinstance(target, Target):
        target = Target(kind="", address=target, source="")  # where it came from: unknown
    host, port = _split_target(target.address)
    config = Configuration(
        _keepalive_time=KEEPALIVE_SECONDS,
        _keepalive_timeout=KEEPALIVE_SECONDS,
        _keepalive_permit_without_calls=False,
        _http2_max_pings_without_data=0,
    )

    async def main() -> T:
        # RetryInfo in a status is decoded into GRPCError.details (see app.cli._client_failure)
        channel = Channel(host, port, status_details_codec=StatusDetailsCodec(), config=config)
        try:
            if timeout is not None:
                with anyio.move_on_after(timeout):
                    return await targets.call_explained(target, channel, call)
                raise TimeoutError(f"no answer from {target} within {timeout:g}s (--timeout)")
            with anyio.move_on_after(CONNECT_TIMEOUT_SECONDS) as connecting:
                await targets.call_explained(target, channel, _connect)
            if connecting.cancelled_caught:
                raise TimeoutError(
                    f"cannot connect to {target} within {CONNECT_TIMEOUT_SECONDS:g}s"
                )
            return await targets.call_explained(target, channel, call)
        finally:
            channel.close()

    return run_async(main)


async def _connect(channel: Any) -> None:
    await channel.__connect__()


def _print_message(message: Any) -> None:
    print(json.dumps(message.to_dict(), indent=2, sort_keys=False))


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--param", f"expected KEY=VALUE, got {pair!r}")
        params[key] = value
    return params


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING (for HEALTHCHECK and probes), else 1."""
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    async def call(ch: Any) -> Any:
        return await HealthStub(ch).Check(HealthCheckRequest(service=args.service))

    # any tier answers health: a failure names the server, not a tier
    target = msgspec.structs.replace(_target(args), kind="")
    res = _client_call(target, call, _timeout(args))
    status = HealthCheckResponse.ServingStatus.Name(res.status)
    print(status)
    return 0 if res.status == HealthCheckResponse.SERVING else 1


def _workers(args: argparse.Namespace) -> int:
    from app.pb import orchestrator as pb

    res = _client_call(
        _target(args),
        lambda ch: pb.OrchestratorServiceStub(ch).list_workers(pb.ListWorkersRequest()),
        _timeout(args),
    )
    _print_message(res)
    return 0


def add_parsers(sub: Any) -> None:
    """The client commands, on the `jobworker` subparsers `sub`."""

    def client(
        name: str,
        help_: str,
        func: Callable[[argparse.Namespace], int],
        kind: str = "worker",
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_[0].upper() + help_[1:] + ".",
            epilog=targets.env_help(kind), formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        p.add_argument(
            "--target",
            help=f"the {kind}'s HOST:PORT (default ${TARGET_ENV[kind]}, else client.{kind},"
            f" else the running `jobworker dev` fleet's, else {DEFAULTS[kind]})",
        )
        targets.add_config_options(p)
        p.add_argument(
            "--timeout",
            type=float,
            help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_SECONDS:g};"
            " no limit for --wait and watch)",
        )
        p.set_defaults(func=func, target_kind=kind)
        return p

    health = client("health", "exit 0 when the server reports SERVING", _health)
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    # submit, job, cancel and jobs: app.cli.jobs
    client("workers", "the fleet as an orchestrator sees it", _workers, "orchestrator")
