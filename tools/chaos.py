"""Soak runs of the chaos scenarios: longer storms, more jobs, several seeds (not a test).

    .venv/bin/python tools/chaos.py                         # a 2-minute kill storm, seed 1
    .venv/bin/python tools/chaos.py --jobs 2000 --rate 15 --seconds 300 --seeds 1 2 3
    .venv/bin/python tools/chaos.py --workers 4 --orchestrators 3 --stop 0.3

Each run starts a private redis-server, the workers and orchestrators as real processes
(tests/chaos/harness.py), submits `--jobs` jobs at `--rate` per second while a storm SIGKILLs
(or, with `--stop`, SIGSTOPs for a moment) random processes and brings them back, then waits
for every job to end and prints the figures: lost (never terminal), completed more than once,
run again after a run was killed mid-way, and the time from the last fault to all terminal.
Exit status 1 when any job was lost or completed twice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.harness import ChaosFleet, print_report  # noqa: E402
from tests.grpc_clients import orchestrator_stubs  # noqa: E402


def main() -> int:
    """Run the storms the options ask for; exit 1 when any job was lost or completed twice."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--rate", type=float, default=8.0, help="submissions per second")
    parser.add_argument("--seconds", type=float, default=75.0, help="how long the storm lasts")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--orchestrators", type=int, default=2)
    parser.add_argument("--min-job", type=float, default=0.2, help="shortest job, seconds")
    parser.add_argument("--max-job", type=float, default=3.0, help="longest job, seconds")
    parser.add_argument("--every", type=float, nargs=2, default=(1.5, 5.0), metavar=("MIN", "MAX"))
    parser.add_argument("--down", type=float, nargs=2, default=(0.3, 2.0), metavar=("MIN", "MAX"))
    parser.add_argument("--stop", type=float, default=0.0, help="share of faults that SIGSTOP")
    parser.add_argument(
        "--stopped",
        type=float,
        nargs=2,
        default=(0.5, 6.0),
        metavar=("MIN", "MAX"),
        help="how long a SIGSTOP lasts, seconds",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--settle", type=float, default=60.0, help="seconds to wait after")
    args = parser.parse_args()
    bad = 0
    with tempfile.TemporaryDirectory(prefix="jobworker-chaos-") as tmp:
        orch = orchestrator_stubs(Path(tmp) / "stubs")
        for seed in args.seeds:
            run_dir = Path(tmp) / f"seed-{seed}"
            run_dir.mkdir()
            fleet = ChaosFleet(run_dir, orch, seed=seed)
            try:
                fleet.start_redis()
                fleet.add("worker", args.workers)
                fleet.add("orchestrator", args.orchestrators)
                jobs = [f"soak-{seed}-{i}" for i in range(args.jobs)]
                storm = fleet.storm(
                    seconds=args.seconds, every=tuple(args.every), down=tuple(args.down),
                    stop_rather_than_kill=args.stop, stopped=tuple(args.stopped),
                )  # fmt: skip
                for job_id in jobs:
                    fleet.submit(job_id, seconds=fleet.rng.uniform(args.min_job, args.max_job))
                    time.sleep(1 / args.rate)
                storm.join()
                report = fleet.report(jobs, fleet.wait_terminal(jobs, within=args.settle))
                print_report(f"soak, seed {seed} (logs in {run_dir}, kept while running)", report)
                # a repeat is allowed only where a frozen run came back after the fleet had
                # recorded its attempt as lost (and started the job again elsewhere)
                bad += len(report.lost) + len(report.unexplained_repeats)
            finally:
                fleet.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
