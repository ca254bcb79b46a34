"""docs/config.md lists every configuration key, with what it means, as the Structs define it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gen_config_docs


def test_the_reference_is_complete_and_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_config_docs.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "row",
    [  # documented nowhere before the reference (issue 11, item 14)
        "| `breaker_min_calls` | int | `10` |",
        "| `breaker_window_seconds` | float | `30` |",
        "| `discovery_interval_seconds` | float | `1` |",
        "| `worker_report_interval_seconds` | float | `5` |",
        "| `db` | int | `0` |",
        "| `connect_timeout_seconds` | float | `2` |",
        '| `advertise_ip` | str | `""` |',
        "| `remember_port` | bool | true |",
        '| `format` | str | `"text"` |',
    ],
)
def test_the_keys_that_were_undocumented_are_there(row: str) -> None:
    assert row in (ROOT / "docs" / "config.md").read_text()


def test_a_key_without_a_meaning_or_a_meaning_without_a_key_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meanings = dict(gen_config_docs.MEANINGS)
    del meanings["orchestrator.breaker_min_calls"]
    meanings["worker.gone_key"] = "a key that no Struct has"
    monkeypatch.setattr(gen_config_docs, "MEANINGS", meanings)
    text, keys = gen_config_docs.render()
    assert "orchestrator.breaker_min_calls" in keys
    assert "| `breaker_min_calls` | int | `10` | **undocumented** |" in text
    assert "worker.gone_key" not in keys
    monkeypatch.setattr(sys, "argv", ["gen_config_docs.py", "--check"])
    assert gen_config_docs.main() == 1


def test_the_readme_and_the_deploy_guide_point_at_it() -> None:
    for doc in ("README.md", "docs/deploy.md"):
        assert (
            "docs/config.md" in (ROOT / doc).read_text()
            or "(config.md)" in (ROOT / doc).read_text()
        ), doc
