"""ListJobs' core: the page token, the walk's position, matching, the bounded walk itself and the
index's trimming (on the in-memory store, asyncio and trio; the store's own contract runs on
Redis too)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio.testing

from app.core.clock import LoopClock
from app.core.lifecycle import Lifecycle
from app.fleet.batch_job import BatchJob, encode_job
from app.fleet.job_index import (
    IndexPosition,
    JobQuery,
    advance,
    decode_token,
    encode_token,
    matches,
    range_start,
)
from app.fleet.job_state import JobState
from app.orchestrator.index_trimmer import IndexTrimmer
from app.orchestrator.job_listing import JobPage, list_jobs
from app.stores.abc import SubmitResult, WriteResult
from app.stores.memory import MemoryJobStore
from tests.helpers import eventually


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """asyncio, and trio on MockClock: the trimmer's periods and the records' retention pass
    in no real time there."""
    if request.param == "trio":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return request.param


def job(job_id: str, submitted_at: float, **fields: object) -> BatchJob:
    fields.setdefault("job_type", "echo")
    return BatchJob(job_id=job_id, submitted_at=submitted_at, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "position",
    [IndexPosition(score=1764441067.123456, skip=1), IndexPosition(score=0.0, skip=0),
     IndexPosition(score=math.inf, skip=3), IndexPosition(score=-1.5, skip=10**9)],
)  # fmt: skip
def test_a_page_token_gives_back_its_position(position: IndexPosition) -> None:
    token = encode_token(position)
    assert token.isascii()
    assert not {"=", "/", "+"} & set(token)
    assert decode_token(token) == position


@pytest.mark.parametrize(
    "token",
    ["", "x", "!!!!", "MTox", encode_token(IndexPosition(score=1.0, skip=1)) + "AAAA",
     "Mjox" + "A" * 300, "MTpuYW46MQ", "MToxOi0x"],
    ids=["empty", "short", "not-base64", "no-skip", "trailing", "too-long", "nan", "negative"],
)  # fmt: skip
def test_a_token_we_did_not_make_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match=r"too long|not base64|not a position|could not convert"):
        decode_token(token)


def test_positions_count_entries_of_one_score() -> None:
    first = advance(None, 5.0)
    assert first == IndexPosition(score=5.0, skip=1)
    assert advance(first, 5.0) == IndexPosition(score=5.0, skip=2)
    assert advance(advance(first, 5.0), 4.0) == IndexPosition(score=4.0, skip=1)
    assert range_start(None, math.inf) == (math.inf, False, 0)
    assert range_start(IndexPosition(score=5.0, skip=2), 9.0) == (5.0, True, 2)
    assert range_start(IndexPosition(score=9.0, skip=2), 9.0) == (9.0, False, 0)


def test_a_job_matches_every_filter_given() -> None:
    a = job("a", 1.0, state=JobState.FAILED, schedule="nightly", job_type="report")
    assert matches(JobQuery(), a)
    assert matches(JobQuery(states=frozenset({JobState.FAILED, JobState.CANCELLED})), a)
    assert not matches(JobQuery(states=frozenset({JobState.SUCCEEDED})), a)
    assert matches(JobQuery(job_type="report", schedule="nightly"), a)
    assert not matches(JobQuery(job_type="report", schedule="hourly"), a)
    assert not matches(JobQuery(job_type="echo"), a)
    # a job whose id looks like a schedule's run is not one unless the trigger said so
    assert not matches(JobQuery(schedule="nightly"), job("nightly@2026-01-01T00:00:00Z", 1.0))


async def store_with(jobs: list[BatchJob]) -> MemoryJobStore:
    store = MemoryJobStore()
    for j in jobs:
        assert (await store.submit(j, bound=10_000))[0] is SubmitResult.CREATED
    return store


def ids(page: JobPage) -> list[str]:
    return [j.job_id for j in page.jobs]


@pytest.mark.anyio
async def test_filters_and_pages_walk_every_match_once_newest_first() -> None:
    states = [JobState.SUCCEEDED, JobState.FAILED, JobState.PENDING]
    jobs = [
        job(f"j{i:03}", 1000.0 + i, state=states[i % 3], job_type="echo" if i % 2 else "sleep",
            schedule="tick" if i % 5 == 0 else "")
        for i in range(120)
    ]  # fmt: skip
    store = await store_with(jobs)
    newest_first = list(reversed(jobs))
    for query, wanted in (
        (JobQuery(), newest_first),
        (JobQuery(states=frozenset({JobState.FAILED})),
         [j for j in newest_first if j.state is JobState.FAILED]),
        (JobQuery(job_type="sleep", states=frozenset({JobState.SUCCEEDED, JobState.PENDING})),
         [j for j in newest_first if j.job_type == "sleep" and j.state is not JobState.FAILED]),
        (JobQuery(schedule="tick"), [j for j in newest_first if j.schedule == "tick"]),
        (JobQuery(since=1010.0, until=1020.0), [j for j in newest_first
                                               if 1010 <= j.submitted_at < 1020]),
    ):  # fmt: skip
        for limit, cap, read in ((7, 2000, 250), (50, 13, 4), (1000, 30, 30)):
            got: list[str] = []
            after = None
            calls = 0
            while True:
                q = JobQuery(states=query.states, job_type=query.job_type,
                             schedule=query.schedule, since=query.since, until=query.until,
                             limit=limit, after=after)  # fmt: skip
                page = await list_jobs(store, q, max_examined=cap, read_page=read)
                calls += 1
                assert len(page.jobs) <= limit
                assert page.examined <= cap
                got += ids(page)
                if page.next is None:
                    break
                after = page.next
            assert got == [j.job_id for j in wanted], (query, limit, cap)
            assert calls <= 120 // min(cap, 120) + len(wanted) // limit + 2


@pytest.mark.anyio
async def test_a_page_ends_at_the_cap_of_entries_looked_at() -> None:
    # one match, at the far end of many that do not
    store = await store_with(
        [job("old-failure", 1.0, state=JobState.FAILED)]
        + [job(f"ok{i}", 10.0 + i, state=JobState.SUCCEEDED) for i in range(100)]
    )
    query = JobQuery(states=frozenset({JobState.FAILED}))
    page = await list_jobs(store, query, max_examined=40, read_page=16)
    assert (ids(page), page.examined) == ([], 40)
    assert page.next == IndexPosition(score=70.0, skip=1)
    page = await list_jobs(
        store, JobQuery(states=query.states, after=page.next), max_examined=40, read_page=16
    )
    assert (ids(page), page.examined, page.next) == ([], 40, IndexPosition(score=30.0, skip=1))
    page = await list_jobs(
        store, JobQuery(states=query.states, after=page.next), max_examined=40, read_page=16
    )
    assert (ids(page), page.examined, page.next) == (["old-failure"], 21, None)


@pytest.mark.anyio
async def test_a_page_that_fills_at_the_last_entry_says_there_is_no_more() -> None:
    store = await store_with([job(f"j{i}", float(i)) for i in range(6)])
    page = await list_jobs(store, JobQuery(limit=6), read_page=10)
    assert (len(page.jobs), page.next) == (6, None)
    page = await list_jobs(store, JobQuery(limit=3), read_page=10)
    assert (ids(page), page.next) == (["j5", "j4", "j3"], IndexPosition(score=3.0, skip=1))
    # a full read page may hold more after it: the next call finds out
    page = await list_jobs(store, JobQuery(limit=3), read_page=3)
    assert page.next is not None
    assert (
        await list_jobs(store, JobQuery(limit=3, after=page.next), read_page=3)
    ).next is not None


@pytest.mark.anyio
async def test_a_page_ends_before_its_records_grow_past_the_byte_budget() -> None:
    jobs = [job(f"j{i}", float(i), result_json="x" * 1000) for i in range(10)]
    store = await store_with(jobs)
    each = len(encode_job(jobs[0]))
    page = await list_jobs(store, JobQuery(limit=10), max_bytes=3 * each + each // 2)
    assert ids(page) == ["j9", "j8", "j7"]
    assert page.next == IndexPosition(score=7.0, skip=1)
    # a single record larger than the budget still comes, alone
    page = await list_jobs(store, JobQuery(limit=10), max_bytes=10)
    assert ids(page) == ["j9"]


@pytest.mark.anyio
async def test_the_trimmer_drops_entries_whose_record_expired_and_keeps_the_rest() -> None:
    clock = LoopClock()
    store = MemoryJobStore(retention_seconds=1)
    now = clock.timestamp()
    for i in range(5):  # ended: their records expire a retention after
        await store.submit(job(f"done{i}", now + i / 100), bound=100)
        token = await store.next_token(f"done{i}")
        ended = await store.get(f"done{i}")
        assert ended is not None
        ended.state = JobState.SUCCEEDED
        assert await store.write(ended, token) is WriteResult.WRITTEN
    await store.submit(job("open", now - 1), bound=100)  # the oldest, and never ends: kept
    trimmer = IndexTrimmer(store, retention_seconds=1, period=0.25, batch=2, clock=clock)

    async def entries() -> list[str | None]:
        page = await store.index_page(after=None, since=-math.inf, until=math.inf, count=100)
        return [e.job.job_id if e.job else None for e in page]

    async with anyio.create_task_group() as tg:
        await tg.start(trimmer.run)
        assert "RUNNING" in repr(trimmer)
        await eventually(lambda: _only_open(entries), within=10)
        tg.cancel_scope.cancel()
    stats = trimmer.statistics()
    assert stats.trimmed == 5
    assert stats.turns >= 1
    assert stats.state is Lifecycle.STOPPED


async def _only_open(entries: Callable[[], Awaitable[list[str | None]]]) -> bool:
    return await entries() == ["open"]
