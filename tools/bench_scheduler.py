"""Scheduler benchmark (not a test): N schedules firing every second, ours next to APScheduler.

    python tools/bench_scheduler.py                      # 1,000 schedules, 30 s each
    python tools/bench_scheduler.py -n 200 --seconds 10  # smaller
    python tools/bench_scheduler.py --uvloop             # both on uvloop

Each scheduler runs in a fresh process of its own, one after the other, on the same machine:
ours (`ScheduleManager`, anyio on asyncio, the system wall clock) and APScheduler 3's
`AsyncIOScheduler` (the `bench` extra: `pip install -e '.[bench]'`). Every schedule fires every
second on one grid starting at a whole second, coalescing, one instance at a time, no misfire
limit, no jitter (the worst case: all N are due at the same instant). The job only records
`time.time()`; its lateness is how far that is past its grid second. Printed: fires, lateness
p50/p99/max, and the process's CPU share (user+system CPU time over wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LEAD_SECONDS = 2.0  # the grid starts this long after the schedules are added
# each run stops half a second before its last grid second + 1: `seconds` rounds of fires


def _grid_start() -> float:
    return math.floor(time.time()) + LEAD_SECONDS


def _lateness(fired: list[float], start: float) -> list[float]:
    """Seconds past the grid second each fire belongs to (the jobs are instant: no overlap)."""
    return [t - (start + math.floor(t - start)) for t in fired if t >= start]


def _measure(run: Callable[[float, list[float]], None], seconds: float) -> dict[str, Any]:
    fired: list[float] = []
    start = _grid_start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    run(start, fired)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    late = sorted(_lateness(fired, start))
    return {
        "fires": len(late),
        "p50": statistics.median(late) if late else math.nan,
        "p99": late[min(len(late) - 1, int(len(late) * 0.99))] if late else math.nan,
        "max": late[-1] if late else math.nan,
        "cpu": cpu / wall,
    }


def run_ours(n: int, seconds: float, uvloop: bool) -> dict[str, Any]:
    import anyio

    from app.scheduling.schedule_manager import ScheduleManager
    from app.scheduling.triggers import IntervalTrigger

    def run(start: float, fired: list[float]) -> None:
        async def main() -> None:
            manager = ScheduleManager()
            first = datetime.fromtimestamp(start, UTC)

            async def job() -> None:
                fired.append(time.time())

            for i in range(n):
                manager.add_schedule(job, IntervalTrigger(1, first), name=f"s{i}")
            async with anyio.create_task_group() as tg:
                await tg.start(manager.run)
                await anyio.sleep(start - time.time() + seconds - 0.5)
                tg.cancel_scope.cancel()

        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": uvloop})

    return _measure(run, seconds)


def run_apscheduler(n: int, seconds: float, uvloop: bool) -> dict[str, Any]:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    def run(start: float, fired: list[float]) -> None:
        async def main() -> None:
            scheduler = AsyncIOScheduler(timezone=UTC)
            first = datetime.fromtimestamp(start, UTC)

            async def job() -> None:
                fired.append(time.time())

            for i in range(n):
                scheduler.add_job(
                    job, "interval", seconds=1, start_date=first, id=f"s{i}",
                    misfire_grace_time=None, coalesce=True, max_instances=1,
                )  # fmt: skip
            scheduler.start()
            await asyncio.sleep(start - time.time() + seconds - 0.5)
            scheduler.shutdown(wait=False)

        if uvloop:
            import uvloop as uv

            uv.run(main())
        else:
            asyncio.run(main())

    return _measure(run, seconds)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _child(which: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", which, "-n", str(args.n)]
    cmd += ["--seconds", str(args.seconds)] + (["--uvloop"] if args.uvloop else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="schedules (default 1000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="per scheduler (default 30)")
    parser.add_argument("--uvloop", action="store_true", help="run both on uvloop")
    parser.add_argument("--child", choices=["ours", "apscheduler"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_ours if args.child == "ours" else run_apscheduler
        print(json.dumps(run(args.n, args.seconds, args.uvloop)))
        return 0
    loop = "uvloop" if args.uvloop else "asyncio"
    rows = [("ScheduleManager (anyio on " + loop + ")", _child("ours", args))]
    if _version("apscheduler") == "not installed":
        print("APScheduler is not installed: pip install -e '.[bench]'", file=sys.stderr)
    else:
        rows.append(
            (f"APScheduler {_version('apscheduler')} ({loop})", _child("apscheduler", args))
        )
    expected = int(args.n * args.seconds)
    print(
        f"{args.n} schedules every 1 s for {args.seconds:g} s ({expected} fires due), "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(f"{'scheduler':<36} {'fires':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU':>6}")
    for name, r in rows:
        print(
            f"{name:<36} {r['fires']:>7} {r['p50'] * 1e3:>8.2f} {r['p99'] * 1e3:>8.2f} "
            f"{r['max'] * 1e3:>8.2f} {r['cpu'] * 100:>5.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
