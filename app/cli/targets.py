"""Where a client command calls, where that came from, and what to say when it goes wrong.

A command that calls a tier (a worker, an orchestrator, a trigger replica) takes the first of:

1. its flag (`--target HOST:PORT`, `status --worker ADDR`);
2. the tier's own variable: `$JOBWORKER_TARGET`, `$JOBWORKER_ORCHESTRATOR_TARGET`,
   `$JOBWORKER_TRIGGER_TARGET`;
3. the config key `client.<tier>`, from the same profile files, `--config-dir` /
   `$JOBWORKER_CONFIG_DIR` and `JOBWORKER_CLIENT__<TIER>` as the services read;
4. the fleet of a running `jobworker dev` (its record, `app.cli.dev_record`);
5. localhost on the tier's configured port (`grpc.port` or `grpc.default_port`,
   `orchestrator.port`, `trigger.port`: 9091, 9090, 9089).

The order goes from the most deliberate and local choice to the most ambient one: a flag is
this one call; a variable is this shell; a config key is a standing choice someone wrote down;
the dev record only says that a throwaway fleet happens to run on this machine, and must not
silently take over from a configured fleet (nor be taken over by a default).

A command that reads Redis (`status`, `lost`) takes `--redis URL`, else the `[redis]` settings
exactly as the services read them (`REDIS_URL`, `JOBWORKER_REDIS__*`, the profile files), else
the running `jobworker dev`'s private Redis; there is no default (a worker's embedded Redis is
its own).

A call that fails says so in one line naming the target and where it came from: nobody
answers there, or it is another tier ("127.0.0.1:9091 is a worker, not an orchestrator"), found
from the UNIMPLEMENTED message of our servers or by asking the server's reflection which
services it serves.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from app.cli.dev_record import read_dev_record
from app.config import Config, RedisConfig, load_config_with_origins
from app.errors import ConfigError

T = TypeVar("T")

KINDS = ("worker", "orchestrator", "trigger")
#: the variable that names each tier's target
TARGET_ENV = {
    "worker": "JOBWORKER_TARGET",
    "orchestrator": "JOBWORKER_ORCHESTRATOR_TARGET",
    "trigger": "JOBWORKER_TRIGGER_TARGET",
}
#: the port each tier listens on when its config says nothing
DEFAULT_PORTS = {"worker": 9091, "orchestrator": 9090, "trigger": 9089}
#: the gRPC service each tier serves, and back
SERVICES = {
    "worker": "worker.WorkerService",
    "orchestrator": "orchestrator.OrchestratorService",
    "trigger": "trigger.TriggerService",
}
TIER_OF_SERVICE = {service: kind for kind, service in SERVICES.items()}
#: how long asking a server which services it serves may take
IDENTIFY_TIMEOUT_SECONDS = 5.0


class ClientFailure(Exception):
    """A client command's call failed in a way said in one line (exit 1)."""


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """A tier's HOST:PORT for a client command, and where it came from (for the messages).

    `str(target)` is the address, so that it reads as one where a string was expected.
    """

    kind: str  # "worker", "orchestrator", "trigger"; "" when any tier will do
    address: str
    source: str  # "--target", "$JOBWORKER_TARGET", "client.worker in /etc/x.toml", ...

    def __str__(self) -> str:
        return self.address


class RedisTarget(msgspec.Struct, frozen=True, kw_only=True):
    """The Redis a client command reads, as the services would build it, and where it came
    from."""

    config: RedisConfig
    url: str  # to connect to (the config's own endpoint when empty: sentinels)
    source: str

    @property
    def display(self) -> str:
        """The URL without a password, for messages."""
        shown = msgspec.structs.replace(self.config, url=self.url) if self.url else self.config
        return shown.display_url()


def load_client_config(
    env: Mapping[str, str], *, profile: str | None = None, config_dir: Path | None = None
) -> tuple[Config, dict[str, str]]:
    """The services' configuration (files, `JOBWORKER_*`, `REDIS_URL`) and each key's origin."""
    return load_config_with_origins(env, profile=profile, config_dir=config_dir)


def _origin(origins: Mapping[str, str], dotted: str) -> str:
    """Where `dotted` was set, said for a message: "$VAR" or "<key> in <file>"."""
    key = dotted
    while key not in origins and "." in key:
        key = key.rsplit(".", 1)[0]  # a section that was set whole
    found = origins.get(key, "")
    if found.startswith("JOBWORKER_") or found == "REDIS_URL":
        return f"${found}"
    return f"{dotted} in {found}" if found else dotted


def _default_port(kind: str, config: Config) -> tuple[int, str]:
    if kind == "worker":
        if config.grpc.port:
            return config.grpc.port, "grpc.port"
        return config.grpc.default_port, "grpc.default_port"
    port = config.orchestrator.port if kind == "orchestrator" else config.trigger.port
    return port or DEFAULT_PORTS[kind], f"{kind}.port"


def resolve(
    kind: str,
    flag: str | None,
    env: Mapping[str, str] = os.environ,
    *,
    profile: str | None = None,
    config_dir: Path | None = None,
    flag_name: str = "--target",
) -> Target:
    """The target of a `kind` command (see the module's docstring for the order)."""
    if flag:
        return Target(kind=kind, address=flag, source=flag_name)
    named = env.get(TARGET_ENV[kind], "")
    if named:
        return Target(kind=kind, address=named, source=f"${TARGET_ENV[kind]}")
    config, origins = load_client_config(env, profile=profile, config_dir=config_dir)
    configured: str = getattr(config.client, kind)
    if configured:
        return Target(kind=kind, address=configured, source=_origin(origins, f"client.{kind}"))
    record = read_dev_record(env)
    if record is not None:
        fleet = {
            "worker": record.workers[0] if record.workers else "",
            "orchestrator": record.orchestrator,
            "trigger": record.trigger,
        }
        if fleet[kind]:
            return Target(
                kind=kind,
                address=fleet[kind],
                source=f"the running `jobworker dev` (pid {record.pid})",
            )
    port, key = _default_port(kind, config)
    return Target(kind=kind, address=f"localhost:{port}", source=f"the default: localhost, {key}")


def resolve_redis(
    flag: str | None,
    env: Mapping[str, str] = os.environ,
    *,
    profile: str | None = None,
    config_dir: Path | None = None,
) -> RedisTarget:
    """The Redis a client command reads (see the module's docstring); ConfigError when there
    is none to read."""
    config, origins = load_client_config(env, profile=profile, config_dir=config_dir)
    redis = config.redis
    if flag:
        if flag.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise ConfigError("--redis", "must start with redis://, rediss:// or unix://")
        return RedisTarget(config=redis, url=flag, source="--redis")
    if redis.configured:
        key = "redis.url" if redis.url else "redis.host" if redis.host else "redis.sentinels"
        return RedisTarget(config=redis, url=redis.url, source=_origin(origins, key))
    record = read_dev_record(env)
    if record is not None:
        return RedisTarget(
            config=redis, url=record.redis_url,
            source=f"the running `jobworker dev` (pid {record.pid})",
        )  # fmt: skip
    raise ConfigError(
        "redis.url",
        "no Redis to read: set REDIS_URL (or redis.url in the config, or --redis URL),"
        " or start `jobworker dev`",
    )


# --- failures ---------------------------------------------------------------------------------


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _from(target: Target) -> str:
    return f" (from {target.source})" if target.source else ""


def unreachable(target: Target, exc: BaseException) -> ClientFailure:
    """Nobody answered at the target (refused, unresolvable, not gRPC)."""
    what = f"the {target.kind}" if target.kind else "the server"
    return ClientFailure(
        f"cannot reach {what} at {target.address}{_from(target)}: {_one_line(exc)}"
    )


def wrong_method(exc: Exception) -> bool:
    """Whether `exc` says the server lacks the method called: UNIMPLEMENTED, or what
    grpclib's own server answers instead (no content-type)."""
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    return isinstance(exc, GRPCError) and (
        exc.status is Status.UNIMPLEMENTED or exc.message == "Missing content-type header"
    )


def services_in_message(message: str) -> list[str] | None:
    """The services our servers' UNIMPLEMENTED names ("... this server serves a, b"), or None."""
    _, sep, listed = message.partition("this server serves ")
    return [s.strip() for s in listed.split(",") if s.strip()] if sep else None


async def list_services(channel: Any) -> list[str]:
    """The services a server serves, from its reflection (v1)."""
    from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
    from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

    stub = ServerReflectionStub(channel)
    async with stub.ServerReflectionInfo.open() as stream:
        await stream.send_message(ServerReflectionRequest(list_services=""), end=True)
        reply = await stream.recv_message()
    if reply is None:
        return []
    return [s.name for s in reply.list_services_response.service]


def tier_of(services: list[str]) -> str | None:
    """The tier serving `services`, or None when none of ours is among them."""
    return next((TIER_OF_SERVICE[s] for s in services if s in TIER_OF_SERVICE), None)


async def wrong_tier(target: Target, channel: Any, exc: Exception) -> ClientFailure | None:
    """Say which tier answered a call it lacks (asking its reflection when the answer does not
    name its services); None when that cannot be told."""
    services = services_in_message(getattr(exc, "message", None) or "")
    if services is None:
        with anyio.move_on_after(IDENTIFY_TIMEOUT_SECONDS):
            try:
                services = await list_services(channel)
            except Exception:
                services = None
    if services is None:
        return None
    tier = tier_of(services)
    wanted = _a(target.kind) if target.kind else "the tier this command calls"
    if tier is None:
        return ClientFailure(
            f"{target.address} is not a jobworker server (it serves"
            f" {', '.join(services) or 'nothing listed'}), not {wanted}{_from(target)}"
        )
    if tier == target.kind:
        return None  # the right tier, lacking a method: another version; the status says it
    return ClientFailure(f"{target.address} is {_a(tier)}, not {wanted}{_from(target)}")


async def call_explained(target: Target, channel: Any, call: Callable[[Any], Awaitable[T]]) -> T:
    """`call(channel)`, its failures said in one line: unreachable, or the wrong tier."""
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    try:
        try:
            return await call(channel)
        except BaseExceptionGroup as group:
            # a call that follows a job runs in a task group: its one failure is the failure
            raise _sole(group) from None
    except GRPCError as exc:
        if wrong_method(exc):
            failure = await wrong_tier(target, channel, exc)
            if failure is not None:
                raise failure from None
        raise
    except (OSError, StreamTerminatedError) as exc:
        # refused, unresolvable, reset; or something there that does not speak HTTP/2
        raise unreachable(target, exc) from None


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a group holds (through nested groups), else the group itself."""
    leaves = list(_leaves(group))
    return leaves[0] if len(leaves) == 1 else group


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


# --- options and help -------------------------------------------------------------------------


def add_config_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """`--profile` and `--config-dir`: the services' configuration, where targets and Redis
    are found. `suppress`: no default of its own (an action beside its command's)."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--profile", default=default,
        help="config profile to read targets and Redis from (default: $PROFILE, else local)",
    )  # fmt: skip
    parser.add_argument(
        "--config-dir", type=Path, default=default,
        help="folder of external application*.toml (default: $JOBWORKER_CONFIG_DIR)",
    )  # fmt: skip


def config_args(args: argparse.Namespace) -> dict[str, Any]:
    """`profile` and `config_dir` of a parsed command (None when it has no such options)."""
    return {
        "profile": getattr(args, "profile", None),
        "config_dir": getattr(args, "config_dir", None),
    }


_CONFIG_ENV = """\
  PROFILE                        the config profile (as --profile; default local)
  JOBWORKER_CONFIG_DIR           a folder of application*.toml (as --config-dir)
  XDG_STATE_HOME                 where a running `jobworker dev` leaves its record
                                 ($XDG_STATE_HOME/jobworker/dev.json)"""


def env_help(kind: str | None = None, *, redis: bool = False, flag: str = "--target") -> str:
    """The environment section of a client command's --help: the variables that pick its
    target (`kind`) and its Redis (`redis`)."""
    lines = ["environment:"]
    if kind is not None:
        var, key = TARGET_ENV[kind], f"JOBWORKER_CLIENT__{kind.upper()}"
        lines += [
            f"  {var:<30} the {kind}'s HOST:PORT when {flag} is not given",
            f"  {key:<30} the same as the config key client.{kind} (which a",
            f"  {'':<30} config file may set); then a running `jobworker dev`'s",
            f"  {'':<30} {kind}, then localhost:{DEFAULT_PORTS[kind]} ({_port_key(kind)})",
        ]
    if redis:
        lines += [
            f"  {'REDIS_URL':<30} the Redis to read when --redis is not given",
            f"  {'JOBWORKER_REDIS__<KEY>':<30} any [redis] key (url, host, port, tls, password,",
            f"  {'':<30} sentinels...), as the services read them; with none",
            f"  {'':<30} set, a running `jobworker dev`'s Redis",
        ]
    lines.append(_CONFIG_ENV)
    return "\n".join(lines) + "\n"


def _port_key(kind: str) -> str:
    return "grpc.port" if kind == "worker" else f"{kind}.port"
