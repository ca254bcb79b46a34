"""Many clients at once against a fleet on its shipped defaults (a load check, not a test).

    .venv/bin/python tools/load_defaults.py                          # 500 Submit + 500 Execute
    .venv/bin/python tools/load_defaults.py --submit 256 --execute 256 --jobs-per-client 4
    .venv/bin/python tools/load_defaults.py --env JOBWORKER_REDIS__MAX_CONNECTIONS=100

Starts a private redis-server, `--workers` workers and `--orchestrators` orchestrators as real
processes with no setting tuned (tests/chaos/harness.py), then `--submit` clients that Submit and
`--execute` clients that Execute, all at once, each on a gRPC connection of its own (grpcio),
`--jobs-per-client` no-op `work` jobs each, one after another; a separate process asks every
process's health meanwhile. Prints the errors the clients got (by status code), health answers
that were not SERVING, how long until every call was answered and every job had ended (and the
jobs per second that makes), jobs that did not SUCCEEDED exactly once, and tracebacks and
warnings in the logs. Exit status 1 when anything of that went wrong.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.harness import ChaosFleet  # noqa: E402
from tests.chaos.load import HealthWatch, run_load  # noqa: E402
from tests.grpc_clients import orchestrator_stubs  # noqa: E402


def one_run(fleet: ChaosFleet, args: argparse.Namespace, prefix: str) -> bool:
    """One round of load on the running fleet; True when nothing went wrong."""
    started = time.monotonic()
    with HealthWatch(fleet) as health:
        result = run_load(
            fleet, submit_clients=args.submit, execute_clients=args.execute,
            jobs_per_client=args.jobs_per_client, prefix=prefix,
        )  # fmt: skip
    jobs = result.job_ids
    answered = {j for j, s in fleet.states(jobs).items() if s != "MISSING"}
    fleet.last_fault = started
    fleet.wait_terminal(sorted(answered), within=args.settle)
    finished = time.monotonic() - started
    report = fleet.report(jobs, finished)
    attempts = Counter(
        "/".join(a["outcome"] for a in (record or {}).get("attempts", []))
        for record in fleet.records(jobs).values()
    )
    print(f"== {prefix}")
    for line in result.lines():
        print(f"   {line}")
    succeeded = report.terminal["SUCCEEDED"]
    print(
        f"   every job ended {finished:.1f}s after the first call:"
        f" {succeeded / finished:.0f} jobs SUCCEEDED/s; states {dict(report.terminal)},"
        f" never ended {len(report.lost)}, completed twice {len(report.completed_twice)}"
    )
    print(f"   attempts per job {dict(attempts.most_common(4))}")
    print(
        f"   health: {health.checks} checks, slowest answer {health.slowest * 1000:.0f} ms,"
        f" not SERVING {len(health.not_serving)} {health.not_serving[:3]}"
    )
    return (
        not result.errors
        and not health.not_serving
        and dict(report.terminal) == {"SUCCEEDED": len(jobs)}
        and not report.completed_twice
        and attempts == {"SUCCEEDED": len(jobs)}
    )


def main() -> int:
    """Start the fleet, run the rounds, print the figures; 1 when anything went wrong."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submit", type=int, default=500, help="clients that Submit")
    parser.add_argument("--execute", type=int, default=500, help="clients that Execute")
    parser.add_argument("--jobs-per-client", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--orchestrators", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="rounds on the same fleet")
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the end")
    parser.add_argument(
        "--pause", type=float, default=0.0,
        help="seconds between the fleet's start (its pids printed) and the load: time to attach"
        " a profiler (py-spy record -p PID)",
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="a setting for every process (default: none, the shipped defaults)",
    )  # fmt: skip
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="jobworker-load-") as tmp:
        orch = orchestrator_stubs(Path(tmp) / "stubs")
        fleet = ChaosFleet(Path(tmp), orch)
        fleet.defaults = True
        fleet.extra_env = dict(item.split("=", 1) for item in args.env)
        fleet.start_redis()
        try:
            fleet.add("worker", args.workers)
            fleet.add("orchestrator", args.orchestrators)
            for slot in fleet.live():
                assert slot.process is not None
                print(f"{slot.role} pid {slot.process.pid} port {slot.port}", flush=True)
            time.sleep(args.pause)
            for n in range(args.rounds):
                ok &= one_run(fleet, args, f"round{n + 1}")
            said = {
                name: sum(w in line for line in text.splitlines() for w in ("WARNING", "ERROR"))
                for name, text in fleet.logs().items()
            }
            print(f"tracebacks {fleet.tracebacks()}; warnings and errors logged"
                  f" {({k: v for k, v in said.items() if v})}")  # fmt: skip
            ok &= not fleet.tracebacks() and not any(said.values())
        finally:
            fleet.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
