"""Regenerate docs/config.md, the reference of every configuration key, from app/config.py.

    python tools/gen_config_docs.py            # rewrite docs/config.md
    python tools/gen_config_docs.py --check    # exit 1 when it is stale or a key has no meaning

Keys, types and defaults come from the config Structs (the defaults as the packaged `local`
profile gives them, and the `live` profile's where it differs); what each key means comes from
MEANINGS below. A key added to a Struct without a line here fails the check, naming it.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.config import ENV_PREFIX, Config, load_config  # noqa: E402

OUT = ROOT / "docs" / "config.md"
PROFILES = ("local", "live")

MEANINGS: dict[str, str] = {
    "profile": "the profile whose `application-<profile>.toml` is read (`PROFILE`, `--profile`)",
    # [grpc]
    "grpc.host": "address the worker's gRPC server binds (`worker --host`)",
    "grpc.advertise_ip": "address written to PodInfo.ip (and an orchestrator's or trigger's"
    " RoleInfo.ip) for others to call; empty: the bound address, else this host's name resolved"
    " (Kubernetes: the pod IP)",
    "grpc.advertise_port": "port written to PodInfo.grpcPort when others reach the worker"
    " through a proxy or NAT; 0: the bound port",
    "grpc.port": "the worker's port (`worker --port`); unset: the last port it chose itself,"
    " else `default_port`; a port given here is never remembered",
    "grpc.default_port": "the first port tried when no port is given and none is remembered",
    "grpc.port_search": "neighbours above the first port tried before an ephemeral port",
    "grpc.remember_port": "remember the port the worker chose itself, in"
    " `$XDG_STATE_HOME/jobworker/last-port`, for its next start",
    "grpc.close_grace_seconds": "what in-flight RPCs get when the server closes",
    "grpc.fast_path": "the fast path for unary calls; false: grpclib's own path and codec for"
    " every call (every role that serves gRPC reads it)",
    "grpc.max_receive_message_bytes": "largest request message; past it RESOURCE_EXHAUSTED,"
    " answered before the message is read",
    "grpc.max_header_list_bytes": "HTTP/2 MAX_HEADER_LIST_SIZE: request headers past it close"
    " the connection",
    "grpc.max_concurrent_streams": "HTTP/2 MAX_CONCURRENT_STREAMS per connection",
    "grpc.handshake_timeout_seconds": "a connection without the HTTP/2 preface and SETTINGS by"
    " then is closed",
    # [worker]
    "worker.core_size": "jobs that run at once (the seed's `thread-pool.core-size`)",
    "worker.max_size": "what a full queue lets the pool grow to (`thread-pool.max-size`)",
    "worker.queue_capacity": "jobs waiting for a runner; past it RESOURCE_EXHAUSTED"
    " (`thread-pool.queue-capacity`)",
    "worker.watermark": "percent of `max_size` in use at or under which the worker reports IDLE,"
    " else BUSY (`thread-pool.watermark`)",
    "worker.keep_alive_seconds": "runners above `core_size` are given back after this long"
    " without job activity",
    "worker.default_timeout_seconds": "a job's run time limit when its request sets none; 0: none",
    "worker.drain_grace_seconds": "on SIGTERM, running and queued jobs get this long to finish,"
    " then they are cancelled",
    "worker.history_size": "finished jobs remembered for GetJob and for attaching a repeated"
    " RunWork",
    "worker.history_max_bytes": "...and at most this many bytes of their parameters, results"
    " and errors (the oldest go first)",
    "worker.max_result_bytes": "a job whose JSON result is larger ends FAILED saying so",
    "worker.job_modules": "modules whose `@job` functions are registered next to the built-ins"
    " (`worker --jobs`, repeatable, adds to them; the current directory is on the import path)",
    "worker.builtin_jobs": "register the built-in jobs (`demo`, `echo`, `sleep`, `block`, `fail`)",
    # [schedule]
    "schedule.report_interval_seconds": "how often the worker writes its PodInfo"
    " (the seed's ApplicationInfoReportJob period), and an orchestrator or trigger its"
    " RoleInfo; `jobworker status` marks a record older than two of them stale",
    # [redis]
    "redis.url": "the Redis endpoint: `redis://`, `rediss://` (TLS) or `unix://` (`REDIS_URL`);"
    " wins over `host`; none and no `host`: a worker embeds a redis-server",
    "redis.host": "the endpoint's host when no `url` is given"
    " (the seed's `aws.elasticache.valkey.endpoint.host`)",
    "redis.port": "the endpoint's port with `host` (`aws.elasticache.valkey.endpoint.port`)",
    "redis.tls": "`rediss://` for `host` (the seed's ElastiCache endpoint is TLS)",
    "redis.username": "ACL user, when the URL carries none",
    "redis.password": "password, when the URL carries none",
    "redis.db": "database number with `host` (a `url` names its own)",
    "redis.check_interval_seconds": "how often each process checks Redis: health turns"
    " NOT_SERVING while it is away, and a Redis that lost its data is noticed",
    "redis.sentinels": "Redis Sentinel: each sentinel's `host:port`; the client asks them for"
    " the master, and again after a fail-over (README: Redis faults)",
    "redis.master_name": "with `sentinels`: the name of the master they watch",
    "redis.key_prefix": "prefix of the PodInfo keys, `<prefix>:<ip>:<pid>`",
    "redis.roles_key_prefix": "prefix of the orchestrators' and triggers' RoleInfo keys,"
    " `<prefix>:<role>:<ip>:<pid>`, each role listed by the ZSET `<prefix>:<role>` (read by"
    " `jobworker status`)",
    "redis.ttl_seconds": "expiry of a PodInfo or RoleInfo key (refreshed every report)",
    "redis.connect_timeout_seconds": "connect and socket timeout of every Redis call",
    "redis.max_connections": "connections a process keeps to Redis at most; a call past them"
    " waits for one (the health check, the pub/sub subscription and the registries of"
    " processes have 6 of their own)",
    "redis.pool_timeout_seconds": "how long a call waits for a free connection before it is"
    " refused as busy (RESOURCE_EXHAUSTED with a retry-after; never taken for Redis being away)",
    "redis.retry_max_seconds": "while Redis is down, the worker's reports back off from the report"
    " interval up to this",
    "redis.embedded": "with no Redis configured, a worker starts a private redis-server of its"
    " own (false: it refuses to start)",
    # [orchestrator]
    "orchestrator.host": "address the orchestrator's gRPC server binds (`orchestrator --host`)",
    "orchestrator.port": "the orchestrator's gRPC port (`orchestrator --port`; server-cloud's)",
    "orchestrator.port_search": "neighbours above `port` tried before an ephemeral port",
    "orchestrator.group": "the orchestrators' consumer group on the job stream",
    "orchestrator.consumer": "this orchestrator's name in the group; empty: `host:pid`",
    "orchestrator.stream_key": "the job queue's Redis stream",
    "orchestrator.job_prefix": "prefix of the job records, `<prefix>:<id>`",
    "orchestrator.max_inflight": "jobs one orchestrator dispatches at once; the rest wait in the"
    " stream",
    "orchestrator.queue_bound_per_type": "unfinished jobs per job type; a submit past it gets"
    " RESOURCE_EXHAUSTED with a retry-after",
    "orchestrator.default_timeout_seconds": "a job's run time limit on its worker when the"
    " request sets none; 0: none",
    "orchestrator.default_deadline_seconds": "how long a job may wait for a worker and run, in"
    " all, when the request sets no deadline",
    "orchestrator.retention_seconds": "how long a job's record is kept after it ended",
    "orchestrator.max_attempts": "attempts per job, the first included, when the request sets"
    " none (Retry)",
    "orchestrator.retry_base_seconds": "first backoff before a retry (exponential, full jitter)",
    "orchestrator.retry_max_seconds": "longest backoff before a retry",
    "orchestrator.retry_budget_ratio": "retries at most this share of the calls over the window;"
    " past it, retries wait (a retry after a worker vanished is not counted)",
    "orchestrator.retry_budget_window_seconds": "the retry budget's window",
    "orchestrator.breaker_failure_threshold": "consecutive failures that open a worker's breaker",
    "orchestrator.breaker_failure_rate": "failure rate over the window that opens it...",
    "orchestrator.breaker_min_calls": "...once the window holds at least this many calls",
    "orchestrator.breaker_window_seconds": "the window of the breaker's failure rate",
    "orchestrator.breaker_open_seconds": "how long an open breaker sends nothing before it lets"
    " one probe through (half open)",
    "orchestrator.lost_key": "where an orchestrator notes jobs in hand whose records Redis"
    " forgot, for `jobworker lost`",
    "orchestrator.index_key": "every job by submit time (a sorted set, one entry per job), for"
    " `jobworker jobs` and ListJobs; entries go once their record has expired",
    "orchestrator.balancer": "`p2c` (the less loaded of two random picks) or `round_robin`",
    "orchestrator.discovery_interval_seconds": "how often the workers' PodInfo is read again",
    "orchestrator.worker_report_interval_seconds": "the workers' report interval: a PodInfo"
    " older than two of them is stale",
    "orchestrator.claim_idle_seconds": "a queue entry idle this long in another orchestrator's"
    " hands is claimed (that one stopped)",
    "orchestrator.keepalive_seconds": "HTTP/2 pings to a worker during a call",
    "orchestrator.keepalive_timeout_seconds": "a worker that does not answer a ping within this"
    " has its call broken",
    "orchestrator.running_recorded_after_seconds": "a run still going this long after its"
    " dispatch is recorded RUNNING; a shorter one goes from DISPATCHED straight to its end, in"
    " one call to its worker and one write less (0: every run, at its admission)",
    "orchestrator.drain_grace_seconds": "on SIGTERM, jobs in hand get this long to end; the rest"
    " stay in the stream for another orchestrator",
    # [trigger]
    "trigger.host": "address the trigger's gRPC server binds (`trigger --host`)",
    "trigger.port": "the trigger's gRPC port (`trigger --port`; server-batch's)",
    "trigger.port_search": "neighbours above `port` tried before an ephemeral port",
    "trigger.orchestrators": "HOST:PORT of each orchestrator it submits to; a call that cannot"
    " reach one goes to the next (`trigger --orchestrator`, repeatable)",
    "trigger.key_prefix": "prefix of the trigger's Redis keys (schedules, leases, cursors, ledger)",
    "trigger.replica_id": "this replica's name in leases and decisions; empty: `host:pid:random`,"
    " unique per process",
    "trigger.lease_seconds": "a schedule's lease: another replica takes it over this long after"
    " its holder stopped (a misfire grace must be at least twice it)",
    "trigger.ledger_size": "decisions kept per schedule",
    "trigger.ledger_retention_seconds": "...and for how long, by fire time",
    "trigger.call_timeout_seconds": "one call to an orchestrator (a tick is retried until its"
    " misfire grace runs out)",
    "trigger.drain_grace_seconds": "on SIGTERM, runners in the middle of a tick get this long to"
    " finish it",
    # [[schedules]]
    "schedules.name": "the schedule's name: letters, digits and `_.-`; part of its jobs' ids"
    " (`name@2026-03-08T07:00:00Z`)",
    "schedules.job_type": "the job to submit (a worker's job name)",
    "schedules.cron": "5 fields, 6 with seconds first, or a macro (`@daily`); or"
    " `interval_seconds`",
    "schedules.interval_seconds": "an interval instead of `cron`, on a grid from `interval_start`",
    "schedules.interval_start": "where the interval's grid starts (ISO 8601; empty: the epoch, so"
    " every replica computes the same fire times)",
    "schedules.time_zone": "IANA zone of the cron expression",
    "schedules.dst_skipped": "a fire time in the spring-forward gap: `run_at_transition` or `skip`",
    "schedules.dst_repeated": "a fire time in the fall-back hour: `once` or `twice`",
    "schedules.params": "the job's parameters",
    "schedules.overlap": "when the previous fire time's job still runs: `forbid` (skip this one),"
    " `allow`, or `replace` (cancel it, then submit)",
    "schedules.misfire_grace_seconds": "how late a fire time may still be submitted (at least"
    " twice `trigger.lease_seconds`); later, it is recorded missed",
    "schedules.jitter_seconds": "delay each fire time by up to this (a fixed fraction per schedule"
    " and fire time, the same on every replica)",
    "schedules.deadline_seconds": "the job's deadline (waiting and running); 0: the orchestrator's"
    " default",
    "schedules.timeout_seconds": "the job's run time limit; 0: the orchestrator's default",
    "schedules.priority": "the job's priority, 0 to 9",
    "schedules.retry_on_failure": "retry a run that failed (not only one whose worker vanished)",
    "schedules.max_attempts": "the job's attempts; 0: the orchestrator's default",
    "schedules.paused": "created paused (a later pause or resume through the API is kept across"
    " restarts)",
    # [client]
    "client.worker": "the worker the client commands call (`status --worker`, `submit`, `job`,"
    " `health`...); empty: a running `jobworker dev`'s, else localhost on `grpc.port`;"
    " `--target` and `JOBWORKER_TARGET` win",
    "client.orchestrator": "the orchestrator the client commands call (`jobs`, `workers`);"
    " empty: a running `jobworker dev`'s, else localhost on `orchestrator.port`; `--target`"
    " and `JOBWORKER_ORCHESTRATOR_TARGET` win",
    "client.trigger": "the trigger replica the client commands call (`schedules`, `why`);"
    " empty: a running `jobworker dev`'s, else localhost on `trigger.port`; `--target` and"
    " `JOBWORKER_TRIGGER_TARGET` win",
    # [metrics]
    "metrics.host": "address /metrics, /healthz and /readyz bind",
    "metrics.port": "their port; unset: off; 0: any free port (logged)",
    # [log]
    "log.level": "DEBUG, INFO, WARNING or ERROR, in any case",
    "log.format": "`text` for people, `json` for a log pipeline: one object per line with `ts`,"
    " `level`, `logger`, `message` and `job_id`, `schedule`, `worker` when the line concerns one"
    " (`--log-format`)",
}


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or unset" if type(None) in typing.get_args(tp) else "")
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"table of {_type_name(key)} to {_type_name(value)}"
    return getattr(tp, "__name__", str(tp))


def _default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return msgspec.NODEFAULT


def _shown(key: str, value: Any) -> str:
    if value is msgspec.NODEFAULT:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = f"`{msgspec.json.encode(value).decode()}`"
    if key.endswith("_seconds") and isinstance(value, int) and value >= 3600:
        for unit, size in (("day", 86_400), ("hour", 3600)):
            if value % size == 0:
                n = value // size
                return f"{text} ({n} {unit}{'s' if n > 1 else ''})"
    if key.endswith("_bytes") and isinstance(value, int) and value >= 1024:
        for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
            if value % size == 0:
                return f"{text} ({value // size} {unit})"
    return text


def _rows(
    prefix: str, struct: type[msgspec.Struct], values: dict[str, Any], keys: list[str]
) -> list[str]:
    """The table rows of `struct`'s fields; each field's dotted key is added to `keys`."""
    rows = []
    for field in msgspec.structs.fields(struct):
        key = f"{prefix}{field.name}"
        keys.append(key)
        meaning = MEANINGS.get(key, "**undocumented**")
        default = _shown(key, values["local"].get(field.name, _default(field)))
        live = _shown(key, values["live"].get(field.name, _default(field)))
        if live != default:
            default += f" (live: {live})"
        rows.append(f"| `{field.name}` | {_type_name(field.type)} | {default} | {meaning} |")
    return rows


def render() -> tuple[str, list[str]]:
    """docs/config.md's text, and every key it lists."""
    configs = {p: load_config({}, profile=p) for p in PROFILES}
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by tools/gen_config_docs.py from app/config.py: edit the meanings there,"
        " then run it. tests/test_config_reference.py fails when this file is stale or a key"
        " has no meaning. -->",
        "",
        "Every key of every role. Layers, later ones winning: the packaged profile files"
        " (`app/profiles/application.toml`, then `application-<PROFILE>.toml`), the same names"
        " in an external folder (`--config-dir` or `JOBWORKER_CONFIG_DIR`), environment"
        f" variables (`{ENV_PREFIX}<SECTION>__<KEY>` for any key, e.g."
        f" `{ENV_PREFIX}WORKER__CORE_SIZE=8`; `REDIS_URL` for `redis.url`), then command-line"
        " options. A bad value stops the process with exit code 2 and one line naming the key"
        " and where it came from.",
        "",
        "Defaults are what the packaged `local` profile gives (the default profile), with the"
        " `live` profile's value where it differs.",
        "",
    ]
    top: list[str] = []
    keys: list[str] = []
    sections: list[str] = []
    for field in msgspec.structs.fields(Config):
        values = {p: getattr(c, field.name) for p, c in configs.items()}
        inner = typing.get_args(field.type)
        if isinstance(values["local"], msgspec.Struct):
            struct = type(values["local"])
            heading, fields = (
                f"[{field.name}]",
                {p: msgspec.structs.asdict(v) for p, v in values.items()},
            )
        elif inner and isinstance(inner[0], type) and issubclass(inner[0], msgspec.Struct):
            struct, heading = inner[0], f"[[{field.name}]] (each table of the list)"
            fields = {p: {} for p in values}
        else:
            top.append(field.name)
            continue
        rows = _rows(f"{field.name}.", struct, fields, keys)
        doc = " ".join((struct.__doc__ or "").strip().split("\n\n")[0].split())
        sections += [f"## {heading}", "", doc, "", "| key | type | default | meaning |",
                     "|---|---|---|---|", *rows, ""]  # fmt: skip
    if top:
        out += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name in top:
            field = next(f for f in msgspec.structs.fields(Config) if f.name == name)
            keys.append(name)
            out.append(
                f"| `{name}` | {_type_name(field.type)} | {_shown(name, _default(field))}"
                f" | {MEANINGS.get(name, '**undocumented**')} |"
            )
        out.append("")
    out += sections
    return "\n".join(out), keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text, keys = render()
    missing = [k for k in keys if k not in MEANINGS]
    unused = sorted(set(MEANINGS) - set(keys))
    problems = []
    if missing:
        problems.append(f"keys with no meaning in MEANINGS: {', '.join(missing)}")
    if unused:
        problems.append(f"meanings of keys that are gone: {', '.join(unused)}")
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            problems.append(
                f"{OUT.relative_to(ROOT)} is stale: run python tools/gen_config_docs.py"
            )
    else:
        OUT.write_text(text)
    for problem in problems:
        print(f"gen_config_docs: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
