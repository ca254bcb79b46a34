"""Soak of the trigger tier: replicas SIGKILLed for minutes while schedules fire (not a test).

    .venv/bin/python tools/chaos_trigger.py                       # 2 minutes, 3 replicas, seed 1
    .venv/bin/python tools/chaos_trigger.py --seconds 600 --replicas 2 --seeds 1 2
    .venv/bin/python tools/chaos_trigger.py --all-roles --stop 0.3  # workers and orchestrators too

Each run starts a private redis-server, workers, orchestrators and trigger replicas as real
processes (tests/chaos/harness.py) with three schedules (every second, every 3 s, and a 6-field
cron every 5 s; overlap allow, grace 20 s). For `--seconds` a storm SIGKILLs (or, with `--stop`,
SIGSTOPs for a moment) a random replica every `--every` seconds and brings it back, and every
`--owner-every` seconds the replica working a schedule is killed as well, so that kills land
in the middle of ticks. Then the storm stops, the fleet settles, and it prints, per schedule:
fire times, decisions by kind, fire times without a decision or with two, ticks taken over
mid-way, the latest submit; and for their jobs: lost (never terminal), run twice.
Exit status 1 when any fire time was lost, missed, decided twice, or its job lost or repeated.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.harness import ChaosFleet, print_report, trigger_report  # noqa: E402
from tests.grpc_clients import orchestrator_stubs  # noqa: E402

SCHEDULES = {
    "soak-1s": "interval_seconds = 1",
    "soak-3s": "interval_seconds = 3",
    "soak-cron": 'cron = "*/5 * * * * *"',
}


def declared() -> str:
    """The schedules, as `[[schedules]]` tables."""
    return "".join(
        f'[[schedules]]\nname = "{name}"\njob_type = "work"\n{when}\n'
        'params = { seconds = "0.5" }\noverlap = "allow"\nmisfire_grace_seconds = 20\n'
        for name, when in SCHEDULES.items()
    )


def main() -> int:
    """Run the soaks the options ask for; exit 1 when any fire time or job went wrong."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the storm lasts")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--orchestrators", type=int, default=2)
    parser.add_argument("--every", type=float, nargs=2, default=(2.0, 6.0), metavar=("MIN", "MAX"))
    parser.add_argument("--down", type=float, nargs=2, default=(0.3, 3.0), metavar=("MIN", "MAX"))
    parser.add_argument("--owner-every", type=float, default=10.0,
                        help="seconds between kills of a schedule's replica (0: none)")  # fmt: skip
    parser.add_argument("--stop", type=float, default=0.0, help="share of faults that SIGSTOP")
    parser.add_argument("--all-roles", action="store_true",
                        help="the storm hits workers and orchestrators too")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    bad = 0
    with tempfile.TemporaryDirectory(prefix="jobworker-chaos-trigger-") as tmp:
        orch = orchestrator_stubs(Path(tmp) / "stubs")
        for seed in args.seeds:
            run_dir = Path(tmp) / f"seed-{seed}"
            run_dir.mkdir()
            fleet = ChaosFleet(run_dir, orch, seed=seed)
            try:
                fleet.start_redis()
                fleet.add("worker", args.workers)
                fleet.add("orchestrator", args.orchestrators)
                fleet.declare_schedules(declared())
                fleet.add("trigger", args.replicas)
                roles = ("worker", "orchestrator", "trigger") if args.all_roles else ("trigger",)
                storm = fleet.storm(
                    seconds=args.seconds, every=tuple(args.every), down=tuple(args.down),
                    stop_rather_than_kill=args.stop, roles=roles,
                )  # fmt: skip
                owner_kills = 0
                end = time.monotonic() + args.seconds
                while args.owner_every and time.monotonic() < end:
                    time.sleep(fleet.rng.uniform(0.5, 1.5) * args.owner_every)
                    name = fleet.rng.choice(list(SCHEDULES))
                    owner = fleet.trigger_owner(name)
                    if owner is not None and len(fleet.live("trigger")) > 1:
                        fleet.kill(owner)
                        owner_kills += 1
                        threading.Timer(fleet.rng.uniform(*args.down), fleet.restart,
                                        [owner]).start()  # fmt: skip
                storm.join()
                time.sleep(max(args.down) + 5)  # the last take-overs decide their ticks
                reports = [trigger_report(fleet, name) for name in SCHEDULES]
                jobs = [job for r in reports for job in r.job_ids]
                runs = fleet.report(jobs, fleet.wait_terminal(jobs, within=60))
                print_report(f"trigger soak, seed {seed} (logs in {run_dir})", runs)
                print(f"   {fleet.faults} faults, {owner_kills} of them a schedule's own replica")
                for r in reports:
                    for line in r.lines():
                        print(f"   {line}")
                    ran = r.decisions.get("fired", 0)
                    bad += len(r.undecided) + len(r.decided_twice) + (r.fire_times - ran)
                bad += len(runs.lost) + len(runs.unexplained_repeats)
            finally:
                fleet.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
