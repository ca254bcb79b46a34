"""ListJobs against a real redis-server, a real orchestrator and a real worker: filters, pages,
bad fields, junk in the index, and the index's cost (one entry, one ZADD, per job)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import redis

from tests.grpc_clients import grpcurl_json
from tests.helpers import RedisServer, free_port, scrape, wait_for
from tests.test_orchestrator import TERMINAL, Fleet

INDEX = "wpm-jobs:index"


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


def listed(fleet: Fleet, stub: Any, **fields: Any) -> Any:
    return stub.ListJobs(fleet.orch.pb2.ListJobsRequest(**fields), timeout=10)


def ids(res: Any) -> list[str]:
    return [job.job_id for job in res.jobs]


def refused(fleet: Fleet, stub: Any, **fields: Any) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        listed(fleet, stub, **fields)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return str(caught.value.details())


def test_filters_pages_and_bad_fields(fleet: Fleet, redis_client: redis.Redis) -> None:
    fleet.worker()
    orchestrator = fleet.orchestrator()
    stub = fleet.stub(orchestrator)
    pb2 = fleet.orch.pb2
    submitted: list[str] = []

    def submit(job_type: str, job_id: str, **fields: Any) -> None:
        stub.Submit(fleet.request(job_type, job_id, **fields), timeout=10)
        submitted.append(job_id)

    for i in range(6):
        if i == 4:  # a boundary between two submit times, for since/until
            time.sleep(0.005)
            boundary = datetime.now(UTC).isoformat(timespec="microseconds")
            time.sleep(0.005)
        submit("echo", f"echo-{i}", params={"i": str(i)})
    for i in range(3):
        submit("fail", f"fail-{i}")
    submit("echo", "nightly@2026-01-01T00:00:00Z", schedule="nightly")
    submit("echo", "nightly@2026-01-02T00:00:00Z", schedule="nightly")
    submit("echo", "hourly@2026-01-01T00:00:00Z")  # looks like a schedule's run; is not one
    submit("sleep", "long", params={"seconds": "60"})
    for job_id in submitted[:-1]:
        fleet.wait_job(stub, job_id, TERMINAL)
    fleet.wait_job(stub, "long", {"RUNNING"})
    newest_first = list(reversed(submitted))

    everything = listed(fleet, stub)
    assert ids(everything) == newest_first
    assert everything.next_page_token == ""
    assert everything.examined == len(submitted)
    first = everything.jobs[-1]
    assert (first.job_type, dict(first.params), pb2.JobState.Name(first.state)) == (
        "echo", {"i": "0"}, "SUCCEEDED",
    )  # fmt: skip
    assert everything.jobs[0].attempts[0].worker  # whole records, attempts included

    failed = pb2.JobState.Value("FAILED")
    running = pb2.JobState.Value("RUNNING")
    assert ids(listed(fleet, stub, states=[failed])) == ["fail-2", "fail-1", "fail-0"]
    assert ids(listed(fleet, stub, states=[failed, running])) == [
        "long", "fail-2", "fail-1", "fail-0",
    ]  # fmt: skip
    assert ids(listed(fleet, stub, job_type="sleep")) == ["long"]
    # the schedule is what the submit recorded, not what an id looks like
    nightly = listed(fleet, stub, schedule="nightly")
    assert ids(nightly) == ["nightly@2026-01-02T00:00:00Z", "nightly@2026-01-01T00:00:00Z"]
    assert {job.schedule for job in nightly.jobs} == {"nightly"}
    assert ids(listed(fleet, stub, schedule="hourly")) == []
    # since is included, until is not
    assert ids(listed(fleet, stub, submitted_since=boundary)) == newest_first[:-4]
    assert ids(listed(fleet, stub, submitted_until=boundary)) == newest_first[-4:]
    at = everything.jobs[-5].submitted_at  # echo-4's, to the millisecond
    assert ids(listed(fleet, stub, submitted_since=boundary, submitted_until=at)) == []
    # pages: each at most `limit`, the tokens going on to the end, nothing twice
    walked: list[str] = []
    token = ""
    pages = 0
    while True:
        page = listed(fleet, stub, limit=4, page_token=token)
        assert len(page.jobs) <= 4
        walked += ids(page)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert walked == newest_first
    assert pages == 4
    # filtered pages too
    page = listed(fleet, stub, states=[failed], limit=2)
    rest = listed(fleet, stub, states=[failed], limit=2, page_token=page.next_page_token)
    assert (ids(page), ids(rest), rest.next_page_token) == (
        ["fail-2", "fail-1"], ["fail-0"], "",
    )  # fmt: skip

    # each bad field is named
    assert refused(fleet, stub, states=[99]) == "states: 99 is not a job state"
    assert refused(fleet, stub, states=[0]) == "states: 0 is not a job state"
    assert refused(fleet, stub, job_type="no spaces").startswith("job_type: letters, digits")
    assert refused(fleet, stub, schedule="a@b").startswith("schedule: a schedule's name")
    assert refused(fleet, stub, submitted_since="yesterday") == (
        "submitted_since: not an RFC 3339 time: 'yesterday'"
    )
    assert refused(fleet, stub, submitted_until="x" * 100).startswith(
        "submitted_until: not an RFC 3339 time: 'xxx"
    )
    assert refused(fleet, stub, submitted_since="2026-01-02T00:00:00Z",
                   submitted_until="2026-01-01T00:00:00Z") == (
        "submitted_until: must be after submitted_since"
    )  # fmt: skip
    assert refused(fleet, stub, limit=1001) == "limit: must be 0..1000 (0: 50)"
    assert refused(fleet, stub, page_token="junk") == "page_token: not a token this service gave"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Submit(fleet.request("echo", "bad-schedule", schedule="no spaces"), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith("schedule: a schedule's name")

    # the same through the real grpcurl, with reflection and no proto file
    answer = grpcurl_json(
        "-plaintext", "-d", '{"states": ["FAILED"], "limit": 2}', orchestrator.target,
        "orchestrator.OrchestratorService/ListJobs",
    )  # fmt: skip
    assert [job["jobId"] for job in answer["jobs"]] == ["fail-2", "fail-1"]
    assert answer["nextPageToken"]
    stub.CancelJob(pb2.JobRequest(job_id="long"), timeout=15)
    assert redis_client.zcard(INDEX) == len(submitted)


def test_each_job_submitted_adds_one_index_entry_with_one_zadd(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.worker()
    # its registration (a ZADD into the role index) at start only, not every 5 s meanwhile
    orchestrator = fleet.orchestrator(JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS="3600")
    stub = fleet.stub(orchestrator)
    redis_client.config_resetstat()
    jobs = 300
    for i in range(jobs):
        stub.Submit(fleet.request("echo", f"j{i}"), timeout=10)
    for i in range(0, jobs, 10):  # a known id again: no new job, no new entry
        assert stub.Submit(fleet.request("echo", f"j{i}"), timeout=10).existing
    assert redis_client.zcard(INDEX) == jobs
    stats = redis_client.info("commandstats")
    # counted inside the submit script too; the one more is the orchestrator's registration,
    # when it comes after the reset
    assert jobs <= stats["cmdstat_zadd"]["calls"] <= jobs + 1
    assert "cmdstat_zrem" not in stats  # the trim is off the submit path
    fleet.wait_job(stub, f"j{jobs - 1}", TERMINAL)
    page = listed(fleet, stub, limit=1000)
    assert ids(page) == [f"j{i}" for i in reversed(range(jobs))]


def test_junk_in_the_index_is_skipped_counted_and_said_once(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.worker()
    metrics = free_port()
    orchestrator = fleet.orchestrator(
        JOBWORKER_METRICS__PORT=str(metrics), JOBWORKER_METRICS__HOST="127.0.0.1"
    )
    stub = fleet.stub(orchestrator)
    stub.Submit(fleet.request("echo", "good"), timeout=10)
    fleet.wait_job(stub, "good", TERMINAL)
    newest = redis_client.zscore(INDEX, "good")
    assert newest is not None
    redis_client.zadd(INDEX, {b"\xff\xfe": newest - 1, b"junk-record": newest - 2})
    redis_client.set("wpm-job:junk-record", b"not json {")
    for _ in range(2):
        assert ids(listed(fleet, stub)) == ["good"]

    def counted() -> dict[str, float]:
        samples = scrape(metrics)
        return {
            kind: samples[("jobworker_orchestrator_bad_data_total", frozenset({("kind", kind)}))]
            for kind in ("job_index", "job_record")
        }

    assert counted() == {"job_index": 1, "job_record": 1}
    log = orchestrator.log()
    assert len(re.findall(r"bad data: wpm-jobs:index member .*not a job id; skipped", log)) == 1
    assert len(re.findall(r"bad data: wpm-job:junk-record: .*DATA_LOSS", log)) == 1

    # the whole key junk: listing answers DATA_LOSS, submits go on (unindexed)
    redis_client.delete(INDEX)
    redis_client.set(INDEX, b"junk")
    with pytest.raises(grpc.RpcError) as caught:
        listed(fleet, stub)
    assert caught.value.code() is grpc.StatusCode.DATA_LOSS
    assert caught.value.details() == f"job index {INDEX}: unreadable: not a sorted set"
    stub.Submit(fleet.request("echo", "after"), timeout=10)
    assert fleet.state(fleet.wait_job(stub, "after", TERMINAL)) == "SUCCEEDED"
    wait_for(lambda: counted()["job_index"] == 2, what="the junk key counted")
    assert "Traceback" not in orchestrator.log()
