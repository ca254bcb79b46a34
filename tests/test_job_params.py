"""Job params checked at submit, end to end (issue 11, point 12): real workers that advertise
their jobs' signatures, a real orchestrator, a real redis-server, the CLI and the trigger's
client. A refusal names the field at once, instead of a job that fails later; a reused id with
another job type or other params is refused instead of answered with the old job."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import grpc
import pytest
import redis

from app.trigger.orchestrator_client import GrpcOrchestratorClient, Submitted, TickJob
from tests.helpers import ROOT, RedisServer, WorkerProcess, wait_for
from tests.test_orchestrator import TERMINAL, Fleet

JOBS_V1 = """
    import enum
    from app import job

    class Size(enum.Enum):
        S = "s"
        M = "m"

    @job
    async def resize(image: str, width: int, size: Size = Size.M) -> dict[str, object]:
        return {"image": image, "width": width, "size": size.value, "version": 1}
"""
# the next version of the same module: resize takes a quality too
JOBS_V2 = JOBS_V1.replace(
    "size: Size = Size.M) -> dict[str, object]:", "size: Size = Size.M, quality: int = 80) -> dict:"
).replace('"version": 1', '"version": 2')


def jobs_module(tmp: Path, version: str, source: str) -> str:
    """A folder holding `sigjobs.py`: the PYTHONPATH of a worker that runs it."""
    folder = tmp / version
    folder.mkdir()
    (folder / "sigjobs.py").write_text(textwrap.dedent(source))
    return f"{folder}:{ROOT}"


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


def worker_with(fleet: Fleet, version: str, source: str) -> WorkerProcess:
    path = jobs_module(fleet.tmp, version, source)
    return fleet.start("worker", "--jobs", "sigjobs", PYTHONPATH=path)


def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip


def test_bad_params_are_refused_at_submit_naming_the_field(fleet: Fleet) -> None:
    worker = worker_with(fleet, "v1", JOBS_V1)
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    wait_for(lambda: len(fleet.workers_view(stub)) == 1, what="the worker discovered")
    r = fleet.request
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (r("sleep", params={"seconds": "abc"}), "params.seconds: expected a number, got 'abc'"),
        (r("resize", params={"image": "a.png"}), "params.width: required by job 'resize'"),
        (r("sleep", params={"colour": "red"}),
         "params.colour: job 'sleep' takes no such parameter"),
        (r("resize", params={"image": "a", "width": "9", "size": "xl"}),
         "params.size: expected one of 's', 'm', got 'xl'"),
        (r("resize", params={"image": "a", "width": "wide"}),
         "params.width: expected an integer, got 'wide'"),
    ]  # fmt: skip
    for request, details in cases:
        assert refused(lambda request=request: stub.Submit(request, timeout=10)) == (
            invalid, details
        )  # fmt: skip
        assert refused(lambda request=request: stub.Execute(request, timeout=10)) == (
            invalid, details
        )  # fmt: skip
    # a **kwargs job takes anything; good params run
    echo = stub.Execute(r("echo", params={"any": "thing", "n": "[1, 2]"}), timeout=30)
    assert fleet.state(echo.job) == "SUCCEEDED"
    good = stub.Execute(r("resize", params={"image": "a", "width": "9", "size": "s"}), timeout=30)
    assert fleet.state(good.job) == "SUCCEEDED"
    assert good.job.result_json == '{"image":"a","width":9,"size":"s","version":1}'
    # none of the refused requests reached the worker
    status = fleet.worker_client(worker).status()
    assert (status.jobs_accepted, status.jobs_rejected) == (2, 0)
    # the CLI prints the one line and exits 1
    env = fleet.env()
    done = cli(env, "jobs", "submit", "sleep", "-p", "seconds=abc", "--target", orch.target)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "jobworker: INVALID_ARGUMENT: params.seconds: expected a number, got 'abc'\n"
    )


def test_a_reused_id_with_other_type_or_params_is_refused(fleet: Fleet) -> None:
    worker = fleet.worker()
    orch = fleet.orchestrator()
    stub = fleet.stub(orch)
    wait_for(lambda: len(fleet.workers_view(stub)) == 1, what="the worker discovered")
    r = fleet.request
    first = stub.Submit(r("sleep", "r1", params={"seconds": "0.2"}), timeout=10)
    exists = grpc.StatusCode.ALREADY_EXISTS
    for call in (stub.Submit, stub.Execute):
        assert refused(lambda call=call: call(r("echo", "r1"), timeout=10)) == (
            exists, "job 'r1' exists with job type 'sleep', not 'echo'"
        )  # fmt: skip
        again = r("sleep", "r1", params={"seconds": "0.3"})
        assert refused(lambda call=call, again=again: call(again, timeout=10)) == (
            exists, "job 'r1' exists with other params: params.seconds was '0.2', now '0.3'"
        )  # fmt: skip
    same = stub.Submit(r("sleep", "r1", params={"seconds": "0.2"}), timeout=10)
    assert (first.existing, same.existing) == (False, True)
    done = stub.Execute(r("sleep", "r1", params={"seconds": "0.2"}), timeout=30)
    assert fleet.state(done.job) == "SUCCEEDED"
    assert len(done.job.attempts) == 1
    assert fleet.worker_client(worker).status().jobs_accepted == 1
    env = fleet.env()
    said = cli(env, "jobs", "submit", "echo", "--id", "r1", "--target", orch.target)
    assert (said.returncode, said.stdout) == (1, "")
    assert said.stderr == (
        "jobworker: ALREADY_EXISTS: job 'r1' exists with job type 'sleep', not 'echo'\n"
    )

    # the trigger's client takes the refusal as "this tick's job exists already"
    async def submit_twice() -> tuple[Submitted, Submitted]:
        client = GrpcOrchestratorClient([orch.target])
        try:
            tick = TickJob(job_id="s@2026-03-01T00:00:00Z", job_type="echo", params={"n": "1"})
            before = await client.submit(tick)
            after = await client.submit(TickJob(job_id=tick.job_id, job_type="echo",
                                                params={"n": "2"}))  # fmt: skip
            return before, after
        finally:
            client.close()

    before, after = anyio.run(submit_twice)
    assert (before.existing, before.differs) == (False, "")
    assert after == Submitted(
        job_id="s@2026-03-01T00:00:00Z", state="", existing=True,
        differs="job 's@2026-03-01T00:00:00Z' exists with other params: params.n was '1',"
        " now '2'",
    )  # fmt: skip
    fleet.wait_job(stub, "s@2026-03-01T00:00:00Z", TERMINAL)


def test_two_versions_of_a_job_during_a_rolling_upgrade(fleet: Fleet) -> None:
    """Params only the newer version takes are admitted and run there; params neither takes
    are refused; what both take runs on either."""
    worker_with(fleet, "v1", JOBS_V1)
    worker_with(fleet, "v2", JOBS_V2)
    # in turn, so that jobs both versions take visibly go to both
    stub = fleet.stub(fleet.orchestrator(JOBWORKER_ORCHESTRATOR__BALANCER="round_robin"))
    wait_for(lambda: len(fleet.workers_view(stub)) == 2, what="both workers discovered")
    r = fleet.request
    for i in range(4):
        done = stub.Execute(
            r("resize", f"q{i}", params={"image": "a", "width": "1", "quality": "50"}), timeout=30
        )
        assert fleet.state(done.job) == "SUCCEEDED", done.job.error
        assert done.job.result_json.endswith('"version":2}')
    assert refused(lambda: stub.Submit(r("resize", params={"image": "a", "width": "1",
                                                           "colour": "red"}), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "params.colour: job 'resize' takes no such parameter"
    )  # fmt: skip
    versions = set()
    for i in range(8):
        done = stub.Execute(r("resize", f"b{i}", params={"image": "a", "width": "1"}), timeout=30)
        versions.add(done.job.result_json[-2])
    assert versions == {"1", "2"}
