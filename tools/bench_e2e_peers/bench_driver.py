"""The benchmark's client for one system, run by tools/bench_e2e.py in that system's venv.

    python bench_driver.py --system saq --redis URL --stamps PATH [--target HOST:PORT]

It connects, answers `{"ready": true}` on stdout, then runs one command per line read on stdin
(`{"scenario": ..., "jobs": N, "concurrency": C, "rate": R, "tag": ..., "timeout": S}`) and
answers each with one JSON line of what it saw. Stdlib and the system's own library only.

Scenarios (the clock starts at the first enqueue):
- submit:  C enqueuers share N jobs, each awaits its enqueue before the next; the clock stops when
           every job has run and the system says it is finished (1 enqueuer: one at a time);
- execute: C callers share N jobs, each enqueues one and waits for its result (the system's own
           run-and-wait) before the next; the clock stops with the last answer;
- paced:   N jobs enqueued one at a time at R per second (on a fixed timetable, not a sleep after
           each), then as submit; each job's latency is its start stamp minus the time just
           before its enqueue call.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench_stamps import StampReader

STAMP_POLL = 0.002  # seconds between reads of the stamp file while waiting for jobs to run


class Driver:
    """Runs the scenarios through one system's adapter."""

    def __init__(self, adapter: Any, stamps: StampReader) -> None:
        self.adapter = adapter
        self.stamps = stamps
        self.started: dict[str, float] = {}  # tag -> start stamp (time.time())
        self.repeats = 0
        self.pool: ThreadPoolExecutor | None = None

    async def call(self, method: Callable[[str], Any], tag: str, overlapping: bool) -> None:
        """One client call; a synchronous library's goes to a thread when calls overlap."""
        if not self.adapter.blocking:
            await method(tag)
        elif overlapping:
            assert self.pool is not None
            await asyncio.get_running_loop().run_in_executor(self.pool, method, tag)
        else:
            method(tag)

    async def unfinished(self) -> tuple[int, str]:
        if self.adapter.blocking:
            result: tuple[int, str] = self.adapter.unfinished()
            return result
        return await self.adapter.unfinished()  # type: ignore[no-any-return]

    def absorb(self, pending: set[str]) -> None:
        for tag, started in self.stamps.poll():
            if tag in self.started:
                self.repeats += 1  # the same job ran twice
            else:
                self.started[tag] = started
            pending.discard(tag)

    async def wait_done(self, tags: list[str], deadline: float, checks: dict[str, int]) -> int:
        """Wait until every tag has run and the system has nothing unfinished; the number of
        tags that did not run by the deadline."""
        pending = set(tags)
        while True:
            self.absorb(pending)
            if not pending:
                break
            if time.monotonic() > deadline:
                return len(pending)
            await asyncio.sleep(STAMP_POLL)
        while True:
            count, command = await self.unfinished()
            checks[command] = checks.get(command, 0) + 1
            if count == 0 or time.monotonic() > deadline:
                return 0
            await asyncio.sleep(STAMP_POLL)

    async def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        scenario: str = spec["scenario"]
        jobs: int = spec["jobs"]
        concurrency: int = max(1, min(spec.get("concurrency", 1), jobs))
        tags = [f"{spec['tag']}-{i}" for i in range(jobs)]
        deadline = time.monotonic() + spec["timeout"]
        if self.adapter.blocking and concurrency > 1:
            self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="bench-client")
        failed: dict[str, str] = {}
        enqueued_at: dict[str, float] = {}
        checks: dict[str, int] = {}
        self.repeats = 0
        overlapping = concurrency > 1
        method = self.adapter.execute if scenario == "execute" else self.adapter.enqueue
        queue = iter(tags)

        async def caller() -> None:
            for tag in queue:
                try:
                    await self.call(method, tag, overlapping)
                except Exception as exc:
                    failed[tag] = f"{type(exc).__name__}: {exc}"[:300]

        async def paced() -> None:
            rate: float = spec["rate"]
            start = time.monotonic()
            for i, tag in enumerate(tags):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                enqueued_at[tag] = time.time()
                try:
                    await self.call(method, tag, False)
                except Exception as exc:
                    failed[tag] = f"{type(exc).__name__}: {exc}"[:300]

        t0 = time.perf_counter()
        missing = 0
        try:
            work = (
                paced()
                if scenario == "paced"
                else asyncio.gather(*(caller() for _ in range(concurrency)))
            )
            try:
                await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                failed.update({t: "TimeoutError: no answer by the deadline" for t in queue})
            enqueue_seconds = time.perf_counter() - t0
            accepted = [t for t in tags if t not in failed]
            if scenario != "execute":
                missing = await self.wait_done(accepted, deadline, checks)
            seconds = time.perf_counter() - t0
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
        self.absorb(set())
        latencies = sorted(
            (self.started[t] - enqueued_at[t]) * 1e3 for t in enqueued_at if t in self.started
        )
        return {
            "scenario": scenario,
            "jobs": jobs,
            "concurrency": concurrency,
            "ok": jobs - len(failed) - missing,
            "errors": len(failed),
            "not_run": missing,
            "repeats": self.repeats,
            "first_error": next(iter(failed.values()), ""),
            "seconds": seconds,
            "enqueue_seconds": enqueue_seconds,
            "check_commands": checks,
            "latencies_ms": latencies,
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--stamps", required=True)
    parser.add_argument("--target", default="")
    parser.add_argument("--stubs", default="")
    parser.add_argument("--poll", type=float, default=0.01)
    args = parser.parse_args()
    module = importlib.import_module(f"peer_{args.system}")
    adapter = module.Adapter(args.redis, args.target, args.stubs, args.poll)
    stamps = StampReader(args.stamps)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    start = adapter.start()
    if not adapter.blocking:
        await start
    driver = Driver(adapter, stamps)
    answer({"ready": True})
    try:
        while line := await reader.readline():
            spec = json.loads(line)
            if spec.get("quit"):
                break
            try:
                answer(await driver.run(spec))
            except Exception as exc:
                traceback.print_exc()
                answer({"failed": f"{type(exc).__name__}: {exc}"})
    finally:
        closing = adapter.close()
        if not adapter.blocking:
            await closing
        stamps.close()


def answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
