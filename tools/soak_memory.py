"""Memory over many jobs: the orchestrator's and the worker's RSS, sampled as jobs go through
(issue 12, point 6: flat across 1,000,000 jobs, sampled every 100,000). A soak, not a test.

    .venv/bin/python tools/soak_memory.py                          # 1,000,000 jobs (~30 min)
    .venv/bin/python tools/soak_memory.py --jobs 100000 --every 10000

Starts a private redis-server, one worker and one orchestrator as real processes on the shipped
defaults (tests/chaos/harness.py; the record retention cut to `--retention` seconds so that Redis
itself stays small), then Submits no-op `work` jobs from `--concurrency` callers (grpc.aio, the
official client). After every `--every` jobs it waits until they have all ended (the queue
stream empty) and samples each process's RSS and Redis's used memory. Prints one line per
sample and, at the end, the growth from the first sample after the warm-up (the second) to the
last. Exit status 1 when a process grew by more than `--max-growth` percent (and 8 MiB), a job
failed, or a log holds a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tests.chaos.harness import ChaosFleet, Slot  # noqa: E402
from tests.grpc_clients import orchestrator_stubs  # noqa: E402

MIB = 1024 * 1024


def rss(slot: Slot) -> float:
    """The process's resident memory, MiB."""
    assert slot.process is not None
    return float(psutil.Process(slot.process.pid).memory_info().rss) / MIB


async def submit_all(
    fleet: ChaosFleet, target: str, first: int, count: int, concurrency: int
) -> int:
    """Submit jobs `first`..`first + count - 1` from `concurrency` callers; the failures."""
    import grpc

    pb2 = fleet.orch.pb2
    numbers = iter(range(first, first + count))
    failures = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = fleet.orch.grpc.OrchestratorServiceStub(channel)

        async def caller() -> None:
            nonlocal failures
            for n in numbers:
                request = pb2.BatchExecutionRequest(
                    job_id=f"soak-{n}", job_type="work",
                    params={"key": f"soak-{n}", "seconds": "0"},
                )  # fmt: skip
                for attempt in itertools.count():
                    try:
                        await stub.Submit(request, timeout=30)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if attempt >= 20 or exc.code() not in (
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.UNAVAILABLE,
                        ):
                            failures += 1
                            break
                        await asyncio.sleep(0.05 * (attempt + 1))

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return failures


def wait_drained(fleet: ChaosFleet, stream: str, within: float) -> None:
    client = fleet.redis.client()
    deadline = time.monotonic() + within
    while client.xlen(stream):
        if time.monotonic() > deadline:
            raise SystemExit(
                f"soak_memory: {client.xlen(stream)} jobs still queued after {within}s"
            )
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="jobs in all (1,000,000)")
    parser.add_argument("--every", type=int, default=100_000, help="jobs between samples")
    parser.add_argument("--concurrency", type=int, default=64, help="callers in flight (64)")
    parser.add_argument("--retention", type=int, default=60, help="record retention, seconds")
    parser.add_argument("--max-growth", type=float, default=10.0,
                        help="percent a process may grow after the warm-up (10)")  # fmt: skip
    args = parser.parse_args()
    if args.jobs < 1 or args.every < 1 or args.concurrency < 1:
        raise SystemExit("soak_memory: --jobs, --every and --concurrency must be at least 1")
    ok = True
    with tempfile.TemporaryDirectory(prefix="jobworker-soak-") as tmp:
        fleet = ChaosFleet(Path(tmp), orchestrator_stubs(Path(tmp) / "stubs"))
        fleet.defaults = True
        fleet.extra_env = {"JOBWORKER_ORCHESTRATOR__RETENTION_SECONDS": str(args.retention)}
        fleet.start_redis()
        try:
            (worker,) = fleet.add("worker", 1)
            (orchestrator,) = fleet.add("orchestrator", 1)
            target = f"127.0.0.1:{orchestrator.port}"
            print(f"worker pid {worker.process.pid if worker.process else '?'}, orchestrator pid"
                  f" {orchestrator.process.pid if orchestrator.process else '?'};"
                  f" {args.jobs:,} jobs, a sample every {args.every:,}", flush=True)  # fmt: skip
            print("| jobs | seconds | jobs/s | orchestrator RSS MiB | worker RSS MiB |"
                  " Redis used MiB |\n|---:|---:|---:|---:|---:|---:|", flush=True)  # fmt: skip
            samples: list[tuple[float, float]] = []
            started = time.monotonic()
            done = failures = 0
            while done < args.jobs:
                count = min(args.every, args.jobs - done)
                lap = time.monotonic()
                failures += asyncio.run(submit_all(fleet, target, done, count, args.concurrency))
                wait_drained(fleet, "wpm-jobs:stream", within=600)
                done += count
                used = fleet.redis.client().info("memory")["used_memory"] / MIB
                sample = (rss(orchestrator), rss(worker))
                samples.append(sample)
                print(f"| {done:,} | {time.monotonic() - started:.0f} |"
                      f" {count / (time.monotonic() - lap):.0f} | {sample[0]:.1f} |"
                      f" {sample[1]:.1f} | {used:.1f} |", flush=True)  # fmt: skip
            base = samples[1] if len(samples) > 1 else samples[0]
            last = samples[-1]
            for name, before, after in (("orchestrator", base[0], last[0]),
                                        ("worker", base[1], last[1])):  # fmt: skip
                growth = (after - before) / before * 100
                flat = growth <= args.max_growth or after - before <= 8
                ok &= flat
                print(f"{name}: {before:.1f} → {after:.1f} MiB ({growth:+.1f} %) from the second"
                      f" sample to the last: {'flat' if flat else 'GROWS'}")  # fmt: skip
            print(f"submits that failed: {failures}; tracebacks in the logs:"
                  f" {fleet.tracebacks() or 'none'}")  # fmt: skip
            ok &= not failures and not fleet.tracebacks()
        finally:
            fleet.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
