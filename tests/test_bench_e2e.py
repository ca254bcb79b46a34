"""tools/bench_e2e.py in a tiny run against ours only: no peer venv is built (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_a_tiny_run_against_ours_measures_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    venvs = tmp_path / "venvs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_e2e.py"), "--systems", "ours",
         "--jobs", "20", "--rounds", "1", "--concurrency", "4", "--rate", "400",
         "--json", str(out), "--venv-dir", str(venvs)],
        capture_output=True, text=True, timeout=100, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    result = json.loads(out.read_text())
    assert result["lua_internal_commands_counted"] is True
    assert result["failures"] == []
    assert not venvs.exists()  # ours alone needs no peer
    summary = result["summary"]
    assert set(summary) == {"submit-4", "submit-1", "execute-1", "execute-4", "paced-400"}
    for name, rows in summary.items():
        ours = rows["ours"]
        assert (ours["failed"], ours["repeats"]) == (0, 0), name
        assert ours["jobs_per_s"] > 0, name
        # every job costs Redis commands and CPU (counted in 10 ms ticks: a process's own may
        # read 0 in a scenario this small, as the orchestrator's did for 4 executes at ~2 ms
        # each; over the scenarios together it is counted)
        assert ours["redis_commands_per_job"] > 1, name
        assert ours["redis_cpu_ms_per_job"] > 0, name
        assert set(ours["cpu_ms_per_job"]) == {"orchestrator", "worker", "client"}, name
        assert ours["cpu_ms_per_job"]["orchestrator"] >= 0, name
    assert sum(rows["ours"]["cpu_ms_per_job"]["orchestrator"] for rows in summary.values()) > 0
    paced = summary["paced-400"]["ours"]
    assert 0 < paced["p50_ms"] <= paced["p99_ms"]
    windows = result["windows"]
    assert sum(w["ok"] for w in windows if w["scenario"] == "submit-4") == 20
    assert len(next(w for w in windows if w["scenario"] == "paced-400")["latencies_ms"]) == 8
    # the tables: one per scenario, ours in each
    assert proc.stdout.count("|   ours |") + proc.stdout.count("| ours |") == 5, proc.stdout
