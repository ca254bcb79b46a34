"""`jobworker status`: the whole fleet from Redis, as a table; or one worker's own GetStatus.

Every role writes a record of itself to Redis on its report interval (workers their PodInfo,
orchestrators and trigger replicas their RoleInfo), deleted on a clean stop. This reads them all
(`app.stores.redis.fleet_reader`) and prints one row per process: role, address, pid, port,
status, load, the age of its last report, version; a record older than two report intervals,
or about to expire, is marked STALE with the reason (`app.fleet.fleet_view`).

`--json` prints the same as one JSON object; `--watch [SECONDS]` refreshes: in place on a
terminal (cursor home and clear, no scrolling), one table (or JSON line) per refresh when piped;
Ctrl-C ends it with exit 0. Redis is found as the services find it (`app.cli.targets`); when it
cannot be reached the command exits 1 with one line naming it (a watch keeps trying, and says
so in place of the table).

`status --worker [ADDR]` asks one worker for its own GetStatus instead (ADDR left out: the
worker target, as `$JOBWORKER_TARGET`, `client.worker`, the dev fleet or localhost:9091 give).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import anyio
import msgspec

from app.cli import targets
from app.cli.runtime import run_async
from app.cli.targets import RedisTarget
from app.errors import StoreUnavailable
from app.fleet.fleet_view import FleetMember, fleet_members

#: seconds between refreshes of `--watch` with no value
DEFAULT_WATCH_SECONDS = 2.0
#: one read of the fleet
READ_TIMEOUT_SECONDS = 10.0
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
DESCRIPTION = """\
Show every process of the fleet from what each writes to Redis on its report interval (workers
their PodInfo, orchestrators and trigger replicas their RoleInfo; deleted on a clean stop): one
row each with role, address, pid, port, status, load, the age of its last report and version. A
record older than two report intervals, or about to expire, is marked STALE with the reason.

--watch refreshes in place on a terminal, and prints one table (one JSON line with --json) per
refresh when piped; Ctrl-C ends it with exit 0. Exit 1, with one line naming the Redis URL and
where it came from, when Redis cannot be read; 2 for a bad option or config key.
With --worker, one worker's own status (GetStatus) instead, as JSON."""
COLUMNS = ("ROLE", "ADDRESS", "PID", "PORT", "STATUS", "LOAD", "REPORTED", "VERSION", "")


class FleetSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One read of the fleet: when, from which Redis, and every member (`--json`)."""

    at: str
    redis: str
    redis_source: str = msgspec.field(name="redisSource")
    members: list[FleetMember]
    stale: int


class _Reader:
    """Reads the fleet from one Redis; one client for all the refreshes of a watch."""

    def __init__(self, redis: RedisTarget, *, pod_prefix: str, roles_prefix: str,
                 interval: float) -> None:  # fmt: skip
        from app.stores.redis.client import create_redis

        self.redis = redis
        self._client = create_redis(redis.config, redis.url or None)
        self._pod_prefix = pod_prefix
        self._roles_prefix = roles_prefix
        self._interval = interval

    async def read(self) -> FleetSnapshot:
        """The fleet now; `StoreUnavailable` when Redis does not answer in time."""
        from app.stores.redis.fleet_reader import read_fleet

        with anyio.move_on_after(READ_TIMEOUT_SECONDS) as scope:
            found = await read_fleet(
                self._client, pod_prefix=self._pod_prefix, roles_prefix=self._roles_prefix
            )
        if scope.cancelled_caught:
            raise StoreUnavailable(f"no answer within {READ_TIMEOUT_SECONDS:g}s")
        now = time.time()
        members = fleet_members(found, now=now, default_interval=self._interval)
        return FleetSnapshot(
            at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            redis=self.redis.display, redis_source=self.redis.source, members=members,
            stale=sum(m.stale for m in members),
        )  # fmt: skip

    def unreachable(self, exc: StoreUnavailable) -> str:
        """The one line for a Redis that cannot be read."""
        return (
            f"cannot read the fleet from Redis at {self.redis.display}"
            f" (from {self.redis.source}): {exc}"
        )

    async def aclose(self) -> None:
        """Close the client (bounded: the process is ending)."""
        with anyio.move_on_after(1, shield=True):
            await self._client.aclose()


# --- rendering (pure) -------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render_table(snapshot: FleetSnapshot) -> str:
    """The snapshot as an aligned table under a one-line summary."""
    rows = [
        (
            m.role.value, m.address, str(m.pid or "?"), str(m.port or "?"), m.status, m.load,
            _age(m.report_age_seconds), m.version or "?",
            f"STALE: {m.stale_reason}" if m.stale else "",
        )
        for m in snapshot.members
    ]  # fmt: skip
    counts = {role: sum(1 for m in snapshot.members if m.role.value == role)
              for role in ("trigger", "orchestrator", "worker")}  # fmt: skip
    summary = ", ".join(f"{n} {role}{'s' if n != 1 else ''}" for role, n in counts.items())
    stale = f" ({snapshot.stale} stale)" if snapshot.stale else ""
    head = f"fleet in Redis at {snapshot.redis}, {snapshot.at}: {summary}{stale}"
    if not rows:
        return head + "\nno process has registered (none running, or another Redis or key prefix)"
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = [head]
    for row in (COLUMNS, *rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render_json(snapshot: FleetSnapshot, *, compact: bool) -> str:
    """The snapshot as JSON: indented, or one line (a watch's refreshes are JSON lines)."""
    raw = msgspec.json.encode(snapshot)
    return raw.decode() if compact else json.dumps(json.loads(raw), indent=2)


# --- the command ------------------------------------------------------------------------------


def _worker_status(args: argparse.Namespace) -> int:
    """GetStatus of one worker (what `status` did before it showed the fleet)."""
    from app.cli.clients import _client_call, _print_message, _timeout
    from app.pb import worker as pb

    target = targets.resolve(
        "worker", args.worker or None, flag_name="--worker", **targets.config_args(args)
    )
    res = _client_call(
        target, lambda ch: pb.WorkerServiceStub(ch).get_status(pb.StatusReq()), _timeout(args)
    )
    _print_message(res)
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.worker is not None:
        return _worker_status(args)
    config, _ = targets.load_client_config(os.environ, **targets.config_args(args))
    redis = targets.resolve_redis(args.redis, **targets.config_args(args))
    if args.watch is not None and args.watch <= 0:
        from app.errors import ConfigError

        raise ConfigError("--watch", f"must be above 0 seconds, got {args.watch:g}")
    reader = _Reader(
        redis, pod_prefix=config.redis.key_prefix, roles_prefix=config.redis.roles_key_prefix,
        interval=config.schedule.report_interval_seconds,
    )  # fmt: skip
    out = sys.stdout

    async def main() -> int:
        try:
            if args.watch is None:
                try:
                    snapshot = await reader.read()
                except StoreUnavailable as exc:
                    print(f"jobworker: {reader.unreachable(exc)}", file=sys.stderr)
                    return 1
                _write(out, _render(snapshot, args, compact=False) + "\n")
                return 0
            return await _watch(reader, args, out)
        finally:
            await reader.aclose()

    return run_async(main)


def _render(snapshot: FleetSnapshot, args: argparse.Namespace, *, compact: bool) -> str:
    return render_json(snapshot, compact=compact) if args.json else render_table(snapshot)


async def _watch(reader: _Reader, args: argparse.Namespace, out: TextIO) -> int:
    """Refresh every `--watch` seconds until Ctrl-C (or SIGTERM): exit 0. A first read that
    fails exits 1 as without --watch; a later one is shown in place of the table."""
    in_place = out.isatty() and not args.json
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            first = await reader.read()
        except StoreUnavailable as exc:
            print(f"jobworker: {reader.unreachable(exc)}", file=sys.stderr)
            return 1
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(stop_on_signal)
            snapshot: FleetSnapshot | None = first
            problem = ""
            while _show(out, snapshot, problem, args, in_place=in_place):
                await anyio.sleep(args.watch)
                try:
                    snapshot, problem = await reader.read(), ""
                except StoreUnavailable as exc:
                    snapshot, problem = None, reader.unreachable(exc)
            tg.cancel_scope.cancel()  # the reader of the pipe went away
    if in_place:
        _write(out, "\n")
    return 0


def _show(out: TextIO, snapshot: FleetSnapshot | None, problem: str, args: argparse.Namespace,
          *, in_place: bool) -> bool:  # fmt: skip
    """Write one refresh; False when nobody reads any more."""
    if snapshot is None:
        text = json.dumps({"error": problem}) if args.json else f"jobworker: {problem}"
    else:
        text = _render(snapshot, args, compact=True)
    if in_place:
        return _write(out, f"{CLEAR}{text}\nevery {args.watch:g}s; Ctrl-C to stop\n")
    return _write(out, text + ("\n" if args.json else "\n\n"))


def _write(out: TextIO, text: str) -> bool:
    """Write and flush; False (and stdout quietly on /dev/null) when the reader went away
    (`jobworker status --watch | head`)."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        # what is still buffered would fail again at exit, with a message: drop it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return False
    return True


def add_parsers(sub: Any) -> None:
    """`status`, on the `jobworker` subparsers `sub`."""
    p = sub.add_parser(
        "status",
        help="the fleet from Redis as a table (--json, --watch); --worker: one worker's status",
        description=DESCRIPTION,
        epilog=targets.env_help("worker", redis=True, flag="--worker"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the fleet as JSON")
    p.add_argument(
        "--watch", nargs="?", type=float, const=DEFAULT_WATCH_SECONDS, metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C: in place"
        " on a terminal, one table per refresh when piped",
    )  # fmt: skip
    p.add_argument(
        "--redis", metavar="URL",
        help="the Redis to read (default: $REDIS_URL / the config's [redis], else a running"
        " `jobworker dev`'s)",
    )  # fmt: skip
    p.add_argument(
        "--worker", nargs="?", const="", metavar="HOST:PORT",
        help="ask one worker for its own status (GetStatus) instead; without HOST:PORT the"
        " worker target ($JOBWORKER_TARGET, client.worker, `jobworker dev`'s worker-1,"
        " localhost:9091)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float,
        help="seconds to wait for --worker's answer (default 10)",
    )  # fmt: skip
    targets.add_config_options(p)
    p.set_defaults(func=_status)
