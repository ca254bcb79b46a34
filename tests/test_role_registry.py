"""The role registry (orchestrators' and triggers' RoleInfo) and its reporter.

One contract for `RoleRegistry`, run on the in-memory twin (asyncio, and trio under MockClock)
and on Redis (the session's real server): records expire, listing goes through the index, a
removed member is gone at once. Then the `RoleReporter` on the twin: reports on its interval,
says DRAINING when told, removes its record on close and writes nothing after; and the pure
stale marks of `app.fleet.fleet_view`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
import trio.testing

from app.errors import StoreUnavailable
from app.fleet.fleet_view import fleet_members, stale_reason
from app.fleet.pod_info import PodInfo, PodStatus, encode_pod_info
from app.fleet.role_info import (
    Registration,
    Role,
    RoleInfo,
    RoleStatus,
    decode_role_info,
    encode_role_info,
)
from app.stores.abc import RoleRegistry
from app.stores.memory import MemoryRoleRegistry
from app.stores.redis.role_registry import RedisRoleRegistry
from app.stores.role_reporter import RoleReporter
from tests.helpers import RedisServer, eventually

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[("memory", "asyncio"), ("memory", "trio"), ("redis", "asyncio")],
    ids=lambda p: "-".join(p),
)
def kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param[0] == "redis":
        request.getfixturevalue("redis_client")  # the session's server, flushed
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(kind: tuple[str, str]) -> Any:
    if kind[1] == "trio":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return kind[1]


@pytest.fixture
async def registry(
    kind: tuple[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[RoleRegistry]:
    if kind[0] == "memory":
        yield MemoryRoleRegistry()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis.from_url(server.url)
    try:
        yield RedisRoleRegistry(client)
    finally:
        await client.aclose()


def info(role: Role = Role.ORCHESTRATOR, pid: int = 1, **fields: Any) -> RoleInfo:
    now = time.time()
    values: dict[str, Any] = {
        "role": role, "ip": "10.0.0.1", "grpc_port": 9090, "pid": pid,
        "status": RoleStatus.SERVING, "update_datetime": "2026-01-01T00:00:00+00:00",
        "update_epoch_ms": int(now * 1000), "report_interval_seconds": 5.0,
    }  # fmt: skip
    values.update(fields)
    return RoleInfo(**values)


async def test_members_are_listed_by_role_until_they_expire(registry: RoleRegistry) -> None:
    now = time.time()
    await registry.put("orchestrator", "10.0.0.1:1", b"one", ttl_seconds=0.5, now=now)
    await registry.put("orchestrator", "10.0.0.2:2", b"two", ttl_seconds=60, now=now)
    await registry.put("trigger", "10.0.0.3:3", b"three", ttl_seconds=60, now=now)
    listed = await registry.members("orchestrator")
    assert [(m.member, m.value) for m in listed] == [("10.0.0.1:1", b"one"), ("10.0.0.2:2", b"two")]
    assert listed[0].key == "wpm-roles:orchestrator:10.0.0.1:1"
    assert listed[0].ttl_left_seconds is not None
    assert 0 < listed[0].ttl_left_seconds <= 0.5
    assert listed[1].ttl_left_seconds is not None
    assert 59 < listed[1].ttl_left_seconds <= 60
    assert [m.member for m in await registry.members("trigger")] == ["10.0.0.3:3"]
    assert await registry.members("worker") == []
    # a put renews the record, and its TTL
    await registry.put("orchestrator", "10.0.0.2:2", b"two again", ttl_seconds=60, now=now)
    await anyio.sleep(0.7)
    listed = await registry.members("orchestrator")
    assert [(m.member, m.value) for m in listed] == [("10.0.0.2:2", b"two again")]


async def test_a_removed_member_is_gone_at_once(registry: RoleRegistry) -> None:
    now = time.time()
    await registry.put("trigger", "a:1", b"x", ttl_seconds=60, now=now)
    await registry.put("trigger", "b:2", b"y", ttl_seconds=60, now=now)
    await registry.remove("trigger", "a:1")
    await registry.remove("trigger", "nobody:0")  # fine when it is not there
    assert [m.member for m in await registry.members("trigger")] == ["b:2"]


async def test_a_put_drops_index_entries_expired_long_ago(registry: RoleRegistry) -> None:
    now = time.time()
    # an entry written an hour ago with a minute's TTL: its writer died long since
    await registry.put("orchestrator", "old:1", b"x", ttl_seconds=60, now=now - 3600)
    await registry.put("orchestrator", "new:2", b"y", ttl_seconds=60, now=now)
    if isinstance(registry, RedisRoleRegistry):
        client = registry._redis
        index = await client.zrange(registry.index_key("orchestrator"), 0, -1)
        assert index == [b"new:2"]
    else:
        assert isinstance(registry, MemoryRoleRegistry)
        assert list(registry._index["orchestrator"]) == ["new:2"]


@pytest.mark.parametrize("kind", [("redis", "asyncio")], indirect=True, ids=["redis-asyncio"])
async def test_the_redis_registry_says_when_redis_is_away(kind: tuple[str, str]) -> None:
    from tests.helpers import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreUnavailable, match="Redis unavailable during a role's"):
            await RedisRoleRegistry(client).put("trigger", "a:1", b"x", ttl_seconds=1, now=0)
    finally:
        await client.aclose()


async def test_the_reporter_reports_drains_and_removes(registry: RoleRegistry) -> None:
    draining = False
    reports = 0

    def snapshot() -> RoleInfo:
        nonlocal reports
        reports += 1
        status = RoleStatus.DRAINING if draining else RoleStatus.SERVING
        return info(Role.TRIGGER, pid=7, status=status, schedules_held=reports)

    reporter = RoleReporter(registry, snapshot, ttl_seconds=30, interval_seconds=0.05)

    async def stored() -> RoleInfo | None:
        found = await registry.members("trigger")
        return decode_role_info(found[0].value) if found else None

    async with anyio.create_task_group() as tg:
        await tg.start(reporter.run)
        first = await stored()
        assert first is not None
        assert first.status is RoleStatus.SERVING
        assert first.member == "10.0.0.1:7"
        assert first.address == "10.0.0.1:9090"
        # refreshed on the interval: the load it carries is read live each time
        await eventually(lambda: reporter.reports >= 3)

        async def refreshed() -> bool:
            now = await stored()
            return now is not None and now.schedules_held >= 3

        await eventually(refreshed)
        draining = True
        assert await reporter.report(force=True)
        now = await stored()
        assert now is not None
        assert now.status is RoleStatus.DRAINING
        with anyio.CancelScope(shield=True):
            await reporter.close()
        assert await stored() is None
        # closed: neither the loop nor a forced report writes it again
        assert not await reporter.report(force=True)
        written = reporter.reports
        await anyio.sleep(0.2)
        assert await stored() is None
        assert reporter.reports == written
        tg.cancel_scope.cancel()
    assert "STOPPED" in repr(reporter)


async def test_a_reporter_that_never_wrote_removes_nothing(registry: RoleRegistry) -> None:
    await registry.put("orchestrator", "10.0.0.1:1", b"someone else's", ttl_seconds=30, now=0)
    reporter = RoleReporter(registry, lambda: info(pid=1))
    await reporter.close()  # never reported (Redis was never there): leaves the key alone
    assert [m.value for m in await registry.members("orchestrator")] == [b"someone else's"]


class _Away:
    """A registry that cannot be reached."""

    async def put(self, role: str, member: str, value: bytes, *, ttl_seconds: float,
                  now: float) -> None:  # fmt: skip
        raise StoreUnavailable("Redis unavailable during a role's registration: refused")

    async def remove(self, role: str, member: str) -> None:
        raise StoreUnavailable("refused")

    async def members(self, role: str) -> list[Registration]:
        raise StoreUnavailable("refused")


@pytest.mark.parametrize("kind", [("memory", "asyncio"), ("memory", "trio")], indirect=True,
                         ids=["asyncio", "trio"])  # fmt: skip
async def test_the_reporter_goes_on_while_redis_is_away(kind: tuple[str, str]) -> None:
    reporter = RoleReporter(_Away(), lambda: info(), interval_seconds=0.01)
    with anyio.move_on_after(0.1):
        await reporter.run()
    assert reporter.reports == 0
    assert reporter.failures >= 3
    await reporter.close()  # nothing was written: nothing to remove, no error


# --- the fleet as `status` shows it (pure) ----------------------------------------------------


def test_stale_marks() -> None:
    assert stale_reason(1.0, 5.0, 55.0) is None
    assert stale_reason(10.0, 5.0, 50.0) is None  # two intervals: not yet
    assert stale_reason(10.5, 5.0, 49.5) == "last report 10.5s ago (reports every 5s)"
    assert stale_reason(1.0, 5.0, 4.0) == "its record expires in 4.0s"
    assert stale_reason(None, 5.0, 30.0) == "its record carries no report time"


def test_fleet_members_decode_every_role_and_mark_the_stale() -> None:
    now = 1_000_000.0
    fresh = info(Role.ORCHESTRATOR, pid=2, update_epoch_ms=int((now - 1) * 1000), inflight=3,
                 max_inflight=256, waiting=1)  # fmt: skip
    old = info(Role.TRIGGER, pid=3, update_epoch_ms=int((now - 30) * 1000), schedules_held=2,
               schedules=5, replicas=2)  # fmt: skip
    pod = PodInfo(grpc_port=9091, status=PodStatus.BUSY, update_datetime="x",
                  update_epoch_ms=int((now - 0.15) * 1000), ip="10.0.0.9", pid=4, active=7,
                  max_size=8, queued=2, queue_capacity=100, version="1.2",
                  report_interval_seconds=0.1)  # fmt: skip

    def reg(key: str, raw: bytes, ttl: float | None = 50.0) -> Registration:
        return Registration(key=key, member=key, value=raw, ttl_left_seconds=ttl)

    found = {
        Role.WORKER: [reg("wpm-apps:10.0.0.9:4", encode_pod_info(pod)),
                      reg("wpm-apps:junk", b"not json")],
        Role.ORCHESTRATOR: [reg("o", encode_role_info(fresh))],
        Role.TRIGGER: [reg("t", encode_role_info(old))],
    }  # fmt: skip
    members = fleet_members(found, now=now, default_interval=5.0)
    assert [(m.role, m.address) for m in members] == [
        (Role.TRIGGER, "10.0.0.1:9090"), (Role.ORCHESTRATOR, "10.0.0.1:9090"),
        (Role.WORKER, "10.0.0.9:9091"), (Role.WORKER, "?"),
    ]  # fmt: skip
    trigger, orchestrator, worker, junk = members
    assert trigger.stale
    assert trigger.stale_reason.startswith("last report 30.0s ago")
    assert trigger.load == "2/5 schedules, 2 replica(s)"
    assert not orchestrator.stale
    assert orchestrator.load == "3/256 in flight, 1 waiting"
    assert orchestrator.load_detail == {"inflight": 3, "maxInflight": 256, "waiting": 1}
    # the worker says its own interval (0.1 s): its 0.15 s old report is fresh
    assert worker.report_interval_seconds == 0.1
    assert not worker.stale
    assert (worker.status, worker.version, worker.pid) == ("BUSY", "1.2", 4)
    assert worker.load == "7/8 active, 2/100 queued"
    assert junk.stale
    assert junk.stale_reason.startswith("unreadable record: ")
    as_json = msgspec.json.decode(msgspec.json.encode(orchestrator))
    assert {"role", "address", "pid", "port", "status", "load", "reportAgeSeconds", "version",
            "stale", "staleReason", "ttlLeftSeconds"} <= set(as_json)  # fmt: skip
