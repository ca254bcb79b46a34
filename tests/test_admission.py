"""The orchestrator's admission of a submission: pure decisions, then the service and the
directory around them (memory stores, PodInfo as workers write it)."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from app.config import OrchestratorConfig
from app.core.balancer import PowerOfTwoChoices
from app.fleet.batch_job import BatchJob
from app.fleet.job_signature import CallShape, advertised, shape_of, signature_of
from app.fleet.pod_info import PodInfo, PodStatus, encode_pod_info
from app.orchestrator.admission import (
    Refusal,
    RefusalKind,
    admit,
    params_problem,
    reuse_problem,
    willing,
)
from app.orchestrator.directory import WorkerDirectory
from app.orchestrator.dispatcher import Dispatcher
from app.orchestrator.memory_worker_client import MemoryWorkerClient
from app.orchestrator.service import OrchestratorService
from app.pb import orchestrator as pb
from app.stores.memory import MemoryJobEvents, MemoryJobStore, MemoryPodRegistry
from app.worker.builtin_jobs import demo, echo, sleep


def sleep_v2(seconds: float = 1.0, unit: str = "s") -> None:
    """`sleep` of a newer version: it takes a unit too."""


def resize(image: str, width: int) -> None: ...


V1, V2, ECHO = shape_of(sleep), shape_of(sleep_v2), shape_of(echo)


# --- the pure decisions ---------------------------------------------------------------------------


def test_params_every_runner_refuses_are_refused_with_the_first_runners_reason() -> None:
    assert params_problem("sleep", {"seconds": "abc"}, [V1, V1]) == (
        "params.seconds: expected a number, got 'abc'"
    )
    assert params_problem("sleep", {"unit": "ms"}, [V1, V2]) is None  # the newer takes it
    assert params_problem("sleep", {"seconds": "2"}, [V1]) is None
    assert params_problem("sleep", {"unit": "ms"}, [V1]) == (
        "params.unit: job 'sleep' takes no such parameter"
    )
    assert params_problem("resize", {"image": "a"}, [shape_of(resize)]) == (
        "params.width: required by job 'resize'"
    )
    assert params_problem("echo", {"anything": "at all"}, [ECHO]) is None


def test_a_runner_that_does_not_say_or_no_runner_at_all_leaves_params_unchecked() -> None:
    assert params_problem("sleep", {"seconds": "abc"}, [V1, None]) is None
    assert params_problem("sleep", {"seconds": "abc"}, []) is None


def test_admit_refuses_an_unknown_type_only_while_some_worker_is_live() -> None:
    assert admit("nope", {}, live=2, runners=[]) == Refusal(
        kind=RefusalKind.NOT_FOUND, message="no worker runs job type 'nope'"
    )
    assert admit("nope", {}, live=0, runners=[]) is None  # waits for a worker
    assert admit("sleep", {"seconds": "x"}, live=1, runners=[V1]) == Refusal(
        kind=RefusalKind.INVALID_ARGUMENT,
        message="params.seconds: expected a number, got 'x'",
    )


def test_willing_picks_the_workers_of_the_version_that_takes_the_params() -> None:
    fleet: dict[str, CallShape | None] = {"a": V1, "b": V2, "c": V2}
    assert willing("sleep", {"unit": "ms"}, fleet) == frozenset({"b", "c"})
    assert willing("sleep", {"seconds": "1"}, fleet) == frozenset({"a", "b", "c"})
    assert willing("sleep", {"colour": "red"}, fleet) is None  # none: any, and it refuses
    assert willing("sleep", {"unit": "ms"}, {"a": V1, "old": None}) == frozenset({"old"})
    # one version: nothing to choose between, nothing judged
    assert willing("sleep", {"unit": "ms"}, {"a": V1, "b": V1}) is None
    assert willing("sleep", {"unit": "ms"}, {}) is None


def job(job_type: str = "sleep", **params: str) -> BatchJob:
    return BatchJob(job_id="nightly@2026-03-01T00:00:00Z", job_type=job_type, params=params)


def test_a_reused_id_is_refused_naming_what_differs() -> None:
    first = job(seconds="1")
    assert reuse_problem(job(seconds="1"), first) is None
    assert reuse_problem(job("echo", seconds="1"), first) == (
        "job 'nightly@2026-03-01T00:00:00Z' exists with job type 'sleep', not 'echo'"
    )
    assert reuse_problem(job(seconds="2"), first) == (
        "job 'nightly@2026-03-01T00:00:00Z' exists with other params: params.seconds was '1',"
        " now '2'"
    )
    assert reuse_problem(job(seconds="1", unit="ms", a="b"), first) == (
        "job 'nightly@2026-03-01T00:00:00Z' exists with other params: params.a was not given,"
        " now 'b' (and 1 more)"
    )
    long = reuse_problem(job(seconds="9" * 1000), first)
    assert long is not None
    assert len(long) < 300  # a client's megabyte is not echoed


# --- the service and the directory ----------------------------------------------------------------


def pod(port: int, jobs: dict[str, Any], *, names: list[str] | None = None) -> bytes:
    now = time.time()
    return encode_pod_info(
        PodInfo(
            grpc_port=port, status=PodStatus.IDLE, update_datetime="", ip="10.0.0.1",
            update_epoch_ms=int(now * 1000), job_names=sorted(jobs) if names is None else names,
            job_signatures=advertised((n, signature_of(f)) for n, f in sorted(jobs.items()))
            .signatures,
        )
    )  # fmt: skip


async def service_on(registry: MemoryPodRegistry) -> OrchestratorService:
    store = MemoryJobStore()
    await store.ensure_group()
    directory = WorkerDirectory(registry)
    await directory.refresh()
    config = OrchestratorConfig()
    events = MemoryJobEvents(store)
    dispatcher = Dispatcher(store, events, directory, MemoryWorkerClient({}),
                            PowerOfTwoChoices(), config, consumer="o1")  # fmt: skip
    return OrchestratorService(store, events, directory, dispatcher, config)


async def refusal(
    service: OrchestratorService, job_type: str, **params: str
) -> tuple[Status, str | None]:
    with pytest.raises(GRPCError) as refused:
        await service.submit(pb.BatchExecutionRequest(job_type=job_type, params=params))
    return refused.value.status, refused.value.message


@pytest.mark.anyio
async def test_submit_checks_params_against_the_live_workers_signatures() -> None:
    registry = MemoryPodRegistry()
    await registry.put("wpm-apps:10.0.0.1:1", pod(9091, {"sleep": sleep, "echo": echo}), 60)
    await registry.put("wpm-apps:10.0.0.1:2", pod(9092, {"sleep": sleep_v2, "demo": demo}), 60)
    service = await service_on(registry)
    invalid = Status.INVALID_ARGUMENT
    assert await refusal(service, "sleep", seconds="abc") == (
        invalid, "params.seconds: expected a number, got 'abc'"
    )  # fmt: skip
    assert await refusal(service, "sleep", colour="red") == (
        invalid, "params.colour: job 'sleep' takes no such parameter"
    )  # fmt: skip
    assert await refusal(service, "nope") == (Status.NOT_FOUND, "no worker runs job type 'nope'")
    for job_type, params in [("sleep", {"unit": "ms"}), ("echo", {"x": "1", "y": "[]"}),
                             ("demo", {"seconds": "0", "extra": "taken by **params"})]:  # fmt: skip
        answer = await service.submit(pb.BatchExecutionRequest(job_type=job_type, params=params))
        assert answer.existing is False


@pytest.mark.anyio
async def test_a_worker_that_does_not_advertise_leaves_its_jobs_unchecked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = MemoryPodRegistry()
    await registry.put("wpm-apps:10.0.0.1:1", pod(9091, {"sleep": sleep}), 60)
    old = msgspec.json.encode(
        {"grpcPort": 9092, "status": "IDLE", "updateDatetime": "", "ip": "10.0.0.1",
         "updateEpochMs": int(time.time() * 1000), "jobNames": ["sleep"]}
    )  # fmt: skip
    await registry.put("wpm-apps:10.0.0.1:2", old, 60)
    service = await service_on(registry)
    answer = await service.submit(pb.BatchExecutionRequest(job_type="sleep", params={"x": "1"}))
    assert answer.existing is False  # the older worker decides
    # a signature that does not read: said once, unchecked
    broken = msgspec.json.decode(pod(9092, {"sleep": sleep}))
    broken["jobSignatures"]["sleep"] = {"params": "not a list"}
    await registry.put("wpm-apps:10.0.0.1:2", msgspec.json.encode(broken), 60)
    caplog.set_level(logging.WARNING, logger="app.orchestrator.directory")
    directory = service._directory
    for _ in range(3):
        await directory.refresh()
    said = [r.getMessage() for r in caplog.records if "signature of job 'sleep'" in r.getMessage()]
    assert len(said) == 1
    assert "10.0.0.1:9092" in said[0]
    answer = await service.submit(pb.BatchExecutionRequest(job_type="sleep", params={"x": "1"}))
    assert answer.existing is False


@pytest.mark.anyio
async def test_workers_of_one_version_share_one_compiled_shape() -> None:
    registry = MemoryPodRegistry()
    for i in range(3):
        await registry.put(f"wpm-apps:10.0.0.1:{i}", pod(9091 + i, {"sleep": sleep}), 60)
    directory = WorkerDirectory(registry)
    await directory.refresh()
    shapes = {id(directory.shape(e, "sleep")) for e in directory.entries()}
    first = directory.shape(directory.entries()[0], "sleep")
    assert len(shapes) == 1
    assert first is not None
    await directory.refresh()  # the next refresh compiles nothing again
    assert directory.shape(directory.entries()[0], "sleep") is first


@pytest.mark.anyio
async def test_a_repeat_of_a_request_accepted_unchecked_still_answers_its_job() -> None:
    """Accepted with no live worker (unchecked), then a worker that refuses the params comes:
    the same request with the same id is still answered with its job; any other is refused."""
    registry = MemoryPodRegistry()
    service = await service_on(registry)
    bad = pb.BatchExecutionRequest(job_id="early", job_type="sleep", params={"seconds": "abc"})
    assert (await service.submit(bad)).existing is False
    await registry.put("wpm-apps:10.0.0.1:1", pod(9091, {"sleep": sleep}), 60)
    await service._directory.refresh()
    assert (await service.submit(bad)).existing is True
    for request in (
        pb.BatchExecutionRequest(job_id="other", job_type="sleep", params={"seconds": "abc"}),
        pb.BatchExecutionRequest(job_id="early", job_type="sleep", params={"seconds": "xyz"}),
    ):
        with pytest.raises(GRPCError) as refused:
            await service.submit(request)
        assert refused.value.status is Status.INVALID_ARGUMENT
        assert (refused.value.message or "").startswith("params.seconds: expected a number")
