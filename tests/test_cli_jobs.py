"""`jobworker submit`, `job`, `cancel` and `jobs` as people meet them: real processes (a
redis-server, an orchestrator, a worker), the CLI piped and on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from tests.helpers import ROOT, RedisServer, WorkerProcess, wait_for
from tests.test_cli import cli
from tests.test_cli import start_cli as start_cli  # the fixture
from tests.test_orchestrator import Fleet

# the exit codes `--wait` ends with (the --help epilog documents them)
SUCCEEDED, CALL_FAILED, USAGE, FAILED, CANCELLED, TIMED_OUT, WAIT_EXPIRED = 0, 1, 2, 3, 4, 5, 6


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


@pytest.fixture
def up(fleet: Fleet) -> tuple[Fleet, WorkerProcess, WorkerProcess, dict[str, str]]:
    """A worker, an orchestrator, and a CLI environment that finds the orchestrator by
    $JOBWORKER_ORCHESTRATOR_TARGET (no --target)."""
    worker = fleet.worker()
    orchestrator = fleet.orchestrator()
    env = fleet.env(JOBWORKER_ORCHESTRATOR_TARGET=orchestrator.target)
    return fleet, worker, orchestrator, env


def job_json(env: dict[str, str], job_id: str) -> dict[str, object]:
    got = cli(env, "job", job_id, "--json")
    assert got.returncode == 0, got.stderr
    return dict(json.loads(got.stdout))


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def fields(block: str) -> dict[str, str]:
    """A job's block (`job ID`) as its fields, up to the attempts."""
    head = block.split("\n\n")[0]
    return dict(line.split(None, 1) for line in lines(head))


def test_submit_follow_and_exit_per_outcome(
    up: tuple[Fleet, WorkerProcess, WorkerProcess, dict[str, str]],
) -> None:
    _, worker, orchestrator, env = up
    ok = cli(env, "submit", "echo", "-p", "a=1", "--id", "ok", "--wait")
    assert (ok.returncode, ok.stderr) == (SUCCEEDED, ""), ok.stderr
    out = lines(ok.stdout)
    # a plain line per change (piped), then the outcome and the result
    assert re.fullmatch(
        rf"ok  SUCCEEDED in \S+ \(1 attempt, last on {re.escape(worker.target)}\)", out[-2]
    ), out
    assert out[-1] == 'result: {"a":"1"}'
    assert all(re.match(r"ok  (PENDING|DISPATCHED|RUNNING) ", line) for line in out[:-2]), out
    assert "\r" not in ok.stdout
    assert "\x1b" not in ok.stdout

    failed = cli(env, "submit", "fail", "-p", "message=boom", "--id", "bad", "--wait")
    assert failed.returncode == FAILED, failed.stderr
    assert lines(failed.stdout)[-2].startswith("bad  FAILED in ")
    assert lines(failed.stdout)[-1] == "error: JobFailedError: boom"

    slow = cli(env, "submit", "sleep", "-p", "seconds=5", "--job-timeout", "0.3", "--id",
               "slow", "--wait")  # fmt: skip
    assert slow.returncode == TIMED_OUT, slow.stderr
    assert lines(slow.stdout)[-2].startswith("slow  TIMED_OUT in ")
    assert lines(slow.stdout)[-1] == "error: timed out after 0.3s"

    # --timeout ends the wait, not the job
    began = time.monotonic()
    waited = cli(env, "submit", "sleep", "-p", "seconds=3", "--id", "waited", "--wait",
                 "--timeout", "0.5")  # fmt: skip
    assert waited.returncode == WAIT_EXPIRED, waited.stderr
    assert time.monotonic() - began < 2.5
    assert re.fullmatch(
        r"jobworker: stopped waiting after 0\.5s \(--timeout\): job waited is (PENDING|DISPATCHED"
        r"|RUNNING) and goes on; `jobworker job waited --wait` follows it again\n",
        waited.stderr,
    ), waited.stderr
    again = cli(env, "job", "waited", "--wait")
    assert again.returncode == SUCCEEDED, again.stderr
    assert lines(again.stdout)[-1] == 'result: {"slept":3.0}'

    # without --wait: at once, exit 0 whatever becomes of the job
    queued = cli(env, "submit", "fail", "--id", "queued")
    assert (queued.returncode, queued.stdout) == (0, "submitted queued (PENDING)\n")
    known = cli(env, "submit", "fail", "--id", "queued")
    assert known.returncode == 0
    assert re.fullmatch(r"job queued exists already \(\w+\): not submitted again\n", known.stdout)
    # a job already ended: --wait shows its end at once and exits by it
    wait_for(lambda: job_json(env, "queued")["state"] == "FAILED", what="queued to fail")
    ended = cli(env, "job", "queued", "--wait")
    assert ended.returncode == FAILED
    assert lines(ended.stdout)[0].startswith("queued  FAILED in ")
    # the older spelling, and --json: the message each change (a JSON line), the same exit code
    watched = cli(env, "jobs", "watch", "queued", "--json")
    assert watched.returncode == FAILED
    assert [json.loads(line)["state"] for line in lines(watched.stdout)] == ["FAILED"]
    execute = cli(env, "submit", "echo", "-p", "b=2", "--wait", "--json")
    assert execute.returncode == SUCCEEDED
    assert json.loads(execute.stdout)["job"]["resultJson"] == '{"b":"2"}'

    # an orchestrator that does not even answer the submit: the call failed (1), not the wait
    orchestrator.signal(signal.SIGSTOP)
    try:
        frozen = cli(env, "submit", "echo", "--wait", "--timeout", "0.5")
    finally:
        orchestrator.signal(signal.SIGCONT)
    assert (frozen.returncode, frozen.stderr) == (
        CALL_FAILED,
        f"jobworker: TimeoutError: no answer from {orchestrator.target} within 0.5s (--timeout)\n",
    )  # fmt: skip


def test_a_job_cancelled_while_waited_for(
    up: tuple[Fleet, WorkerProcess, WorkerProcess, dict[str, str]],
    start_cli: Callable[..., subprocess.Popen[str]],
) -> None:
    _, worker, _, env = up
    waiting = start_cli(env, "submit", "sleep", "-p", "seconds=60", "--id", "c1", "--wait")
    wait_for(lambda: cli(env, "job", "c1", "--json").returncode == 0
             and job_json(env, "c1")["state"] == "RUNNING", what="c1 running")  # fmt: skip
    watching = start_cli(env, "jobs", "watch", "c1")
    cancelled = cli(env, "cancel", "c1")
    assert cancelled.returncode == 0, cancelled.stderr
    block = lines(cancelled.stdout)
    shown = fields(cancelled.stdout)
    assert (shown["job"], shown["type"], shown["state"]) == ("c1", "sleep", "CANCELLED")
    assert shown["error"] == "cancelled by request"
    assert block[-2].split()[:2] == ["#", "WORKER"]  # the attempts table
    assert block[-1].split()[:3] == ["1", worker.target, "1"]
    assert block[-1].split()[-4:] == ["CANCELLED", "cancelled", "by", "request"]
    for process in (waiting, watching):
        out, err = process.communicate(timeout=30)
        assert process.returncode == CANCELLED, err
        assert lines(out)[-2].startswith("c1  CANCELLED in "), out
        assert lines(out)[-1] == "error: cancelled by request"
    # cancelling a job that has ended shows it as it is
    again = cli(env, "jobs", "cancel", "c1")
    assert again.returncode == 0
    assert fields(again.stdout)["state"] == "CANCELLED"


def test_job_shows_its_attempts_and_jobs_lists_with_filters(
    up: tuple[Fleet, WorkerProcess, WorkerProcess, dict[str, str]],
) -> None:
    fleet, worker, orchestrator, env = up
    for job_id, job_type in (("e1", "echo"), ("f1", "fail"), ("e2", "echo"), ("s1", "sleep")):
        params = ["-p", "seconds=0.2"] if job_type == "sleep" else []
        assert cli(env, "submit", job_type, "--id", job_id, *params, "--wait").returncode in (0, 3)
    stub = fleet.stub(orchestrator)
    stub.Submit(fleet.request("echo", "nightly@2026-01-01T00:00:00Z", schedule="nightly"))
    fleet.wait_job(stub, "nightly@2026-01-01T00:00:00Z", {"SUCCEEDED"})

    shown = cli(env, "job", "f1")
    assert shown.returncode == 0, shown.stderr
    block = lines(shown.stdout)
    f1 = fields(shown.stdout)
    assert (f1["job"], f1["type"], f1["state"]) == ("f1", "fail", "FAILED")
    assert f1["error"] == "JobFailedError: failed as asked"
    assert re.fullmatch(r"waited \S+, last attempt ran \S+, took \S+ in all", f1["timings"])
    assert block[block.index("") + 1] == "attempts:"
    assert block[-1].split()[:3] == ["1", worker.target, "1"]
    scheduled = fields(cli(env, "job", "nightly@2026-01-01T00:00:00Z").stdout)
    assert scheduled["schedule"] == "nightly"

    table = cli(env, "jobs")
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in lines(table.stdout)]
    assert rows[0] == ["ID", "TYPE", "STATE", "ATTEMPTS", "WORKER", "SUBMITTED", "TOOK"]
    assert [row[0] for row in rows[1:]] == ["nightly@2026-01-01T00:00:00Z", "s1", "e2", "f1", "e1"]
    s1 = rows[2]
    assert s1[1:5] == ["sleep", "SUCCEEDED", "1", worker.target]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", s1[5])
    assert re.fullmatch(r"\d+(\.\d)?(ms|s)", s1[6])

    def listed(*args: str) -> list[str]:
        result = cli(env, "jobs", *args)
        assert result.returncode == 0, result.stderr
        if result.stdout == "no jobs\n":
            return []
        return [line.split()[0] for line in lines(result.stdout)[1:]]

    assert listed("--state", "failed") == ["f1"]
    assert listed("--state", "FAILED,succeeded", "--type", "echo") == [
        "nightly@2026-01-01T00:00:00Z", "e2", "e1",
    ]  # fmt: skip
    assert listed("--schedule", "nightly") == ["nightly@2026-01-01T00:00:00Z"]
    assert listed("list", "--type", "sleep") == ["s1"]  # `jobs list` is `jobs`
    assert listed("--since", "1h") == listed()
    assert listed("--until", "1h") == []
    assert listed("--since", "2000-01-01T00:00:00+00:00", "--until", "now", "--limit", "2") == [
        "nightly@2026-01-01T00:00:00Z", "s1",
    ]  # fmt: skip
    # a page token goes on where the last listing stopped
    first = cli(env, "jobs", "--limit", "3")
    token = re.fullmatch(r"\(3 shown, 3 looked at; more: --page-token (\S+)\)\n", first.stderr)
    assert token, first.stderr
    assert listed("--limit", "3", "--page-token", token[1]) == ["f1", "e1"]
    as_json = json.loads(cli(env, "jobs", "--state", "failed", "--json").stdout)
    assert [job["jobId"] for job in as_json["jobs"]] == ["f1"]

    # usage errors: exit 2, one line naming the option
    for args, named in (
        (["--state", "bogus"], "--state: unknown state 'bogus'"),
        (["--since", "yesterday"], "--since: expected an ISO 8601 time"),
        (["--since", "1h", "--until", "2h"], "--until: must be after --since"),
        (["--limit", "0"], "--limit: must be at least 1"),
    ):
        bad = cli(env, "jobs", *args)
        assert bad.returncode == USAGE
        assert bad.stderr.startswith(f"jobworker: config error: {named}"), bad.stderr
        assert len(lines(bad.stderr)) == 1
    missing = cli(env, "job", "nope")
    assert (missing.returncode, missing.stderr) == (
        CALL_FAILED, "jobworker: NOT_FOUND: no job with id 'nope'\n",
    )  # fmt: skip


def test_the_older_spellings_still_work(
    up: tuple[Fleet, WorkerProcess, WorkerProcess, dict[str, str]],
) -> None:
    _, _, orchestrator, env = up
    target = ["--target", orchestrator.target]
    submitted = cli(env, "jobs", "submit", "echo", "-p", "a=1", "--id", "old", "--json", *target)
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout) == {"jobId": "old", "state": "PENDING"}
    wait_for(lambda: job_json(env, "old")["state"] == "SUCCEEDED", what="old to succeed")
    got = cli(env, "jobs", "get", "old", "--json", *target)
    assert json.loads(got.stdout)["resultJson"] == '{"a":"1"}'
    assert fields(cli(env, "jobs", "get", "old", *target).stdout)["state"] == "SUCCEEDED"
    watched = cli(env, "jobs", "watch", "old", *target)
    assert watched.returncode == SUCCEEDED
    assert cli(env, "jobs", "cancel", "old", *target).returncode == 0


def test_one_worker_directly(
    up: tuple[Fleet, WorkerProcess, WorkerProcess, dict[str, str]],
) -> None:
    _, worker, _, env = up
    direct = ["--worker", worker.target]
    sent = cli(env, "submit", "echo", "-p", "a=1", "--id", "d1", *direct)
    assert sent.returncode == 0, sent.stderr
    assert re.fullmatch(rf"sent d1 to {worker.target} \((QUEUED|RUNNING|SUCCEEDED)\)\n",
                        sent.stdout)  # fmt: skip
    ran = cli(env, "submit", "sleep", "-p", "seconds=0.8", "--id", "d2", "--wait", *direct)
    assert ran.returncode == SUCCEEDED, ran.stderr
    assert lines(ran.stdout)[-2].startswith("d2  SUCCEEDED in ")
    assert lines(ran.stdout)[-1] == 'result: {"slept":0.8}'
    failed = cli(env, "submit", "fail", "--wait", *direct)
    assert failed.returncode == FAILED
    shown = fields(cli(env, "job", "d2", *direct).stdout)
    assert (shown["job"], shown["type"], shown["state"], shown["worker"]) == (
        "d2", "sleep", "SUCCEEDED", worker.target,
    )  # fmt: skip
    assert re.fullmatch(r"ran (8\d\dms|\d\.\ds)", shown["timings"])
    long = cli(env, "submit", "sleep", "-p", "seconds=60", "--id", "d3", *direct)
    assert long.returncode == 0
    cancelled = cli(env, "cancel", "d3", *direct)
    assert fields(cancelled.stdout)["state"] == "CANCELLED"
    assert cli(env, "job", "d3", "--wait", *direct).returncode == CANCELLED
    expired = cli(env, "submit", "sleep", "-p", "seconds=3", "--id", "d4", "--wait",
                  "--timeout", "0.5", *direct)  # fmt: skip
    assert expired.returncode == WAIT_EXPIRED
    assert re.fullmatch(
        r"jobworker: stopped waiting after 0\.5s \(--timeout\): job d4 is (QUEUED|RUNNING) and"
        rf" goes on; `jobworker job d4 --wait --worker {re.escape(worker.target)}` follows it"
        r" again\n",
        expired.stderr,
    ), expired.stderr
    assert cli(env, "job", "d4", "--wait", *direct).returncode == SUCCEEDED
    # the orchestrator's options do not go to a worker
    wrong = cli(env, "submit", "echo", "--priority", "3", *direct)
    assert (wrong.returncode, wrong.stderr) == (
        USAGE, "jobworker: config error: --priority: is the orchestrator's: not with --worker\n",
    )  # fmt: skip
    # nor does a worker answer for the orchestrator
    at_worker = cli(env, "jobs", "--target", worker.target)
    assert at_worker.returncode == CALL_FAILED
    assert at_worker.stderr == (
        f"jobworker: {worker.target} is a worker, not an orchestrator (from --target)\n"
    )


def on_a_terminal(env: dict[str, str], *args: str, timeout: float = 30) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its stdout and stderr: (exit code, what it wrote)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", *args], env={**env, "COLUMNS": "200"}, cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    written = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            written += chunk
        return process.wait(timeout=10), written.decode()
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_on_a_terminal_the_wait_is_one_line_rewritten_in_place(
    up: tuple[Fleet, WorkerProcess, WorkerProcess, dict[str, str]],
) -> None:
    _, worker, _, env = up
    code, written = on_a_terminal(env, "submit", "sleep", "-p", "seconds=2.5", "--id", "t1",
                                  "--wait")  # fmt: skip
    assert code == SUCCEEDED, written
    # each state, and the elapsed time once a second, redrawn over the same line
    redraws = written.split("\r\x1b[K")
    assert redraws[0] == ""
    drawn = redraws[1:-1]
    assert len(drawn) >= 3, written  # a state, and at least two redraws of the time
    assert all(re.match(r"t1  (PENDING|DISPATCHED|RUNNING|SUCCEEDED)\s", d) for d in drawn)
    assert not any("\n" in d for d in drawn)  # never a new line until the end
    times = [re.search(r"\s(\d+(\.\d)?(ms|s))(\s|$)", d) for d in drawn]
    assert all(times), drawn
    # the end replaces the live line: the outcome, then the result, each on its own line
    assert re.fullmatch(
        rf"t1  SUCCEEDED in 2\.\ds \(1 attempt, last on {re.escape(worker.target)}\)\r\n"
        r'result: \{"slept":2\.5\}\r\n',
        redraws[-1],
    ), redraws[-1]
    # piped, the same wait is plain lines, one per change, and no control characters
    piped = cli(env, "job", "t1", "--wait")
    assert piped.stdout.count("\n") == 2
    assert "\r" not in piped.stdout
    assert "\x1b" not in piped.stdout


def test_help_shows_one_spelling_and_the_exit_codes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    top = cli(env, "--help").stdout
    for command in ("submit", "job", "cancel", "jobs"):
        assert re.search(rf"^    {command} +\S", top, re.M), command
    jobs = cli(env, "jobs", "--help").stdout
    for alias in ("submit", "get", "cancel", "watch"):
        assert alias not in re.findall(r"\{([^}]*)\}", jobs), jobs  # no choices listed
    assert "[list]" in jobs
    for option in ("--state", "--type", "--schedule", "--since", "--until", "--limit", "--json",
                   "--page-token", "--target", "JOBWORKER_ORCHESTRATOR_TARGET"):  # fmt: skip
        assert option in jobs, option
    submit = cli(env, "submit", "--help").stdout
    for option in ("--worker", "--wait", "--timeout", "--job-timeout", "--json"):
        assert option in submit, option
    for code, meaning in (("0", "SUCCEEDED"), ("3", "FAILED"), ("4", "CANCELLED"),
                          ("5", "TIMED_OUT"), ("6", "--timeout ran out"), ("1", "call failed"),
                          ("2", "bad option")):  # fmt: skip
        assert re.search(rf"^  {code}  .*{re.escape(meaning)}", submit, re.M), (code, submit)
    assert "exit codes:" in cli(env, "job", "--help").stdout
    # an alias still answers its own --help
    assert cli(env, "jobs", "watch", "--help").returncode == 0
