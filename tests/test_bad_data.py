"""Junk in every key the fleet reads: said once, counted, set aside; every other job goes on.

The store's part on the session's real redis-server (what only Redis can hold: bytes that are
not UTF-8, values of the wrong type, poison stream entries), then the fleet's with real
orchestrator and worker processes: poison entries in a dead orchestrator's pending list, job
records that are not JSON, fencing tokens and counters that are not integers, run outcomes that
are not one, a pub/sub channel that is not UTF-8. The job-level rules both stores keep are in
tests/test_stores_contract.py.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import grpc
import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from app.errors import BadDataKind, CorruptRecord
from app.fleet.batch_job import BatchJob, decode_job, decode_outcome, encode_job
from app.fleet.job_state import JobState
from app.fleet.pod_info import PodInfo, PodStatus, encode_pod_info
from app.orchestrator.directory import WorkerDirectory
from app.stores.bad_data import BadData
from app.stores.redis.job_events import RedisJobEvents
from app.stores.redis.job_store import RedisJobStore
from app.stores.redis.pod_registry import RedisPodRegistry
from tests.helpers import RedisServer, WorkerProcess, free_port, scrape, wait_for
from tests.test_orchestrator import TERMINAL, Fleet

STREAM = "wpm-jobs:stream"
QUARANTINE = "wpm-jobs:stream:quarantine"
GROUP = "orchestrators"


def job(job_id: str, job_type: str = "echo") -> BatchJob:
    now = time.time()
    return BatchJob(job_id=job_id, job_type=job_type, submitted_at=now, deadline_at=now + 60)


# --- records: what cannot be shown does not decode ------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"state": "QUEUED"},  # a worker's run's state, not a fleet job's
        {"deadline_at": 1e308},  # RFC 3339 cannot show it (was UNKNOWN on GetJob)
        {"priority": 2**40},  # int32 on the wire
        {"fencing_token": -1},  # uint64 on the wire
        {"attempts": [{"number": -1, "worker": "w", "fencing_token": 1, "started_at": 0}]},
        {"params": {"a": 1}},  # a map of strings
    ],
)
def test_a_record_that_could_not_be_shown_does_not_decode(change: dict[str, Any]) -> None:
    raw = msgspec.json.decode(encode_job(job("j1")))
    raw.update(change)
    with pytest.raises(msgspec.ValidationError):
        decode_job(msgspec.json.encode(raw))


def test_a_run_outcome_must_be_a_run_s_end() -> None:
    assert decode_outcome(b'{"state": "SUCCEEDED"}').state is JobState.SUCCEEDED
    for raw in (b'{"state": "RUNNING"}', b'{"state": "PENDING"}', b"{}", b"junk"):
        with pytest.raises(msgspec.DecodeError):
            decode_outcome(raw)


# --- the Redis store: what only Redis can hold ----------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client runs on asyncio only


@pytest.fixture
def client(async_redis: aioredis.Redis) -> aioredis.Redis:
    return async_redis


@pytest.fixture
async def store(client: aioredis.Redis) -> RedisJobStore:
    store = RedisJobStore(client, bad_data=BadData())
    await store.ensure_group()
    return store


def stats(store: RedisJobStore) -> tuple[dict[str, int], dict[str, int]]:
    s = store.bad_data.statistics()
    return s.found, s.quarantined


# every way an entry can name no job; the last one names a job and carries a field more
POISON: list[dict[bytes, bytes]] = [
    {b"job_id": b"\xff\xfe"},  # not UTF-8 (every claim failed on it)
    {b"jobid": b"a"},  # no job_id field
    {b"job_id": b""},
    {b"job_id": b"\xc3\x28", b"other": b"\xff"},
]


@pytest.mark.anyio
async def test_poison_entries_are_set_aside_and_the_rest_are_read(
    store: RedisJobStore, client: aioredis.Redis
) -> None:
    await store.submit(job("a"), bound=10)
    poison = [await client.xadd(STREAM, fields) for fields in POISON]  # type: ignore[arg-type]
    await client.set("wpm-job:x1", encode_job(job("x1")))
    extra = await client.xadd(STREAM, {b"job_id": b"x1", b"added_by": b"\xffnewer"})
    await store.submit(job("c"), bound=10)
    entries = await store.read_new("c1", count=20, block_ms=10)
    assert [j for _, j in entries] == ["a", "x1", "c"]  # a field more is no harm
    assert text(extra) in dict(entries)
    # the poison is acked and gone from the queue, kept in the quarantine with its reason
    assert (await client.xpending(STREAM, GROUP))["pending"] == 3
    assert await client.xlen(STREAM) == 3
    quarantined = await store.quarantined()
    assert [q.entry_id for q in quarantined] == [text(p) for p in poison]
    assert {q.kind for q in quarantined} == {"stream_entry"}
    assert [q.reason for q in quarantined] == [
        r"job_id b'\xff\xfe' is not UTF-8",
        "no job_id field (fields b'jobid')",
        "empty job_id",
        r"job_id b'\xc3(' is not UTF-8",
    ]
    raw: Any = await client.xrange(QUARANTINE, count=1)
    assert raw[0][1][b"original.job_id"] == b"\xff\xfe"  # as it was
    assert stats(store) == ({**zero(), "stream_entry": 4}, {**zero(), "stream_entry": 4})


@pytest.mark.anyio
async def test_poison_in_a_dead_consumer_s_pending_list_does_not_stop_the_claim(
    store: RedisJobStore, client: aioredis.Redis
) -> None:
    for job_id in ("a", "b"):
        await store.submit(job(job_id), bound=10)
    await client.xadd(STREAM, {b"job_id": b"\xff"})
    await store.submit(job("c"), bound=10)
    # the dead consumer read them all (raw, as any client would)
    await client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)
    for _ in range(2):  # the second claim finds nothing left: the poison was not left pending
        claimed = await store.claim_idle("rescuer", min_idle_ms=0, count=10)
        assert [j for _, j in claimed] in (["a", "b", "c"], [])
    assert (await client.xpending(STREAM, GROUP))["pending"] == 3
    assert [q.reason for q in await store.quarantined()] == [r"job_id b'\xff' is not UTF-8"]


@pytest.mark.anyio
async def test_values_of_the_wrong_type_are_junk_too(
    store: RedisJobStore, client: aioredis.Redis
) -> None:
    await client.hset("wpm-job:h", "state", "PENDING")
    record_reads: list[Coroutine[Any, Any, object]] = [
        store.get("h"), store.submit(job("h"), bound=10),
        store.request_cancel("h", error="x", now=1.0),
    ]  # fmt: skip
    for attempt in record_reads:
        with pytest.raises(CorruptRecord, match=r"^job h: record unreadable: not a string value"):
            await attempt
    await store.submit(job("f"), bound=10)
    record = await store.get("f")
    assert record is not None
    await client.rpush("wpm-job:f:fence", "1")
    fence_reads: list[Coroutine[Any, Any, object]] = [
        store.fence("f"),
        store.next_token("f"),
        store.write(record, 1),
    ]
    for attempt in fence_reads:
        with pytest.raises(CorruptRecord) as caught:
            await attempt
        assert caught.value.kind is BadDataKind.FENCING_TOKEN
    found, _ = stats(store)
    assert (found["job_record"], found["fencing_token"]) == (1, 1)


@pytest.mark.anyio
async def test_a_junk_counter_starts_again_and_never_fails_a_script(
    store: RedisJobStore, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await client.set("wpm-job-queued:echo", "lots")
    assert await store.queued_count("echo") == 0
    assert (await store.submit(job("a"), bound=1))[0].value == "CREATED"  # was a script error
    assert await store.queued_count("echo") == 1
    await client.delete("wpm-job-queued:echo")
    await client.hset("wpm-job-queued:echo", "n", "1")  # not even a string
    token = await store.next_token("a")
    record = await store.get("a")
    assert record is not None
    record.state = JobState.SUCCEEDED
    assert (await store.write(record, token)).name == "WRITTEN"  # the count-down is skipped
    assert (await store.submit(job("b"), bound=1))[0].value == "CREATED"
    assert await client.get("wpm-job-queued:echo") == b"1"
    found, _ = stats(store)
    assert found["queued_counter"] == 1  # one key, said once
    await client.delete("wpm-job-queued:other")
    await client.hset("wpm-job-queued:other", "n", "1")
    with caplog.at_level(logging.WARNING):
        assert (await store.submit(job("c", "other"), bound=1))[0].value == "CREATED"
    (said,) = [r.getMessage() for r in caplog.records if "wpm-job-queued:other" in r.getMessage()]
    assert said == (
        "bad data: wpm-job-queued:other: not a string value, so not an integer; reset to 0"
    )


@pytest.mark.anyio
async def test_junk_in_the_quarantine_key_does_not_keep_entries_in_the_queue(
    store: RedisJobStore, client: aioredis.Redis
) -> None:
    await client.set(QUARANTINE, "not a stream")
    await client.xadd(STREAM, {b"job_id": b"\xff"})
    await store.submit(job("a"), bound=10)
    await store.submit(job("b"), bound=10)
    entries = await store.read_new("c1", count=10, block_ms=10)
    assert [j for _, j in entries] == ["a", "b"]
    await client.set("wpm-job:a:fence", "junk")
    with pytest.raises(CorruptRecord) as caught:
        await store.fence("a")
    assert await store.quarantine(entries[0][0], caught.value, now=1.0)
    # both are acked and dropped (there is nowhere to keep them), and said once
    assert (await client.xpending(STREAM, GROUP))["pending"] == 1
    assert (await store.get("a")).state is JobState.FAILED  # type: ignore[union-attr]
    found, quarantined = stats(store)
    assert found["stream_entry"] == 2  # the poison entry, and the quarantine key
    assert quarantined["stream_entry"] == quarantined["fencing_token"] == 0
    assert await client.get(QUARANTINE) == b"not a stream"


@pytest.mark.anyio
async def test_the_quarantine_is_bounded(client: aioredis.Redis) -> None:
    store = RedisJobStore(client, quarantine_maxlen=10)
    await store.ensure_group()
    async with client.pipeline(transaction=False) as pipe:
        for _ in range(300):
            pipe.xadd(STREAM, {b"job_id": b"\xff"})
        await pipe.execute()
    assert await store.read_new("c1", count=500, block_ms=10) == []
    assert await client.xlen(STREAM) == 0
    # MAXLEN ~ trims whole nodes of the stream (100 entries by default): about, not exactly
    assert 10 <= await client.xlen(QUARANTINE) <= 110


@pytest.mark.anyio
async def test_a_channel_name_that_is_not_utf8_wakes_nobody_and_stops_nothing(
    client: aioredis.Redis,
) -> None:
    bad = BadData()
    events = RedisJobEvents(client, bad_data=bad)
    async with anyio.create_task_group() as tg:
        await tg.start(events.run)
        woken = anyio.Event()

        async def wait(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with events.subscribed("a"):
                with events.watching("a") as changed:
                    task_status.started()
                    await changed.wait()
            woken.set()

        await tg.start(wait)
        with anyio.fail_after(5):
            for _ in range(2):  # a job id on the cancels channel that is not UTF-8
                await client.publish("wpm-job-cancels", b"\xff")  # (crashed the listener)
            await client.publish(b"wpm-job-events:\xff", b"x")  # subscribed by nobody
            await client.publish("wpm-job-events:a", b"x")
            await woken.wait()
        tg.cancel_scope.cancel()
    assert events.messages == 3
    assert bad.statistics().found["job_event"] == 1


@pytest.mark.anyio
async def test_a_registry_key_name_that_is_not_utf8_does_not_blind_the_directory(
    client: aioredis.Redis,
) -> None:
    def info(port: int) -> bytes:
        return encode_pod_info(
            PodInfo(grpc_port=port, status=PodStatus.IDLE, update_datetime="",
                    update_epoch_ms=int(time.time() * 1000), ip="10.0.0.1")
        )  # fmt: skip

    await client.set("wpm-apps:10.0.0.1:1", info(9091))
    await client.set(b"wpm-apps:\xff:2", info(9092))  # a name that is junk, a report that is not
    await client.set(b"wpm-apps:\xfe:3", b"\xff junk")
    directory = WorkerDirectory(RedisPodRegistry(client))
    await directory.refresh()  # failed whole, every time: the fleet went stale
    assert [e.address for e in directory.entries()] == ["10.0.0.1:9091", "10.0.0.1:9092"]
    assert directory.statistics().skipped == 1


def text(value: Any) -> str:
    """A redis-py reply (bytes here) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def zero() -> dict[str, int]:
    return {k.value: 0 for k in BadDataKind}


# --- the fleet: real orchestrators and workers ----------------------------------------------------


@pytest.fixture
def fleet(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
    stubs: SimpleNamespace, orch_stubs: SimpleNamespace,
) -> Iterator[Fleet]:  # fmt: skip
    fleet = Fleet(tmp_path, redis_server.url, stubs, orch_stubs)
    try:
        yield fleet
    finally:
        fleet.close()


def lines_about(proc: WorkerProcess, needle: str) -> list[str]:
    return [line for line in proc.log().splitlines() if needle in line]


def assert_said_once(proc: WorkerProcess, needles: list[str]) -> None:
    """The process's log has one line about each bad item, and no traceback."""
    log = proc.log()
    assert "Traceback" not in log, log
    for needle in needles:
        said = lines_about(proc, needle)
        assert len(said) == 1, f"{needle!r} in {len(said)} lines:\n{log}"
        assert "bad data: " in said[0]


def metric(port: int, name: str, kind: str) -> float:
    return scrape(port).get(
        (f"jobworker_orchestrator_{name}_total", frozenset({("kind", kind)})), -1
    )


def wait_quarantined(port: int, kind: str, count: int) -> None:
    """The counter follows the script that moved the entry: wait for it (briefly)."""
    wait_for(lambda: metric(port, "quarantined", kind) == count, what=f"{count} {kind} counted")


def quarantine_ids(client: redis.Redis) -> dict[str, str]:
    """entry id -> kind, of what the quarantine holds."""
    entries: Any = client.xrange(QUARANTINE)
    return {text(fields[b"entry"]): text(fields[b"kind"]) for _, fields in entries}


def queue_empty(client: redis.Redis) -> bool:
    """Nothing pending, nothing in the stream: every entry acked (or quarantined)."""
    pending: Any = client.xpending(STREAM, GROUP)
    return pending["pending"] == 0 and client.xlen(STREAM) == 0


def test_poison_entries_of_a_killed_orchestrator_are_set_aside_and_its_jobs_finish(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    workers = [fleet.worker(JOBWORKER_WORKER__CORE_SIZE="2", JOBWORKER_WORKER__MAX_SIZE="2")
               for _ in range(2)]  # fmt: skip
    first = fleet.orchestrator(JOBWORKER_ORCHESTRATOR__CLAIM_IDLE_SECONDS="1.5")
    stub = fleet.stub(first)
    wait_for(lambda: len(fleet.workers_view(stub)) == 2, what="two workers discovered")
    ids = [f"held-{i}" for i in range(6)]
    for job_id in ids:
        stub.Submit(fleet.request("sleep", job_id, params={"seconds": "3"}), timeout=10)
    # 4 run (2 workers x 2), 2 wait for a worker: all 6 entries are the first one's
    held = fleet.wait_job(stub, ids[0], {"RUNNING"})
    wait_for(lambda: redis_client.xpending(STREAM, GROUP)["pending"] == 6, what="6 pending")
    summary: Any = redis_client.xpending(STREAM, GROUP)
    (dead,) = [c["name"] for c in summary["consumers"]]
    first.signal(signal.SIGKILL)
    first.wait_exit()
    # poison in the dead one's pending list, as if it had read it just before it died
    poison = [text(redis_client.xadd(STREAM, f)) for f in POISON]  # type: ignore[arg-type]
    ghost = text(redis_client.xadd(STREAM, {"job_id": "ghost"}))  # a job with no record
    redis_client.xreadgroup(GROUP, dead, {STREAM: ">"}, count=10)
    # and a junk outcome where the worker will want to record how held-0's run ended
    token = held.attempts[-1].fencing_token
    outcome_key = f"wpm-job:{ids[0]}:run:{token}"
    redis_client.set(outcome_key, b"\x00junk")
    metrics_port = free_port()
    second = fleet.orchestrator(
        JOBWORKER_ORCHESTRATOR__CLAIM_IDLE_SECONDS="1.5", JOBWORKER_METRICS__PORT=str(metrics_port)
    )
    stub = fleet.stub(second)
    for job_id in ids:
        assert fleet.state(fleet.wait_job(stub, job_id, TERMINAL)) == "SUCCEEDED"
    # a job submitted now goes through as well
    res = stub.Execute(fleet.request("echo", "after", params={"a": "1"}), timeout=30)
    assert fleet.state(res.job) == "SUCCEEDED"
    wait_for(lambda: len(quarantine_ids(redis_client)) == 5, what="5 entries quarantined")
    assert quarantine_ids(redis_client) == {e: "stream_entry" for e in [*poison, ghost]}
    wait_for(lambda: queue_empty(redis_client), what="the queue empty")  # acks follow the ends
    # each job ran once: the run of held-0 was attached to, its junk outcome ignored
    assert sum(fleet.worker_client(w).status().jobs_accepted for w in workers) == 7
    assert metric(metrics_port, "bad_data", "stream_entry") == 5
    wait_quarantined(metrics_port, "stream_entry", 5)
    assert metric(metrics_port, "bad_data", "run_outcome") == 1
    assert_said_once(second, [*(f"queue entry {e}:" for e in [*poison, ghost]), outcome_key])
    assert lines_about(second, "claimed job")  # the real jobs were claimed from the dead one


JUNK_RECORDS = {
    "not-json": b"\xff{not json",
    "worker-state": encode_job(job("worker-state")).replace(b'"PENDING"', b'"QUEUED"'),
    "year-10000": encode_job(job("year-10000")).replace(
        b'"deadline_at":', b'"deadline_at":1e308,"x":'
    ),
    "wrong-type": b"",  # a hash, below
}


def test_junk_records_answer_data_loss_and_are_quarantined_while_others_run(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.worker()
    metrics_port = free_port()
    orch = fleet.orchestrator(JOBWORKER_METRICS__PORT=str(metrics_port))
    stub = fleet.stub(orch)
    pb2 = fleet.orch.pb2
    before = stub.Execute(fleet.request("echo", "before", params={"a": "1"}), timeout=30)
    assert fleet.state(before.job) == "SUCCEEDED"
    # junk records, each with its queue entry, as a bug or a hand could leave them
    entries = {}
    for job_id, raw in JUNK_RECORDS.items():
        if raw:
            redis_client.set(f"wpm-job:{job_id}", raw)
        else:
            redis_client.hset(f"wpm-job:{job_id}", "state", "PENDING")
        entries[text(redis_client.xadd(STREAM, {"job_id": job_id}))] = job_id
    redis_client.set("wpm-job-queued:echo", "many")  # the per-type bound's counter
    redis_client.set("wpm-job:fenced:fence", "junk")  # a fencing token, before its job exists
    redis_client.publish("wpm-job-cancels", b"\xff")  # a job id that is junk (killed it once)
    # every RPC about a junk record answers DATA_LOSS with one line, never UNKNOWN
    request = pb2.JobRequest
    for job_id in JUNK_RECORDS:
        ref, submit = request(job_id=job_id), fleet.request("echo", job_id)
        calls = {
            "GetJob": (stub.GetJob, ref),
            "CancelJob": (stub.CancelJob, ref),
            "WatchJob": (lambda r, timeout: list(stub.WatchJob(r, timeout=timeout)), ref),
            "Submit": (stub.Submit, submit),
            "Execute": (stub.Execute, submit),
        }
        for name, (call, message) in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call(message, timeout=10)
            error: Any = caught.value
            assert error.code() == grpc.StatusCode.DATA_LOSS, (name, job_id, error.details())
            assert re.fullmatch(rf"job {job_id}: record unreadable: [^\n]+", error.details())
    # the jobs around them go on: the junk counter starts again, the fenced job ends FAILED
    ok = [stub.Execute(fleet.request("echo", f"ok-{i}"), timeout=30) for i in range(3)]
    assert [fleet.state(r.job) for r in ok] == ["SUCCEEDED"] * 3
    fenced = stub.Execute(fleet.request("echo", "fenced"), timeout=30).job
    assert (fleet.state(fenced), fenced.error) == (
        "FAILED", "quarantined: fencing token unreadable: b'junk' is not an integer"
    )  # fmt: skip
    wait_for(lambda: len(quarantine_ids(redis_client)) == 5, what="5 entries quarantined")
    kinds = quarantine_ids(redis_client)
    assert {e: kinds[e] for e in entries} == dict.fromkeys(entries, "job_record")
    assert sorted(kinds.values()).count("fencing_token") == 1
    wait_for(lambda: queue_empty(redis_client), what="the queue empty")
    # a junk record is kept for the retention (to look at), then expires
    assert all(redis_client.ttl(f"wpm-job:{j}") > 0 for j in JUNK_RECORDS)
    for kind, count in (("job_record", 4), ("fencing_token", 1), ("queued_counter", 1),
                        ("job_event", 1), ("stream_entry", 0)):  # fmt: skip
        assert metric(metrics_port, "bad_data", kind) == count, kind
    wait_quarantined(metrics_port, "job_record", 4)
    wait_quarantined(metrics_port, "fencing_token", 1)
    said = [f"wpm-job:{j}:" for j in JUNK_RECORDS]
    assert_said_once(orch, [*said, "wpm-job:fenced:fence", "wpm-job-queued:echo",
                            "wpm-job-cancels message"])  # fmt: skip
    assert orch.process.poll() is None


def test_a_fencing_token_turned_junk_mid_run_ends_the_job_failed(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.worker()
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    stub.Submit(fleet.request("sleep", "mid", params={"seconds": "2"}), timeout=10)
    fleet.wait_job(stub, "mid", {"RUNNING"})
    redis_client.set("wpm-job:mid:fence", "not-a-number")
    job = fleet.wait_job(stub, "mid", TERMINAL)
    assert (fleet.state(job), job.error) == (
        "FAILED", "quarantined: fencing token unreadable: b'not-a-number' is not an integer"
    )  # fmt: skip
    after = stub.Execute(fleet.request("echo", "after"), timeout=30)
    assert fleet.state(after.job) == "SUCCEEDED"
    assert_said_once(orch, ["wpm-job:mid:fence"])
