"""Log lines: text by default, JSON lines with one switch, each carrying the job, schedule or
worker it concerns (in-process for the formats, real processes for the roles)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
import redis

from app.cli.logs import JsonFormatter, LogFieldsFilter, TextFormatter, log_handler
from app.core.clock import SystemClock
from app.core.log_context import bind_log_fields, log_context, log_fields
from app.scheduling.schedule_manager import ScheduleManager
from app.scheduling.triggers import IntervalTrigger
from tests.grpc_clients import Client
from tests.helpers import ROOT, RedisServer, WorkerProcess, free_port, wait_for
from tests.test_orchestrator import Fleet


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = log_handler("json", stream)
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def record(message: str, **fields: str) -> logging.LogRecord:
    rec = logging.LogRecord("app.orchestrator", logging.INFO, __file__, 1, message, None, None)
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


def test_text_shows_the_fields_the_message_does_not() -> None:
    text = TextFormatter()
    end = text.format(record("job j1 (echo) SUCCEEDED", job_id="j1", worker="10.0.0.7:9091"))
    assert end.endswith(" INFO    app.orchestrator: job j1 (echo) SUCCEEDED [worker=10.0.0.7:9091]")
    assert text.format(record("plain")).endswith("app.orchestrator: plain")
    shown = text.format(record("job j1 on 10.0.0.7:9091", job_id="j1", worker="10.0.0.7:9091"))
    assert shown.endswith(": job j1 on 10.0.0.7:9091")


def _failing() -> None:
    raise ValueError("boom")


def test_json_lines_carry_time_level_logger_message_and_fields() -> None:
    try:
        _failing()
    except ValueError:
        rec = record("job %s failed", job_id="j1", schedule="nightly")
        rec.args = ("j1",)
        rec.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(rec))
    assert list(entry)[:4] == ["ts", "level", "logger", "message"]
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "INFO", "app.orchestrator", "job j1 failed"
    )  # fmt: skip
    assert (entry["job_id"], entry["schedule"]) == ("j1", "nightly")
    assert "worker" not in entry
    assert entry["exc"].endswith("ValueError: boom")
    assert datetime.fromisoformat(entry["ts"]).utcoffset() == timedelta(0)
    assert "\n" not in JsonFormatter().format(rec)


@pytest.mark.anyio
async def test_fields_follow_tasks_and_threads_and_extra_wins(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, _ = captured

    async def job(job_id: str) -> None:
        bind_log_fields(job_id=job_id)  # a task's own context, as the dispatcher's per job
        logger.info("in the task")
        await anyio.to_thread.run_sync(logger.info, "in its worker thread")

        async def child() -> None:
            logger.info("in a child task")

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        with log_context(worker="w:1"):
            logger.info("during a call")
            logger.info("about another worker", extra={"worker": "w:2"})
        logger.info("after the call")

    async with anyio.create_task_group() as tg:
        tg.start_soon(job, "a")
        tg.start_soon(job, "b")
    logger.info("outside")
    assert log_fields() == {}
    seen = {(e["message"], e.get("job_id"), e.get("worker")) for e in lines(stream)}
    for job_id in ("a", "b"):
        assert {
            ("in the task", job_id, None),
            ("in its worker thread", job_id, None),
            ("in a child task", job_id, None),
            ("during a call", job_id, "w:1"),
            ("about another worker", job_id, "w:2"),
            ("after the call", job_id, None),
        } <= seen
    assert ("outside", None, None) in seen
    assert len(seen) == 13


def test_a_line_not_emitted_costs_no_field_lookup(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger, stream, _ = captured
    calls = []
    original = LogFieldsFilter.filter

    def counting(self: LogFieldsFilter, rec: logging.LogRecord) -> bool:
        calls.append(rec.getMessage())
        return original(self, rec)

    monkeypatch.setattr(LogFieldsFilter, "filter", counting)
    with log_context(job_id="j"):
        for _ in range(1000):
            logger.debug("hot path detail")
        logger.info("said")
    assert calls == ["said"]
    assert [e["message"] for e in lines(stream)] == ["said"]


@pytest.mark.anyio
async def test_a_schedules_run_logs_with_its_name(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, _ = captured
    manager = ScheduleManager(SystemClock())
    ran = anyio.Event()

    async def report() -> None:
        logger.info("reporting")
        ran.set()

    clock = manager.clock
    manager.add_schedule(report, IntervalTrigger(0.05, clock.now()), name="report-every-50ms")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(manager.run)
            await ran.wait()
            tg.cancel_scope.cancel()
    (entry,) = [e for e in lines(stream) if e["message"] == "reporting"][:1]
    assert entry["schedule"] == "report-every-50ms"
    assert "job_id" not in entry


# --- the roles, as real processes -----------------------------------------------------------------


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


LOUD_JOBS = textwrap.dedent("""
    import logging

    from app import job

    log = logging.getLogger("loudjobs")


    @job
    async def loud(word: str) -> str:
        log.info("saying %s", word)
        return word


    @job
    def loud_blocking(word: str) -> str:  # in a worker thread
        log.info("saying %s from a thread", word)
        return word
""")


@pytest.mark.parametrize("switch", ["env", "flag"])
def test_json_lines_from_the_roles_name_job_and_worker(fleet: Fleet, switch: str) -> None:
    (fleet.tmp / "loudjobs.py").write_text(LOUD_JOBS)
    json_env = {"JOBWORKER_LOG__FORMAT": "json"} if switch == "env" else {}
    json_args = ["--log-format", "json"] if switch == "flag" else []
    path = f"{fleet.tmp}:{fleet.env()['PYTHONPATH']}"
    worker = fleet.start("worker", "--jobs", "loudjobs", *json_args, PYTHONPATH=path, **json_env)
    orchestrator = fleet.start("orchestrator", *json_args, **json_env)
    stub = fleet.stub(orchestrator)
    for job_id, job_type, params in (
        ("j-async", "loud", {"word": "hi"}),
        ("j-thread", "loud_blocking", {"word": "hi"}),
        ("j-bad", "fail", {"message": "no"}),
    ):
        stub.Execute(fleet.request(job_type, job_id, params=params), timeout=30)
    address = f"127.0.0.1:{worker.port}"

    def entries(proc: WorkerProcess) -> list[dict[str, str]]:
        return [json.loads(line) for line in proc.log().splitlines()]  # every line is JSON

    def job_ends() -> list[dict[str, str]] | None:
        found = [e for e in entries(orchestrator) if "after 1 attempt(s)" in e["message"]]
        return found if len(found) == 3 else None

    ended = wait_for(job_ends, what="three job end lines")
    assert {(e["job_id"], e["worker"]) for e in ended} == {
        ("j-async", address), ("j-thread", address), ("j-bad", address)
    }  # fmt: skip
    said = {e["message"]: e.get("job_id") for e in entries(worker) if e["logger"] == "loudjobs"}
    assert said == {"saying hi": "j-async", "saying hi from a thread": "j-thread"}
    (failed,) = [e for e in entries(worker) if e["message"].startswith("job j-bad (fail) failed")]
    assert failed["job_id"] == "j-bad"
    ready = next(e for e in entries(worker) if e["message"].startswith("worker ready"))
    assert set(ready) == {"ts", "level", "logger", "message"}  # concerns no one job


def test_text_is_the_default_and_shows_fields_beyond_the_message(fleet: Fleet) -> None:
    (fleet.tmp / "loudjobs.py").write_text(LOUD_JOBS)
    path = f"{fleet.tmp}:{fleet.env()['PYTHONPATH']}"
    worker = fleet.start("worker", "--jobs", "loudjobs", PYTHONPATH=path)
    orchestrator = fleet.start("orchestrator")
    fleet.stub(orchestrator).Execute(fleet.request("loud", "t1", params={"word": "x"}), timeout=30)
    Client(fleet.stubs, worker.target).run("loud", "t2", word="y")
    # the job's own lines, whoever sent it; the message does not show its id, so the line does
    assert worker.wait_log(r" INFO    loudjobs: saying x \[job_id=t1\]\n", timeout=10)
    assert worker.wait_log(r" INFO    loudjobs: saying y \[job_id=t2\]\n", timeout=10)
    assert orchestrator.wait_log(
        rf"app\.orchestrator\.dispatcher: job t1 \(loud\) SUCCEEDED after 1 attempt\(s\)"
        rf" \[worker=127\.0\.0\.1:{worker.port}\]$",
        timeout=10,
    )


def test_a_bad_log_format_exits_2_naming_the_key(fleet: Fleet) -> None:
    env = fleet.env(JOBWORKER_LOG__FORMAT="xml", JOBWORKER_GRPC__PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "app", "worker"], env=env, capture_output=True,
                            text=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "jobworker: config error: log.format (from JOBWORKER_LOG__FORMAT): must be text or json"
    )
