"""The contract of `ScheduleStore` (app/stores/abc.py), run against both implementations.

- `memory-asyncio`, `memory-trio`: `MemoryScheduleStore`; on trio under MockClock(autojump), so
  lease expiry takes no real time;
- `redis-asyncio`: `RedisScheduleStore` on the session's real redis-server, FLUSHDB per test.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import trio.testing

from app.errors import StoreUnavailable
from app.fleet.schedules import PendingTick, ScheduleSpec, TickDecision, TickKind
from app.stores.abc import DecideResult, PutMode, PutResult, ScheduleStore
from app.stores.memory import MemoryScheduleStore
from app.stores.redis.schedule_store import RedisScheduleStore
from tests.helpers import RedisServer, eventually

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
LEDGER_SIZE = 5
RETENTION = 1000.0


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
async def store(
    kind: tuple[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[ScheduleStore]:
    if kind[0] == "memory":
        yield MemoryScheduleStore(ledger_size=LEDGER_SIZE, ledger_retention_seconds=RETENTION)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis.from_url(server.url)
    try:
        yield RedisScheduleStore(
            client, ledger_size=LEDGER_SIZE, ledger_retention_seconds=RETENTION
        )
    finally:
        await client.aclose()


async def expired(store: ScheduleStore) -> bool:
    return (await store.owners(["nightly"]))[0] is None


def spec(name: str = "nightly", **fields: Any) -> ScheduleSpec:
    fields.setdefault("cron", "0 2 * * *")
    return ScheduleSpec(name=name, job_type="echo", **fields)


def decision(tick: float, kind: TickKind = TickKind.FIRED, **fields: Any) -> TickDecision:
    fields.setdefault("schedule", "nightly")
    return TickDecision(tick=tick, kind=kind, decided_at=tick + 1, **fields)


# --- schedules ----------------------------------------------------------------------------------


async def test_put_create_update_upsert_and_versions(store: ScheduleStore) -> None:
    assert await store.get("nightly") is None
    result, stored = await store.put(spec(), mode=PutMode.UPDATE)
    assert (result, stored) == (PutResult.MISSING, None)
    result, stored = await store.put(spec(version=42), mode=PutMode.CREATE)
    assert result is PutResult.WRITTEN
    assert stored is not None
    assert stored.version == 1  # the store numbers versions, whatever the spec said
    result, existing = await store.put(spec(cron="0 3 * * *"), mode=PutMode.CREATE)
    assert result is PutResult.EXISTS
    assert existing is not None
    assert existing.cron == "0 2 * * *"
    result, stored = await store.put(spec(cron="0 4 * * *"), mode=PutMode.UPDATE)
    assert result is PutResult.WRITTEN
    assert stored is not None
    assert stored.version == 2
    result, current = await store.put(spec(cron="0 5 * * *"), mode=PutMode.UPDATE,
                                      expected_version=1)  # fmt: skip
    assert result is PutResult.CONFLICT
    assert current is not None
    assert (current.cron, current.version) == ("0 4 * * *", 2)
    result, stored = await store.put(
        spec(cron="0 5 * * *"), mode=PutMode.UPSERT, expected_version=2
    )
    assert result is PutResult.WRITTEN
    assert await store.get("nightly") == stored
    await store.put(spec("another", interval_seconds=5, cron=""), mode=PutMode.UPSERT)
    assert [s.name for s in await store.all()] == ["another", "nightly"]


async def test_delete_drops_the_schedule_its_cursor_and_lease(store: ScheduleStore) -> None:
    await store.put(spec(), mode=PutMode.CREATE)
    assert await store.acquire("nightly", "r1", 60)
    await store.decide("nightly", "r1", expected=None, decisions=[decision(NOW)], now=NOW)
    assert await store.delete("nightly") is True
    assert await store.delete("nightly") is False
    assert await store.get("nightly") is None
    assert await store.owners(["nightly"]) == [None]
    assert (await store.cursor("nightly")).tick is None
    # the ledger stays for `why` until its retention
    assert [d.tick for d in await store.decisions("nightly")] == [NOW]


# --- leases and replicas --------------------------------------------------------------------------


async def test_a_lease_has_one_holder_until_it_expires(store: ScheduleStore) -> None:
    assert await store.acquire("nightly", "r1", 0.5)
    assert not await store.acquire("nightly", "r2", 0.5)
    assert await store.acquire("nightly", "r1", 0.5)  # a renewal
    assert await store.owners(["nightly", "other"]) == ["r1", None]
    assert await store.renew(["nightly", "other"], "r1", 0.5) == [True, False]
    assert await store.renew(["nightly"], "r2", 0.5) == [False]
    await store.release("nightly", "r2")  # not r2's: nothing happens
    assert await store.owners(["nightly"]) == ["r1"]
    await eventually(lambda: expired(store), within=5)
    assert await store.acquire("nightly", "r2", 60)
    assert await store.renew(["nightly"], "r1", 60) == [False]
    await store.release("nightly", "r2")
    assert await store.owners(["nightly"]) == [None]


async def test_replicas_are_up_until_their_heartbeat_runs_out(store: ScheduleStore) -> None:
    await store.heartbeat("r2", now=NOW, ttl_seconds=10)
    await store.heartbeat("r1", now=NOW, ttl_seconds=20)
    assert await store.replicas(now=NOW + 5) == ["r1", "r2"]
    assert await store.replicas(now=NOW + 15) == ["r1"]
    await store.heartbeat("r2", now=NOW + 15, ttl_seconds=10)
    assert await store.replicas(now=NOW + 16) == ["r1", "r2"]
    await store.leave("r1")
    assert await store.replicas(now=NOW + 16) == ["r2"]


# --- cursor and ledger ----------------------------------------------------------------------------


async def test_decide_moves_the_cursor_once_for_the_lease_holder(store: ScheduleStore) -> None:
    assert await store.acquire("nightly", "r1", 60)
    first = [decision(NOW, job_id="nightly@a")]
    assert await store.decide(
        "nightly", "r2", expected=None, decisions=first, now=NOW
    ) is DecideResult.LEASE_LOST  # fmt: skip
    done = await store.decide(
        "nightly", "r1", expected=None, decisions=first, last_job_id="nightly@a", now=NOW
    )
    assert done is DecideResult.DONE
    cursor = await store.cursor("nightly")
    assert (cursor.tick, cursor.last_job_id, cursor.pending) == (NOW, "nightly@a", None)
    # the same decision again (a replica that read the cursor before): refused
    again = await store.decide("nightly", "r1", expected=None, decisions=first, now=NOW)
    assert again is DecideResult.CONFLICT
    more = [decision(NOW + 60, TickKind.MISSED), decision(NOW + 120, TickKind.SKIPPED)]
    assert await store.decide("nightly", "r1", expected=NOW, decisions=more, now=NOW)
    cursor = await store.cursor("nightly")
    assert (cursor.tick, cursor.last_job_id) == (NOW + 120, "nightly@a")
    ledger = await store.decisions("nightly")
    assert [(d.tick, d.kind) for d in ledger] == [
        (NOW + 120, TickKind.SKIPPED), (NOW + 60, TickKind.MISSED), (NOW, TickKind.FIRED),
    ]  # fmt: skip


async def test_decide_with_a_free_lease_takes_it(store: ScheduleStore) -> None:
    done = await store.decide(
        "nightly", "r1", expected=None, decisions=[decision(NOW)], now=NOW, ttl_seconds=60
    )
    assert done is DecideResult.DONE
    assert await store.owners(["nightly"]) == ["r1"]


async def test_ticks_with_fractions_compare_exactly(store: ScheduleStore) -> None:
    tick = NOW + 0.1 + 0.2  # not a "round" double
    await store.decide("nightly", "r1", expected=None, decisions=[decision(tick)], now=NOW)
    assert (await store.cursor("nightly")).tick == tick
    assert await store.decide(
        "nightly", "r1", expected=tick, decisions=[decision(tick + 1)], now=NOW
    ) is DecideResult.DONE  # fmt: skip


async def test_pending_is_noted_for_the_holder_and_cleared_by_decide(
    store: ScheduleStore,
) -> None:
    await store.decide("nightly", "r1", expected=None, decisions=[decision(NOW)], now=NOW)
    assert await store.acquire("nightly", "r1", 60)
    pending = PendingTick(tick=NOW + 60, replica="r1", since=NOW + 60, attempts=2,
                          last_error="UNAVAILABLE: down")  # fmt: skip
    assert await store.set_pending("nightly", "r2", pending) is False  # not r2's lease
    stale = PendingTick(tick=NOW, replica="r1", since=NOW)
    assert await store.set_pending("nightly", "r1", stale) is False  # decided already
    assert await store.set_pending("nightly", "r1", pending) is True
    assert (await store.cursor("nightly")).pending == pending
    await store.decide("nightly", "r1", expected=NOW, decisions=[decision(NOW + 60)], now=NOW)
    assert (await store.cursor("nightly")).pending is None


async def test_the_ledger_is_bounded_by_size_and_retention(store: ScheduleStore) -> None:
    expected: float | None = None
    for i in range(8):
        tick = NOW + i * 60
        await store.decide(
            "nightly", "r1", expected=expected, decisions=[decision(tick)], now=NOW + i * 60
        )
        expected = tick
    ticks = [d.tick for d in await store.decisions("nightly", newest_first=False)]
    assert ticks == [NOW + i * 60 for i in range(3, 8)]  # the newest LEDGER_SIZE
    # a decision dated past the retention of the older ones drops them
    late = NOW + 7 * 60 + RETENTION + 30
    await store.decide("nightly", "r1", expected=expected, decisions=[decision(late)], now=late)
    assert [d.tick for d in await store.decisions("nightly")] == [late]


async def test_decisions_by_window_and_order(store: ScheduleStore) -> None:
    ticks = [NOW + i for i in range(4)]
    await store.decide(
        "nightly", "r1", expected=None, decisions=[decision(t) for t in ticks], now=NOW
    )
    window = await store.decisions("nightly", start=NOW + 1, end=NOW + 2)
    assert [d.tick for d in window] == [NOW + 2, NOW + 1]
    oldest = await store.decisions("nightly", limit=2, newest_first=False)
    assert [d.tick for d in oldest] == [NOW, NOW + 1]
    assert await store.decisions("other") == []


async def test_add_decision_replaces_a_miss_but_never_a_run(store: ScheduleStore) -> None:
    await store.decide(
        "nightly", "r1", expected=None, now=NOW,
        decisions=[decision(NOW, TickKind.FIRED), decision(NOW + 60, TickKind.MISSED)],
    )  # fmt: skip
    backfill = decision(NOW + 60, TickKind.BACKFILLED, job_id="nightly@x")
    assert await store.add_decision(backfill, unless_ran=True, now=NOW) is None
    again = decision(NOW + 60, TickKind.BACKFILLED, job_id="nightly@y")
    found = await store.add_decision(again, unless_ran=True, now=NOW)
    assert found is not None
    assert (found.kind, found.job_id) == (TickKind.BACKFILLED, "nightly@x")
    fired = await store.add_decision(decision(NOW, TickKind.BACKFILLED), unless_ran=True, now=NOW)
    assert fired is not None
    assert fired.kind is TickKind.FIRED
    by_hand = decision(NOW + 30, TickKind.TRIGGERED, job_id="nightly@manual")
    assert await store.add_decision(by_hand, unless_ran=False, now=NOW) is None
    ledger = await store.decisions("nightly", newest_first=False)
    assert [(d.tick, d.kind) for d in ledger] == [
        (NOW, TickKind.FIRED), (NOW + 30, TickKind.TRIGGERED), (NOW + 60, TickKind.BACKFILLED),
    ]  # fmt: skip
    # the cursor is the owner's: a record by hand does not move it
    assert (await store.cursor("nightly")).tick == NOW + 60
    await store.set_last_job("nightly", "nightly@manual")
    assert (await store.cursor("nightly")).last_job_id == "nightly@manual"


# --- Redis only: junk and outages -----------------------------------------------------------------


@pytest.fixture
def redis_only(kind: tuple[str, str]) -> None:
    if kind[0] != "redis":
        pytest.skip("what Redis holds from elsewhere")


@pytest.mark.usefixtures("redis_only")
async def test_junk_schedules_and_records_are_left_out_and_said_once(
    store: ScheduleStore, redis_server: RedisServer
) -> None:
    assert isinstance(store, RedisScheduleStore)
    await store.put(spec(), mode=PutMode.CREATE)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.hset(store.schedules_key, "junk", b"\xff not json")
        await client.hset(
            store.schedules_key, "liar", b'{"name":"other","job_type":"echo","cron":"* * * * *"}'
        )
        await store.decide("nightly", "r1", expected=None, decisions=[decision(NOW)], now=NOW)
        await client.zadd(store.key("nightly", "ledger"), {b"[1,2": NOW + 1})
    finally:
        await client.aclose()
    for _ in range(2):
        assert [s.name for s in await store.all()] == ["nightly"]
        assert await store.get("junk") is None
        assert [d.tick for d in await store.decisions("nightly")] == [NOW]
    found = store.bad_data.statistics().found
    assert (found["schedule"], found["tick_decision"]) == (2, 1)
    # a junk record may be replaced, not created over
    result, _ = await store.put(spec("junk"), mode=PutMode.CREATE)
    assert result is PutResult.EXISTS
    result, stored = await store.put(spec("junk"), mode=PutMode.UPSERT)
    assert result is PutResult.WRITTEN
    assert stored is not None
    assert stored.version == 1


@pytest.mark.usefixtures("redis_only")
async def test_a_redis_that_is_gone_is_store_unavailable() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    gone = RedisScheduleStore(client)
    try:
        with pytest.raises(StoreUnavailable, match="Redis unavailable during cursor"):
            await gone.cursor("nightly")
    finally:
        await client.aclose()


def test_scores_round_trip() -> None:
    from app.stores.redis.schedule_store import _score

    assert _score(math.inf) == "+inf"
    assert float(_score(NOW + 0.1 + 0.2)) == NOW + 0.1 + 0.2
