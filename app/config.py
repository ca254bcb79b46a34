"""Configuration: TOML profiles decoded into msgspec Structs, with environment overrides.

Layers, later ones winning (the seed's `application.yml` + `application-<profile>.yml`):

1. `app/profiles/application.toml`, then `app/profiles/application-<PROFILE>.toml`;
2. the same two names in an external config folder (`--config-dir` or `JOBWORKER_CONFIG_DIR`);
3. `JOBWORKER_<SECTION>__<KEY>=value` for any key (the value read as a TOML value when it parses
   as one, else as a string), and `REDIS_URL` for `redis.url`;
4. command-line options.

A value of the wrong type or out of range raises `ConfigError` naming the key and its source.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from app.errors import ConfigError

PROFILES_DIR = Path(__file__).with_name("profiles")
ENV_PREFIX = "JOBWORKER_"
DEFAULT_PROFILE = "local"


class _Section(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    pass


def _check(ok: bool, key: str, problem: str) -> None:
    # msgspec turns a ValueError raised in __post_init__ into a ValidationError at this path
    if not ok:
        raise ValueError(f"{problem} (`{key}`)")


class GrpcConfig(_Section, frozen=True):
    """The gRPC listener. `port` unset: the last port the worker chose itself, else 9091."""

    host: str = "0.0.0.0"
    # the address written to PodInfo.ip (and RoleInfo.ip by the orchestrator and trigger);
    # empty: the bound host, or this host's name resolved
    advertise_ip: str = ""
    # the port written to PodInfo.grpcPort when others reach this worker through a proxy or NAT
    advertise_port: int = 0
    port: int | None = None
    default_port: int = 9091
    # how many neighbours above the first port to try before an ephemeral one
    port_search: int = 50
    remember_port: bool = True
    # seconds that in-flight RPCs get when the server closes
    close_grace_seconds: float = 2.0
    # the fast path for unary calls (app/grpc/fastpath/); false: grpclib's own server and codec.
    # Read by every role that serves gRPC; it falls back by itself if grpclib/h2 changed
    fast_path: bool = True
    # the largest request message (gRPC's default): past it RESOURCE_EXHAUSTED, before it is read
    max_receive_message_bytes: int = 4 * 1024 * 1024
    # HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: request headers past it close the connection
    # (grpc-core's hard limit; hpack decodes a header block in time linear in its size)
    max_header_list_bytes: int = 16 * 1024
    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection (h2's default, which served until
    # this was a setting; a grpclib or grpcio client queues calls past it, it does not fail them)
    max_concurrent_streams: int = 100
    # a connection that has not sent the HTTP/2 preface and SETTINGS by then is closed
    handshake_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check(self.port is None or 0 <= self.port <= 65535, "port", "must be 0..65535")
        _check(1024 <= self.max_receive_message_bytes <= 2**31 - 1, "max_receive_message_bytes",
               "must be 1024..2147483647")  # fmt: skip
        _check(1024 <= self.max_header_list_bytes <= 1024 * 1024, "max_header_list_bytes",
               "must be 1024..1048576")  # fmt: skip
        _check(1 <= self.max_concurrent_streams <= 2**31 - 1, "max_concurrent_streams",
               "must be 1..2147483647")  # fmt: skip
        _check(0 < self.handshake_timeout_seconds <= 3600, "handshake_timeout_seconds",
               "must be above 0 and at most 3600")  # fmt: skip
        _check(0 <= self.advertise_port <= 65535, "advertise_port", "must be 0..65535")
        _check(1 <= self.default_port <= 65535, "default_port", "must be 1..65535")
        _check(0 <= self.port_search <= 1000, "port_search", "must be 0..1000")


class WorkerConfig(_Section, frozen=True):
    """The job master: Spring's ThreadPoolTaskExecutor(core, max, queue) plus the watermark."""

    core_size: int = 4
    max_size: int = 8
    queue_capacity: int = 100
    # percent of max_size in use at or under which the worker reports IDLE
    watermark: int = 80
    keep_alive_seconds: float = 60.0
    # 0: no timeout unless the request sets one
    default_timeout_seconds: float = 0.0
    drain_grace_seconds: float = 30.0
    # finished runs remembered for GetJob and for attaching a repeated RunWork
    history_size: int = 1000
    # ...and at most this many bytes of their parameters, results and errors (oldest go first)
    history_max_bytes: int = 64 * 1024 * 1024
    # a job whose JSON result is larger ends FAILED: results travel in replies and records
    max_result_bytes: int = 1024 * 1024
    # modules whose @job functions are registered next to the built-ins
    job_modules: list[str] = msgspec.field(default_factory=list)
    builtin_jobs: bool = True

    def __post_init__(self) -> None:
        _check(self.core_size >= 1, "core_size", "must be at least 1")
        _check(self.max_size >= self.core_size, "max_size", "must be at least core_size")
        _check(self.queue_capacity >= 0, "queue_capacity", "must be 0 or more")
        _check(0 <= self.watermark <= 100, "watermark", "must be 0..100")
        _check(self.keep_alive_seconds >= 0, "keep_alive_seconds", "must be 0 or more")
        _check(self.default_timeout_seconds >= 0, "default_timeout_seconds", "must be 0 or more")
        _check(self.drain_grace_seconds >= 0, "drain_grace_seconds", "must be 0 or more")
        _check(self.history_size >= 0, "history_size", "must be 0 or more")
        _check(self.history_max_bytes >= 0, "history_max_bytes", "must be 0 or more")
        _check(self.max_result_bytes >= 1, "max_result_bytes", "must be at least 1")


class ScheduleConfig(_Section, frozen=True):
    """The scheduler's built-in schedules."""

    report_interval_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check(self.report_interval_seconds > 0, "report_interval_seconds", "must be above 0")


class RedisConfig(_Section, frozen=True):
    """Where PodInfo goes. No `url`, `host` or `sentinels`: an embedded redis-server is started.

    `host`/`port`/`tls` mirror the seed's `aws.elasticache.valkey.endpoint.*` (TLS gives
    `rediss://`); `url` wins when both are set. With `sentinels` (and `master_name`), Redis
    Sentinel is asked for the master, and again after a fail-over (`tls`, `db`, `username`
    and `password` apply to the master; the sentinels are asked without credentials).
    """

    url: str = ""
    host: str = ""
    port: int = 6379
    tls: bool = False
    username: str = ""
    password: str = ""
    db: int = 0
    key_prefix: str = "wpm-apps"
    # orchestrators and triggers register here (`<prefix>:<role>:<ip>:<pid>`, an index per role),
    # apart from the workers' PodInfo, which the orchestrators' worker directory reads
    roles_key_prefix: str = "wpm-roles"
    ttl_seconds: int = 60
    connect_timeout_seconds: float = 2.0
    # connections each process keeps to Redis at most (the health check, the pub/sub
    # subscription and the worker registry have a few of their own besides): an orchestrator
    # needs one per job in hand (`orchestrator.max_inflight`) and per client call waiting on Redis
    max_connections: int = 512
    # a call that finds every connection in use waits this long for one, then is refused as
    # busy (RESOURCE_EXHAUSTED with a retry-after), never taken for Redis being away
    pool_timeout_seconds: float = 10.0
    # the report job backs off from report_interval up to this while Redis is down
    retry_max_seconds: float = 30.0
    # how often each process checks that Redis answers (health) and still has its data
    check_interval_seconds: float = 1.0
    embedded: bool = True
    # Redis Sentinel: each sentinel's "host:port", and the name of the master they watch
    sentinels: list[str] = msgspec.field(default_factory=list)
    master_name: str = ""

    def __post_init__(self) -> None:
        _check(
            not self.url or self.url.split("://", 1)[0] in ("redis", "rediss", "unix"),
            "url",
            "must start with redis://, rediss:// or unix://",
        )
        _check(1 <= self.port <= 65535, "port", "must be 1..65535")
        _check(self.ttl_seconds >= 1, "ttl_seconds", "must be at least 1")
        _check(bool(self.key_prefix), "key_prefix", "must not be empty")
        _check(bool(self.roles_key_prefix) and self.roles_key_prefix != self.key_prefix,
               "roles_key_prefix", "must not be empty nor key_prefix")  # fmt: skip
        _check(self.connect_timeout_seconds > 0, "connect_timeout_seconds", "must be above 0")
        # one for the orchestrator's blocking read of the job queue, one for everything else
        _check(2 <= self.max_connections <= 100_000, "max_connections", "must be 2..100000")
        _check(0 < self.pool_timeout_seconds <= 3600, "pool_timeout_seconds",
               "must be above 0 and at most 3600")  # fmt: skip
        _check(self.retry_max_seconds > 0, "retry_max_seconds", "must be above 0")
        _check(self.check_interval_seconds > 0, "check_interval_seconds", "must be above 0")
        for sentinel in self.sentinels:
            host, _, port = sentinel.rpartition(":")
            _check(bool(host) and port.isdigit() and 1 <= int(port) <= 65535, "sentinels",
                   f'each must be "host:port", got {sentinel!r}')  # fmt: skip
        _check(not self.sentinels or bool(self.master_name), "master_name",
               "must be set with redis.sentinels (the name the sentinels monitor)")  # fmt: skip
        _check(not self.master_name or bool(self.sentinels), "master_name",
               "needs redis.sentinels")  # fmt: skip
        _check(not self.sentinels or not (self.url or self.host), "sentinels",
               "give either redis.sentinels or redis.url/redis.host, not both")  # fmt: skip

    @property
    def configured(self) -> bool:
        """Whether `url`, `host` or `sentinels` name a server (if not, a worker may start the
        embedded one)."""
        return bool(self.url or self.host or self.sentinels)

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels as (host, port), brackets off an IPv6 host."""
        found = []
        for sentinel in self.sentinels:
            host, _, port = sentinel.rpartition(":")
            found.append((host.strip("[]"), int(port)))
        return found

    def effective_url(self) -> str:
        """`url` when set, else `redis[s]://host:port/db` (no credentials: see `create_redis`);
        with sentinels, `redis[s]+sentinel://host:port,.../master_name/db` (for logs)."""
        if self.url:
            return self.url
        scheme = "rediss" if self.tls else "redis"
        if self.sentinels:
            return f"{scheme}+sentinel://{','.join(self.sentinels)}/{self.master_name}/{self.db}"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"

    def display_url(self) -> str:
        """`effective_url()` without a password, for logs."""
        url = self.effective_url()
        scheme, sep, rest = url.partition("://")
        userinfo, at, hostpart = rest.rpartition("@")
        if not at or ":" not in userinfo:
            return url
        return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


class OrchestratorConfig(_Section, frozen=True):
    """The gateway tier: its listener, the queue, retry, breaker and discovery."""

    host: str = "0.0.0.0"
    port: int = 9090
    port_search: int = 50
    # the orchestrators' consumer group on the job stream; a name for this one (default host:pid)
    group: str = "orchestrators"
    consumer: str = ""
    stream_key: str = "wpm-jobs:stream"
    job_prefix: str = "wpm-job"
    # jobs whose record vanished while in hand (Redis lost its data), for `jobworker lost`
    lost_key: str = "wpm-jobs:lost"
    # every job by submit time, for listing recent jobs (`jobworker jobs`, ListJobs)
    index_key: str = "wpm-jobs:index"
    # jobs one orchestrator dispatches at once; the rest wait in the stream
    max_inflight: int = 256
    # queued (unfinished) jobs per job type; a submit past it gets RESOURCE_EXHAUSTED
    queue_bound_per_type: int = 10_000
    default_timeout_seconds: float = 0.0
    # how long a job may wait for a worker and run, in all
    default_deadline_seconds: float = 3600.0
    retention_seconds: int = 86_400
    max_attempts: int = 3
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 5.0
    retry_budget_ratio: float = 0.2
    retry_budget_window_seconds: float = 10.0
    breaker_failure_threshold: int = 5
    breaker_failure_rate: float = 0.5
    breaker_min_calls: int = 10
    breaker_window_seconds: float = 30.0
    breaker_open_seconds: float = 5.0
    balancer: str = "p2c"
    discovery_interval_seconds: float = 1.0
    # the workers' report interval: a PodInfo older than two of them is stale
    worker_report_interval_seconds: float = 5.0
    # an entry idle this long in another orchestrator's hands is claimed (it died)
    claim_idle_seconds: float = 10.0
    # HTTP/2 pings to a worker during a call, to notice a silent peer
    keepalive_seconds: float = 2.0
    keepalive_timeout_seconds: float = 3.0
    drain_grace_seconds: float = 10.0
    # a run still going this long after its dispatch is recorded RUNNING; a shorter one goes
    # from DISPATCHED to its end in one call and one write less (0: always, at its admission)
    running_recorded_after_seconds: float = 0.1

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", "must be 0..65535")
        _check(self.max_inflight >= 1, "max_inflight", "must be at least 1")
        _check(self.queue_bound_per_type >= 1, "queue_bound_per_type", "must be at least 1")
        _check(self.default_deadline_seconds > 0, "default_deadline_seconds", "must be above 0")
        _check(self.max_attempts >= 1, "max_attempts", "must be at least 1")
        _check(0 <= self.retry_base_seconds <= self.retry_max_seconds, "retry_base_seconds",
               "must be 0..retry_max_seconds")  # fmt: skip
        _check(0 <= self.retry_budget_ratio <= 1, "retry_budget_ratio", "must be 0..1")
        _check(self.breaker_failure_threshold >= 1, "breaker_failure_threshold", "must be >= 1")
        _check(0 < self.breaker_failure_rate <= 1, "breaker_failure_rate", "must be in (0, 1]")
        _check(self.balancer in ("p2c", "round_robin"), "balancer", "must be p2c or round_robin")
        _check(self.discovery_interval_seconds > 0, "discovery_interval_seconds", "must be > 0")
        _check(self.claim_idle_seconds > 0, "claim_idle_seconds", "must be above 0")
        _check(self.running_recorded_after_seconds >= 0, "running_recorded_after_seconds",
               "must be 0 or more")  # fmt: skip
        _check(bool(self.stream_key) and bool(self.job_prefix), "stream_key", "must not be empty")
        _check(bool(self.index_key), "index_key", "must not be empty")


class TriggerConfig(_Section, frozen=True):
    """The trigger tier: its listener, the orchestrators it submits to, leases and the ledger."""

    host: str = "0.0.0.0"
    port: int = 9089
    port_search: int = 50
    # HOST:PORT of each orchestrator; a call that cannot reach one goes to the next
    orchestrators: list[str] = msgspec.field(default_factory=lambda: ["localhost:9090"])
    key_prefix: str = "wpm-trigger"
    # this replica's name in leases and decisions (default host:pid:random)
    replica_id: str = ""
    # a schedule's lease: another replica takes it over this long after its holder stopped
    lease_seconds: float = 10.0
    # decisions kept per schedule, and for how long (by fire time)
    ledger_size: int = 1000
    ledger_retention_seconds: float = 30 * 86_400.0
    # one call to an orchestrator (a tick is retried until its misfire grace runs out)
    call_timeout_seconds: float = 5.0
    # runners in the middle of a tick get this long to finish it on SIGTERM
    drain_grace_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", "must be 0..65535")
        _check(0 <= self.port_search <= 1000, "port_search", "must be 0..1000")
        _check(bool(self.orchestrators), "orchestrators", "must name at least one HOST:PORT")
        for address in self.orchestrators:
            host, _, port = address.rpartition(":")
            _check(bool(host) and port.isdigit() and 0 < int(port) <= 65535, "orchestrators",
                   f"{address[:60]!r} is not HOST:PORT")  # fmt: skip
        _check(bool(self.key_prefix), "key_prefix", "must not be empty")
        _check(0.1 <= self.lease_seconds <= 3600, "lease_seconds", "must be 0.1..3600")
        _check(1 <= self.ledger_size <= 100_000, "ledger_size", "must be 1..100000")
        _check(self.ledger_retention_seconds >= 1, "ledger_retention_seconds", "must be >= 1")
        _check(0 < self.call_timeout_seconds <= 600, "call_timeout_seconds", "must be in (0, 600]")
        _check(self.drain_grace_seconds >= 0, "drain_grace_seconds", "must be 0 or more")


class ScheduleEntry(_Section, frozen=True):
    """One `[[schedules]]` table: a schedule the config owns (see `app.trigger.specs`; the
    trigger checks cron, zone and policies when it starts, naming the key)."""

    name: str
    job_type: str
    cron: str = ""
    interval_seconds: float = 0.0
    interval_start: str = ""
    time_zone: str = "UTC"
    dst_skipped: str = "run_at_transition"
    dst_repeated: str = "once"
    params: dict[str, str] = msgspec.field(default_factory=dict)
    overlap: str = "forbid"
    misfire_grace_seconds: float = 300.0
    jitter_seconds: float = 0.0
    deadline_seconds: float = 0.0
    timeout_seconds: float = 0.0
    priority: int = 0
    retry_on_failure: bool = False
    max_attempts: int = 0
    # created paused (a later pause or resume through the API is kept across restarts)
    paused: bool = False


class ClientConfig(_Section, frozen=True):
    """Where the client commands call: HOST:PORT of each tier (empty: `jobworker dev`'s fleet,
    else localhost on the role's configured port). A flag or `JOBWORKER_<KIND>_TARGET` wins."""

    worker: str = ""
    orchestrator: str = ""
    trigger: str = ""

    def __post_init__(self) -> None:
        for key in ("worker", "orchestrator", "trigger"):
            address: str = getattr(self, key)
            host, _, port = address.rpartition(":")
            _check(not address or (bool(host) and port.isdigit() and 0 < int(port) <= 65535),
                   key, f"{address[:60]!r} is not HOST:PORT")  # fmt: skip


class MetricsConfig(_Section, frozen=True):
    """Prometheus metrics over HTTP at /metrics. No port: off (0: any free port, logged)."""

    host: str = "0.0.0.0"
    port: int | None = None

    def __post_init__(self) -> None:
        _check(self.port is None or 0 <= self.port <= 65535, "port", "must be 0..65535")


class LogConfig(_Section, frozen=True):
    """The log level of every role: DEBUG, INFO, WARNING or ERROR (in any case); the format."""

    level: str = "INFO"
    # "text" for people, "json" for a log pipeline: one object per line
    format: str = "text"

    def __post_init__(self) -> None:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR")
        _check(self.level.upper() in levels, "level", f"must be one of {', '.join(levels)}")
        _check(self.format in ("text", "json"), "format", "must be text or json")


class Config(_Section, frozen=True):
    """The whole configuration of one process."""

    profile: str = DEFAULT_PROFILE
    grpc: GrpcConfig = msgspec.field(default_factory=GrpcConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    schedule: ScheduleConfig = msgspec.field(default_factory=ScheduleConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    orchestrator: OrchestratorConfig = msgspec.field(default_factory=OrchestratorConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    trigger: TriggerConfig = msgspec.field(default_factory=TriggerConfig)
    client: ClientConfig = msgspec.field(default_factory=ClientConfig)
    schedules: list[ScheduleEntry] = msgspec.field(default_factory=list)


def _merge(into: dict[str, Any], layer: Mapping[str, Any], source: str, origins: dict[str, str],
           path: str = "") -> None:  # fmt: skip
    for key, value in layer.items():
        dotted = f"{path}{key}"
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, origins, f"{dotted}.")
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
            origins[dotted] = source


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_layer(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The overrides in `env`, as a nested mapping, and which variable set each dotted key."""
    layer: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "JOBWORKER_CONFIG_DIR":
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(name, "empty section or key in the variable name")
        node = layer
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _env_value(raw)
        names[".".join(parts)] = name
    if env.get("REDIS_URL"):
        layer.setdefault("redis", {})["url"] = env["REDIS_URL"]
        names["redis.url"] = "REDIS_URL"
    return layer, names


_PATH_RE = re.compile(r"(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _validation_error(exc: msgspec.ValidationError, origins: Mapping[str, str]) -> ConfigError:
    match = _PATH_RE.match(str(exc))
    assert match is not None  # the pattern matches any string
    message, path = match["msg"], (match["path"] or "").lstrip(".")
    # a __post_init__ check names its own field: "must be ... (`core_size`)"
    own = re.search(r" \(`(\w+)`\)$", message)
    if own:
        message = message[: own.start()]
        path = f"{path}.{own[1]}" if path else own[1]
    unknown = re.match(r"Object contains unknown field `(\w+)`", message)
    if unknown:
        path = f"{path}.{unknown[1]}" if path else unknown[1]
        message = "unknown key"
    key = path or "config"
    # prefer the variable or file that set this key (or, for a whole section, a key inside it)
    inside = [v for k, v in origins.items() if k.startswith(f"{key}.")]
    source = origins.get(key) if key in origins and origins[key] != "environment" else None
    source = (
        source or next((v for v in inside if v.startswith(ENV_PREFIX)), None) or origins.get(key)
    )
    where = f" (from {source})" if source else ""
    return ConfigError(f"{key}{where}", message[0].lower() + message[1:] if message else "invalid")


def available_profiles(config_dir: Path | None = None) -> list[str]:
    """Profile names with an `application-<name>.toml`, bundled or in `config_dir`, sorted."""
    names = {p.stem.removeprefix("application-") for p in PROFILES_DIR.glob("application-*.toml")}
    if config_dir is not None:
        names |= {
            p.stem.removeprefix("application-") for p in config_dir.glob("application-*.toml")
        }
    return sorted(names)


def load_config(
    env: Mapping[str, str],
    *,
    profile: str | None = None,
    config_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from the profile files, `env` and command-line `overrides`.

    `overrides` maps dotted keys (`grpc.port`) to values. Raises `ConfigError`.
    """
    return load_config_with_origins(
        env, profile=profile, config_dir=config_dir, overrides=overrides
    )[0]


def load_config_with_origins(
    env: Mapping[str, str],
    *,
    profile: str | None = None,
    config_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Config, dict[str, str]]:
    """`load_config`, and where each key that was set came from: dotted key → the file's path,
    the environment variable's name, or "command line" (a key left at its default is absent).

    The client commands use it to say where the target they tried came from.
    """
    profile = profile or env.get("PROFILE") or DEFAULT_PROFILE
    if config_dir is None and env.get("JOBWORKER_CONFIG_DIR"):
        config_dir = Path(env["JOBWORKER_CONFIG_DIR"])
    if config_dir is not None and not config_dir.is_dir():
        raise ConfigError("config_dir", f"{config_dir} is not a directory")
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    folders = [PROFILES_DIR] + ([config_dir] if config_dir is not None else [])
    found_profile = False
    for folder in folders:
        for name in ("application.toml", f"application-{profile}.toml"):
            path = folder / name
            if path.is_file():
                found_profile |= name != "application.toml"
                _merge(merged, _read_toml(path), str(path), origins)
    if not found_profile:
        have = ", ".join(available_profiles(config_dir)) or "none"
        raise ConfigError("PROFILE", f"no profile named {profile!r} (have: {have})")
    layer, names = env_layer(env)
    _merge(merged, layer, "environment", origins)
    origins.update(names)
    for dotted, value in (overrides or {}).items():
        node = merged
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        origins[dotted] = "command line"
    merged["profile"] = profile
    try:
        return msgspec.convert(merged, Config, strict=False), origins
    except msgspec.ValidationError as exc:
        raise _validation_error(exc, origins) from None
