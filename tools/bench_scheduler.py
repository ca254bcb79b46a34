"""Scheduler benchmark (not a test): N schedules firing every second, ours next to APScheduler.

    python tools/bench_scheduler.py                      # 1,000 schedules, 3 rounds of 10 s each
    python tools/bench_scheduler.py -n 200 --seconds 5 --rounds 1   # a quick look
    python tools/bench_scheduler.py --trigger cron       # cron '* * * * * *' instead of a 1 s rate
    python tools/bench_scheduler.py --uvloop             # both on uvloop
    python tools/bench_scheduler.py --baseline /tmp/main # and another checkout's ScheduleManager

Each run is a fresh process of its own: ours (`ScheduleManager`, anyio on asyncio, the system wall
clock) and APScheduler 3's `AsyncIOScheduler` (the `bench` extra: `pip install -e '.[bench]'`).
The two alternate in rounds (ours first, then APScheduler first, ...) so that the noise of a shared
machine hits both. Every schedule fires every second on one grid starting at a whole second,
coalescing, one instance at a time, no misfire limit, no jitter (the worst case: all N are due at
the same instant). The job only records `time.time()`; its lateness is how far that is past its
grid second. Printed per run and pooled over the rounds: fires, lateness p50/p99/max, the
process's CPU share (user+system CPU time over wall time) and CPU per fire, the ratios
ours/APScheduler, the load average around each run, and how late the last fire of each second
was (a burst's length: its median shows the scheduler, its tail the machine's other work).
`--baseline DIR` adds a third contestant, the ScheduleManager of another checkout of this
repository (say, the main branch: `git worktree add /tmp/main main`), to measure a change
against what it replaces in one run.
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


def _measure(run: Callable[[float, list[float]], None]) -> dict[str, Any]:
    fired: list[float] = []
    start = _grid_start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    run(start, fired)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # the latest fire of each grid second: how long a burst takes, second by second
    worst: dict[int, float] = {}
    for t in fired:
        if t >= start:
            second = math.floor(t - start)
            worst[second] = max(worst.get(second, 0.0), t - start - second)
    return {
        "late": sorted(_lateness(fired, start)),
        "worst": [worst[k] for k in sorted(worst)],
        "cpu": cpu,
        "wall": wall,
    }


def run_ours(n: int, seconds: float, uvloop: bool, trigger: str) -> dict[str, Any]:
    import anyio
    import anyio._backends._asyncio  # the first anyio.run imports it: not a cost measured

    from app.scheduling.schedule_manager import ScheduleManager
    from app.scheduling.triggers import CronTrigger, IntervalTrigger, Trigger

    def run(start: float, fired: list[float]) -> None:
        async def main() -> None:
            manager = ScheduleManager()
            first = datetime.fromtimestamp(start, UTC)

            async def job() -> None:
                fired.append(time.time())

            # cron has no start: its first tick is the grid's first second, as APScheduler's
            delay = max(0.0, start - 0.5 - time.time()) if trigger == "cron" else 0.0
            for i in range(n):
                t: Trigger = IntervalTrigger(1, first)
                if trigger == "cron":
                    t = CronTrigger("* * * * * *")
                manager.add_schedule(job, t, name=f"s{i}", initial_delay=delay)
            async with anyio.create_task_group() as tg:
                await tg.start(manager.run)
                await anyio.sleep(start - time.time() + seconds - 0.5)
                tg.cancel_scope.cancel()

        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": uvloop})

    return _measure(run)


def run_apscheduler(n: int, seconds: float, uvloop: bool, trigger: str) -> dict[str, Any]:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    def run(start: float, fired: list[float]) -> None:
        async def main() -> None:
            scheduler = AsyncIOScheduler(timezone=UTC)
            first = datetime.fromtimestamp(start, UTC)

            async def job() -> None:
                fired.append(time.time())

            when: dict[str, Any] = (
                {"trigger": "interval", "seconds": 1, "start_date": first}
                if trigger == "interval"
                else {"trigger": "cron", "second": "*", "start_date": first}
            )
            for i in range(n):
                scheduler.add_job(
                    job, id=f"s{i}", misfire_grace_time=None, coalesce=True, max_instances=1,
                    **when,
                )  # fmt: skip
            scheduler.start()
            await asyncio.sleep(start - time.time() + seconds - 0.5)
            scheduler.shutdown(wait=False)

        if uvloop:
            import uvloop as uv

            uv.run(main())
        else:
            asyncio.run(main())

    return _measure(run)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _child(which: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "-n", str(args.n)]
    if which == "baseline":
        cmd += ["--child", "ours", "--root", str(args.baseline)]
    else:
        cmd += ["--child", which]
    cmd += ["--seconds", str(args.seconds), "--trigger", args.trigger]
    cmd += ["--uvloop"] if args.uvloop else []
    load0 = os.getloadavg()[0]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["load"] = (load0, os.getloadavg()[0])
    return result


def _summary(late: list[float], cpu: float, wall: float) -> dict[str, float]:
    late = sorted(late)
    return {
        "fires": len(late),
        "p50": statistics.median(late) if late else math.nan,
        "p99": late[min(len(late) - 1, int(len(late) * 0.99))] if late else math.nan,
        "max": late[-1] if late else math.nan,
        "cpu": cpu / wall,
        "cpu_us": cpu / len(late) * 1e6 if late else math.nan,
    }


HEADER = (
    f"{'scheduler':<36} {'fires':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU':>6} "
    f"{'µs/fire':>8}"
)


def _row(name: str, s: dict[str, float], extra: str = "") -> str:
    return (
        f"{name:<36} {s['fires']:>7.0f} {s['p50'] * 1e3:>8.2f} {s['p99'] * 1e3:>8.2f} "
        f"{s['max'] * 1e3:>8.2f} {s['cpu'] * 100:>5.1f}% {s['cpu_us']:>8.1f}{extra}"
    )


def _ratios(
    a: str, b: str, pooled: dict[str, dict[str, float]], runs: dict[str, list[dict[str, Any]]]
) -> None:
    ratio = {k: pooled[a][k] / pooled[b][k] for k in ("p50", "p99", "max", "cpu", "cpu_us")}
    print(
        f"{'ratio ' + a + '/' + b:<36} {'':>7} {ratio['p50']:>8.2f} {ratio['p99']:>8.2f} "
        f"{ratio['max']:>8.2f} {ratio['cpu']:>6.2f} {ratio['cpu_us']:>8.2f}"
    )
    p99 = {w: [_summary(r["late"], r["cpu"], r["wall"])["p99"] for r in runs[w]] for w in (a, b)}
    per_round = [x / y for x, y in zip(p99[a], p99[b], strict=True)]
    print(f"  p99 ratio {a}/{b} per round: {', '.join(f'{x:.2f}' for x in per_round)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="schedules (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument(
        "--trigger", choices=["interval", "cron"], default="interval",
        help="every 1 s as a fixed rate (default) or as cron '* * * * * *'",
    )  # fmt: skip
    parser.add_argument("--uvloop", action="store_true", help="run both on uvloop")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR",
        help="another checkout of this repository: its ScheduleManager runs too",
    )  # fmt: skip
    parser.add_argument("--child", choices=["ours", "apscheduler"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.root:  # the baseline's `app` package, not this one
            sys.path.insert(0, str(args.root.resolve()))
        run = run_ours if args.child == "ours" else run_apscheduler
        print(json.dumps(run(args.n, args.seconds, args.uvloop, args.trigger)))
        return 0
    loop = "uvloop" if args.uvloop else "asyncio"
    names = {"ours": f"ScheduleManager (anyio on {loop})"}
    if args.baseline:
        if not (args.baseline / "app" / "scheduling" / "schedule_manager.py").is_file():
            parser.error(f"--baseline {args.baseline}: no app/scheduling/ there")
        names["baseline"] = f"baseline: {args.baseline.name}"[:36]
    if _version("apscheduler") == "not installed":
        print("APScheduler is not installed: pip install -e '.[bench]'", file=sys.stderr)
    else:
        names["apscheduler"] = f"APScheduler {_version('apscheduler')} ({loop})"
    expected = int(args.n * args.seconds)
    print(
        f"{args.n} schedules every 1 s ({args.trigger}) for {args.seconds:g} s a run "
        f"({expected} fires due), {args.rounds} round(s), {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    )
    print(HEADER + "   load")
    runs: dict[str, list[dict[str, Any]]] = {which: [] for which in names}
    for r in range(args.rounds):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for which in order:
            result = _child(which, args)
            runs[which].append(result)
            s = _summary(result["late"], result["cpu"], result["wall"])
            load = f"   {result['load'][0]:.1f}-{result['load'][1]:.1f}"
            print(_row(f"{r + 1}: {names[which]}", s, load), flush=True)
    pooled = {
        which: _summary(
            [x for res in rs for x in res["late"]],
            sum(res["cpu"] for res in rs),
            sum(res["wall"] for res in rs),
        )
        for which, rs in runs.items()
    }
    loads = [x for rs in runs.values() for res in rs for x in res["load"]]
    print(f"\npooled over {args.rounds} round(s), load average {min(loads):.1f}-{max(loads):.1f}:")
    print(HEADER)
    for which, s in pooled.items():
        print(_row(names[which], s))
    print("the last fire of each second, ms (how long each burst took; noise hits a few):")
    for which, rs in runs.items():
        worst = sorted(x for res in rs for x in res["worst"])
        if worst:
            q = {p: worst[min(len(worst) - 1, int(len(worst) * p / 100))] * 1e3 for p in (50, 90)}
            print(
                f"  {names[which]:<34} median {q[50]:.2f}, 90% {q[90]:.2f}, "
                f"max {worst[-1] * 1e3:.2f} ({len(worst)} seconds)"
            )
    if "apscheduler" in pooled:
        for which in [w for w in names if w != "apscheduler"]:
            _ratios(which, "apscheduler", pooled, runs)
    if "baseline" in pooled:
        _ratios("ours", "baseline", pooled, runs)
    if args.json:
        record = {"args": vars(args), "pooled": pooled, "runs": runs}
        args.json.write_text(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
